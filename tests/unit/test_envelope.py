"""The update envelope: golden bytes, round trips, precise refusals, and fuzzing.

The only allowed outcomes of `decode_envelope` on any input are a fully checked envelope or EnvelopeError.
"""

from __future__ import annotations

import copy
import hashlib
import json
import string
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.codec import envelope as envelope_module
from edge_agent.codec.envelope import (
    EnvelopeError,
    Kind,
    Envelope,
    decode_envelope,
    encode_envelope,
)
from edge_agent.codec.tensor_pack import CodecError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _env(**over: Any) -> Envelope:
    fields: dict[str, Any] = dict(
        kind=Kind.UPDATE, device_id="pi-kitchen.01", round=4, model_version=3, strategy="ditto",
        update_id="0f" * 16, num_examples=120,
        tensors={"adapter.w": np.array([[0.5, -1.0, 2.0], [0.25, 1.0, -4.0]], np.float32),
                 "adapter.b": np.array([0.1, -0.2, 0.3], np.float32)},
        meta={"epochs": 2, "loss": 0.25, "note": "ok", "warm": True})
    fields.update(over)
    return Envelope(**fields)


def _split(data: bytes) -> tuple[dict[str, Any], bytes, int]:
    """(header dict, payload, kind) of a valid envelope, read with the layout written out by hand."""
    hlen, plen = struct.unpack_from("<II", data, 6)
    return json.loads(data[48:48 + hlen]), data[48 + hlen:], data[5]


def _seal(header: dict[str, Any] | bytes, payload: bytes, *, kind: int = 1, version: int = 1,
          flags: int = 0) -> bytes:
    """Build an envelope with correct lengths and digest around any header, so it reaches the semantic checks."""
    h = header if isinstance(header, bytes) else json.dumps(header, sort_keys=True).encode()
    prefix = b"EFLE" + struct.pack("<BBIIH", version, kind, len(h), len(payload), flags)
    return prefix + hashlib.sha256(prefix + h + payload).digest() + h + payload


# --- golden bytes ---------------------------------------------------------------------------------

GOLDEN_HEADER = (b'{"codec":"float32","device_id":"dev-1","meta":{},"model_version":3,"num_examples":5,"round":7,'
                 b'"strategy":"ditto","tensors":[{"dtype":"float32","encoding":"raw","name":"b","nbytes":8,'
                 b'"offset":0,"shape":[2]}],"update_id":"u1"}')


def test_golden_envelope_bytes() -> None:
    env = Envelope(Kind.UPDATE, "dev-1", 7, 3, "ditto", "u1", 5, {"b": np.array([1.0, -2.0], np.float32)},
                         codec="float32")
    data = encode_envelope(env)
    assert len(GOLDEN_HEADER) == 0xE0
    # magic, version 1, kind 1, header length 224, payload length 8, flags 0
    assert data[:16] == bytes.fromhex("45464c45" "01" "01" "e0000000" "08000000" "0000")
    assert data[16:48].hex() == "4d701670b69441a888d0ffb6411ea07280ed94964d6c98de4ca340fbc5dd8cf1"
    assert data[16:48] == hashlib.sha256(data[:16] + data[48:]).digest()
    assert data[48:48 + 0xE0] == GOLDEN_HEADER
    assert data[48 + 0xE0:] == struct.pack("<2f", 1.0, -2.0)
    back = decode_envelope(data)
    assert (back.kind, back.device_id, back.round, back.model_version, back.strategy, back.update_id,
            back.num_examples, back.codec, back.meta) == (Kind.UPDATE, "dev-1", 7, 3, "ditto", "u1", 5, "float32", {})
    np.testing.assert_array_equal(back.tensors["b"], [1.0, -2.0])


def test_prefix_layout() -> None:
    assert envelope_module.PREFIX.format == "<4sBBIIH"
    assert (envelope_module.PREFIX.size, envelope_module.FIXED_SIZE) == (16, 48)
    data = encode_envelope(_env())
    magic, version, kind, hlen, plen, flags = struct.unpack_from("<4sBBIIH", data)
    assert (magic, version, kind, flags) == (b"EFLE", 1, 1, 0)
    assert 48 + hlen + plen == len(data)
    assert json.loads(data[48:48 + hlen])["tensors"][-1]["name"] == "adapter.w#scale"


# --- round trips ----------------------------------------------------------------------------------

def test_int8_round_trip_within_half_a_step_and_vectors_exact() -> None:
    env = _env()
    back = decode_envelope(encode_envelope(env))
    assert (back.kind, back.device_id, back.round, back.meta) == (env.kind, env.device_id, env.round, env.meta)
    w = env.tensors["adapter.w"]
    step = np.abs(w).max(axis=0) / 127
    assert np.all(np.abs(back.tensors["adapter.w"] - w) <= step / 2 + 1e-7)
    np.testing.assert_array_equal(back.tensors["adapter.b"], env.tensors["adapter.b"])
    assert set(back.tensors) == {"adapter.w", "adapter.b"}  # the scale companion is not a tensor of its own


def test_float32_round_trip_is_exact_and_global_comes_from_the_aggregator() -> None:
    env = _env(kind=Kind.GLOBAL, device_id="aggregator", codec="float32")
    data = encode_envelope(env)
    assert data[5] == 2
    back = decode_envelope(data)
    assert back.kind is Kind.GLOBAL and back.codec == "float32"
    for k, v in env.tensors.items():
        np.testing.assert_array_equal(back.tensors[k], v)


def test_int8_is_much_smaller_than_float32() -> None:
    big = {"w": np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)}
    assert len(encode_envelope(_env(tensors=big))) < 0.35 * len(encode_envelope(_env(tensors=big, codec="float32")))


def test_decoded_arrays_are_owned_copies() -> None:
    data = bytearray(encode_envelope(_env(codec="float32")))
    back = decode_envelope(data)
    data[-4:] = b"\0\0\0\0"
    assert back.tensors["adapter.w"][1, 2] == -4.0
    back.tensors["adapter.w"][0, 0] = 9.0  # writable, native-endian
    assert back.tensors["adapter.w"].dtype == np.float32


def test_bytearray_and_memoryview_are_accepted() -> None:
    data = encode_envelope(_env())
    assert decode_envelope(memoryview(data)).update_id == decode_envelope(bytearray(data)).update_id


# --- encoding refuses what decoding would refuse ---------------------------------------------------

@pytest.mark.parametrize("over, message", [
    ({"device_id": "bad id"}, "device_id"),
    ({"device_id": ""}, "device_id"),
    ({"device_id": "x" * 65}, "device_id"),
    ({"device_id": "aggregator"}, "reserved"),
    ({"kind": Kind.GLOBAL}, "GLOBAL envelope comes from 'aggregator'"),
    ({"kind": 9}, "unknown kind 9"),
    ({"strategy": "s" * 33}, "strategy"),
    ({"update_id": ""}, "update_id"),
    ({"round": -1}, "round = -1 is out of range"),
    ({"round": 2**32}, "out of range"),
    ({"round": True}, "round must be an integer"),
    ({"model_version": 1.0}, "model_version must be an integer"),
    ({"num_examples": -3}, "num_examples = -3 is out of range"),
    ({"codec": "fp16"}, "codec"),
    ({"meta": {"k": [1]}}, r"meta\['k'\] must be"),
    ({"meta": {"k": float("nan")}}, "not finite"),
    ({"meta": {"bad key": 1}}, "meta key"),
    ({"meta": {f"k{i}": i for i in range(65)}}, "at most 64"),
    ({"meta": {"k": "x" * 8193}}, "at most 8192 characters"),
    ({"tensors": {"w": np.array([np.nan], np.float32)}}, "NaN or inf"),
    ({"tensors": {"w": np.array([[1e300]])}}, "NaN or inf"),  # float64 that float32 cannot hold
    ({"tensors": {"w": np.full((2, 2), np.finfo(np.float32).max)}}, "quantize"),
    ({"tensors": {"w#scale": np.zeros(2, np.float32)}}, "'#'"),
    ({"tensors": {"w": np.zeros(2, np.float16)}}, "dtype"),
    ({"tensors": {"w": np.zeros((1,) * 9, np.float32)}}, "dimensions"),
    ({"tensors": [1, 2]}, "mappings"),
])
def test_encode_refuses_bad_input_with_value_error(over: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        encode_envelope(_env(**over))
    assert not isinstance(info.value, EnvelopeError)  # bad input, not bad bytes


# --- decoding refuses, precisely ------------------------------------------------------------------

def test_oversized_is_refused_before_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_envelope(_env())

    def no_hashing() -> None:
        raise AssertionError("hashed an oversized envelope")

    monkeypatch.setattr(envelope_module, "sha256", no_hashing)
    with pytest.raises(EnvelopeError, match=f"oversized: {len(data)} bytes, at most {len(data) - 1}"):
        decode_envelope(data, max_bytes=len(data) - 1)
    with pytest.raises(EnvelopeError, match="oversized"):
        decode_envelope(b"\0" * ((1 << 20) + 1))


def test_every_truncation_is_refused_as_truncated() -> None:
    data = encode_envelope(_env())
    for cut in range(len(data)):
        with pytest.raises(EnvelopeError, match="truncated") as info:
            decode_envelope(data[:cut])
        if cut < 48:
            assert "expected at least 48" in str(info.value)


def test_every_single_bit_flip_is_refused() -> None:
    data = encode_envelope(_env(tensors={"w": np.array([[1.0, 2.0]], np.float32)}, meta={}))
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            with pytest.raises(EnvelopeError):
                decode_envelope(bytes(flipped))


def _prefix_damage(offset: int, value: bytes) -> Callable[[bytes], bytes]:
    return lambda b: b[:offset] + value + b[offset + len(value):]


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"XXXX" + b[4:], "magic b'XXXX' at offset 0"),
    (_prefix_damage(4, b"\x09"), r"version 9 \(offset 4\) is not supported; this build reads version\(s\) 1"),
    (_prefix_damage(5, b"\x07"), "unknown kind 7 at offset 5"),
    (_prefix_damage(14, b"\x02\x00"), "flags 0x0002"),  # 0x0001 is FLAG_SIGNED (codec.signing)
    (_prefix_damage(14, b"\x01\x00"), "truncated"),  # flagged signed, but no signature trailer
    (lambda b: b + b"\0", "1 trailing bytes"),
    (_prefix_damage(6, struct.pack("<I", 2**32 - 1)), "truncated"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 0x80]), "corrupted"),
    (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "corrupted"),
    (lambda b: "text", "not str"),
])
def test_damaged_bytes_are_refused_naming_the_problem(mutate: Callable[[bytes], Any], message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        decode_envelope(mutate(encode_envelope(_env())))


Mutation = Callable[[dict[str, Any]], None]


def _set(key: str, value: Any) -> Mutation:
    return lambda h: h.__setitem__(key, value)


def _spec(index: int, key: str, value: Any) -> Mutation:
    return lambda h: h["tensors"][index].__setitem__(key, value)


# _env()'s header lists tensors[0] adapter.b (3 float32), [1] adapter.w (2x3 int8), [2] adapter.w#scale (3 float32)
@pytest.mark.parametrize("mutate, message", [
    (lambda h: h.pop("round"), r"missing field\(s\) round"),
    (_set("extra", 1), r"unknown field\(s\) extra"),
    (_set("round", "4"), "round must be an integer, not str"),
    (_set("round", True), "round must be an integer, not bool"),
    (_set("round", 4.0), "round must be an integer"),
    (_set("round", -1), "round = -1 is out of range"),
    (_set("model_version", 2**32), "model_version = 4294967296 is out of range"),
    (_set("num_examples", -1), "num_examples = -1 is out of range"),
    (_set("device_id", "a/b"), "device_id = 'a/b' is invalid"),
    (_set("device_id", None), "device_id = None is invalid"),
    (_set("device_id", "aggregator"), "reserved"),
    (_set("strategy", ""), "strategy = '' is invalid"),
    (_set("update_id", 7), "update_id = 7 is invalid"),
    (_set("codec", "bf16"), "codec = 'bf16' is unknown"),
    (_set("meta", []), "meta must be an object"),
    (_set("meta", {"k": {"x": 1}}), r"meta\['k'\] must be a string, integer, float or bool"),
    (_set("meta", {"k": 2**63}), "does not fit a signed 64-bit"),
    (_set("meta", {"k": "\x00"}), "printable"),
    (_set("tensors", {}), "'tensors' must be a list"),
    (_set("tensors", [1]), r"tensors\[0\]: a tensor spec must be an object"),
    (lambda h: h["tensors"][0].pop("dtype"), r"tensors\[0\]: tensor spec fields wrong \(missing \['dtype'\]"),
    (_spec(0, "encoding", "zstd"), r"tensors\[0\] 'adapter.b': unknown encoding 'zstd'"),
    (_spec(0, "dtype", "float16"), "unsupported dtype 'float16'"),
    (_spec(0, "shape", [-1]), "negative dimension"),
    (_spec(0, "shape", [3.0]), "'shape' must be a list of integers"),
    (_spec(0, "shape", [1] * 9), "9 dimensions"),
    (_spec(0, "shape", [4]),
     r"tensors\[0\] 'adapter.b': byte range 0\+12 does not match shape \(4,\) of float32 \(16 bytes\)"),
    (_spec(0, "offset", -1), "'offset' must be a non-negative integer"),
    (_spec(1, "offset", 8),
     r"tensors\[1\] 'adapter.w': byte range 8\+6 overlaps the previous tensor, which ends at 12"),
    (_spec(1, "offset", 13), "leaves a gap after byte 12"),
    (_spec(1, "name", "adapter.b"), "duplicate name"),
    (_spec(1, "name", "a#b"), "may contain '#' only"),
    (_spec(1, "name", ""), "name must be 1..128 characters"),
    (_spec(2, "name", "other#scale"), r"tensors\[1\] 'adapter.w': int8 data without a matching per-channel scale"),
    (_spec(2, "encoding", "raw"), r"tensors\[2\] 'adapter.w#scale': name may contain '#' only"),
    # int8 data marked raw is allowed by the codec (it is not a float matrix), but leaves its scale orphaned
    (_spec(1, "encoding", "raw"), "scale without an int8-per-channel matrix named 'adapter.w'"),
    (_set("codec", "float32"), "contradicts codec 'float32'"),
])
def test_bad_headers_are_refused_naming_the_problem(mutate: Mutation, message: str) -> None:
    header, payload, kind = _split(encode_envelope(_env()))
    mutate(header)
    with pytest.raises(EnvelopeError, match=message):
        decode_envelope(_seal(header, payload, kind=kind))


def test_scale_mismatch_and_out_of_range() -> None:
    header, payload, _ = _split(encode_envelope(_env()))
    header["tensors"].pop()  # drop the scale
    with pytest.raises(EnvelopeError, match="trailing bytes after the last tensor"):
        decode_envelope(_seal(header, payload))
    with pytest.raises(EnvelopeError, match="int8 data without a matching per-channel scale"):
        decode_envelope(_seal(header, payload[:-12]))
    header, payload, _ = _split(encode_envelope(_env()))
    header["tensors"][2].update(shape=[4], nbytes=16)
    with pytest.raises(EnvelopeError, match=r"byte range 18\+16 is out of range of the 30-byte body"):
        decode_envelope(_seal(header, payload))


@pytest.mark.parametrize("raw_header, message", [
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"{", "not UTF-8 JSON"),
    (b"[1]", "must be a JSON object, not list"),
    (b'{"round": NaN}', "NaN, which is not JSON"),
    (b'{"round": 1, "round": 2}', "repeats the key 'round'"),
    (b"[" * 100_000, "not UTF-8 JSON"),  # nesting deep enough to exhaust the recursion limit
])
def test_header_that_is_not_json_is_refused(raw_header: bytes, message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        decode_envelope(_seal(raw_header, b""))


def test_meta_float_that_parses_to_infinity_is_refused() -> None:
    header, payload, _ = _split(encode_envelope(_env()))
    header["meta"] = {"loss": 1.5}
    raw = json.dumps(header, sort_keys=True).replace("1.5", "1e999").encode()
    with pytest.raises(EnvelopeError, match=r"meta\['loss'\] = inf is not finite"):
        decode_envelope(_seal(raw, payload))


def test_nan_and_inf_payloads_are_refused() -> None:
    header, payload, _ = _split(encode_envelope(_env()))
    nan_bias = struct.pack("<f", float("nan")) + payload[4:]
    with pytest.raises(EnvelopeError, match=r"tensors\[0\] 'adapter.b': contains NaN or inf \(first at flat index 0\)"):
        decode_envelope(_seal(header, nan_bias))
    inf_scale = payload[:-4] + struct.pack("<f", float("inf"))
    with pytest.raises(EnvelopeError, match="'adapter.w': its per-channel scale contains NaN or inf"):
        decode_envelope(_seal(header, inf_scale))
    huge_scale = payload[:-4] + struct.pack("<f", 3e38)  # finite scale, but 127 * 3e38 overflows float32
    with pytest.raises(EnvelopeError, match="'adapter.w': contains NaN or inf"):
        decode_envelope(_seal(header, huge_scale))


def test_tensor_count_and_element_limits() -> None:
    data = encode_envelope(_env())
    assert decode_envelope(data, max_tensors=2, max_elements=12).tensors  # 3 + 6 + 3 elements
    with pytest.raises(EnvelopeError, match="lists 3 tensor specs, at most 2"):  # checked before parsing them
        decode_envelope(data, max_tensors=1)
    with pytest.raises(EnvelopeError, match=r"tensors\[2\] 'adapter.w#scale': too many elements, 12 so far, "
                                            r"at most 11"):
        decode_envelope(data, max_elements=11)
    three = encode_envelope(_env(tensors={f"t{i}": np.zeros(1, np.float32) for i in range(3)}))
    with pytest.raises(EnvelopeError, match="too many tensors: 3, at most 2"):
        decode_envelope(three, max_tensors=2)


def test_a_float_matrix_sent_raw_contradicts_the_int8_codec() -> None:
    header, payload, _ = _split(encode_envelope(_env(codec="float32")))
    header["codec"] = "int8"
    with pytest.raises(EnvelopeError, match=r"tensors\[1\] 'adapter.w': encoding raw of a float32 2-D tensor "
                                            r"contradicts codec 'int8'"):
        decode_envelope(_seal(header, payload))


def test_errors_are_codec_errors_and_value_errors() -> None:
    assert issubclass(EnvelopeError, CodecError) and issubclass(EnvelopeError, ValueError)


# --- fuzzing --------------------------------------------------------------------------------------

def _check_decodes_or_envelope_error(data: Any, **limits: int) -> Envelope | None:
    try:
        env = decode_envelope(data, **limits)
    except EnvelopeError:
        return None
    # whatever decodes is fully checked: finite floats, and it can be encoded again
    for arr in env.tensors.values():
        assert arr.dtype.kind != "f" or np.all(np.isfinite(arr))
    encode_envelope(env)
    return env


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(noise: bytes) -> None:
    _check_decodes_or_envelope_error(noise)
    # the same noise behind a plausible prefix gets past the magic, version and kind checks
    _check_decodes_or_envelope_error(b"EFLE\x01\x01" + noise)
    _check_decodes_or_envelope_error(_seal(noise, b""))


@FUZZ
@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=40))
def test_fuzz_spliced_bytes(at: int, noise: bytes) -> None:
    data = encode_envelope(_env())
    at %= len(data)
    spliced = data[:at] + noise + data[at + len(noise):]
    assert _check_decodes_or_envelope_error(spliced) is None or spliced == data  # any change is caught by the digest


_json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                 | st.text(max_size=8) | st.sampled_from(["aggregator", "int8", "float32", "raw", "scale",
                                                         "int8-per-channel", "adapter.w"]))
_json = st.recursive(_json_scalars,
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=6)
_top_keys = st.sampled_from(["codec", "device_id", "meta", "model_version", "num_examples", "round", "strategy",
                             "tensors", "update_id", "other"])
_spec_keys = st.sampled_from(["name", "encoding", "dtype", "shape", "offset", "nbytes", "other"])


@st.composite
def _header_mutation(draw: st.DrawFn) -> Mutation:
    choice = draw(st.integers(0, 4))
    if choice == 0:
        key, value = draw(_top_keys), draw(_json)
        return _set(key, value)
    if choice == 1:
        key = draw(_top_keys)
        return lambda h: h.pop(key, None)
    index, key = draw(st.integers(0, 2)), draw(_spec_keys)
    if choice == 2:
        return _spec(index, key, draw(_json))
    if choice == 3:  # near-misses of the numbers, the likeliest way to slip past a range check
        delta = draw(st.integers(-20, 20))
        num_key = draw(st.sampled_from(["offset", "nbytes"]))
        return lambda h: h["tensors"][index].__setitem__(num_key, h["tensors"][index][num_key] + delta)
    shape = draw(st.lists(st.integers(-2, 9), max_size=3))
    return _spec(index, "shape", shape)


@FUZZ
@given(st.lists(_header_mutation(), min_size=1, max_size=3), st.sampled_from([1, 2]), st.booleans())
def test_fuzz_header_mutations_resealed(mutations: list[Mutation], kind: int, float_codec: bool) -> None:
    header, payload, _ = _split(encode_envelope(_env(codec="float32" if float_codec else "int8")))
    for m in mutations:
        try:
            m(header)
        except (LookupError, TypeError, AttributeError):
            pass  # an earlier mutation removed what this one changes (or the float codec has fewer specs)
    _check_decodes_or_envelope_error(_seal(header, payload, kind=kind))


@FUZZ
@given(st.binary(min_size=30, max_size=30))
def test_fuzz_payload_resealed(payload: bytes) -> None:
    header, _, _ = _split(encode_envelope(_env()))
    _check_decodes_or_envelope_error(_seal(header, payload))  # NaN/inf anywhere must be refused


_ident = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=64)
_name = st.text(string.ascii_letters + "._", min_size=1, max_size=12)
_shape = st.lists(st.integers(0, 8), max_size=2).map(tuple)
_finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-(2.0**126), max_value=2.0**126)
_array = (hnp.arrays(np.float32, _shape, elements=_finite32)
          | hnp.arrays(st.sampled_from([np.int8, np.int32]), _shape))
_meta_value = (st.text(string.printable.strip(), max_size=20) | st.booleans() | st.integers(-(2**63), 2**63 - 1)
               | st.floats(allow_nan=False, allow_infinity=False))


@st.composite
def _envelopes(draw: st.DrawFn) -> Envelope:
    kind = draw(st.sampled_from(Kind))
    device = "aggregator" if kind is Kind.GLOBAL else draw(_ident.filter(lambda s: s != "aggregator"))
    return Envelope(
        kind=kind, device_id=device, round=draw(st.integers(0, 2**32 - 1)),
        model_version=draw(st.integers(0, 2**32 - 1)), strategy=draw(_ident.map(lambda s: s[:32])),
        update_id=draw(_ident), num_examples=draw(st.integers(0, 2**63 - 1)),
        tensors=draw(st.dictionaries(_name, _array, max_size=4)), codec=draw(st.sampled_from(["int8", "float32"])),
        meta=draw(st.dictionaries(_ident, _meta_value, max_size=4)))


@FUZZ
@given(_envelopes())
def test_fuzz_valid_envelopes_round_trip(env: Envelope) -> None:
    back = decode_envelope(encode_envelope(env))
    assert (back.kind, back.device_id, back.round, back.model_version, back.strategy, back.update_id,
            back.num_examples, back.codec, dict(back.meta)) == (
        env.kind, env.device_id, env.round, env.model_version, env.strategy, env.update_id,
        env.num_examples, env.codec, dict(env.meta))
    assert set(back.tensors) == set(env.tensors)
    for name, sent in env.tensors.items():
        got = back.tensors[name]
        assert got.shape == sent.shape
        if env.codec == "int8" and sent.ndim == 2 and sent.dtype == np.float32:
            assert got.dtype == np.float32
            if sent.size:
                # half a quantization step per output channel (plus float32 rounding of q * scale)
                step = np.maximum(np.abs(sent.astype(np.float64)).max(axis=0) / 127, 1e-8)
                assert np.all(np.abs(got - sent.astype(np.float64)) <= step * (0.5 + 1e-5))
        else:
            assert got.dtype == sent.dtype
            np.testing.assert_array_equal(got, sent)


# --- purity ---------------------------------------------------------------------------------------

def test_codec_package_imports_nothing_impure() -> None:
    code = ("import sys, json\n"
            "import edge_agent.codec.envelope, edge_agent.codec.chunking, edge_agent.codec.tensor_pack\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    forbidden = ["paho", "serial", "socket", "ssl", "sqlite3", "threading", "asyncio", "ai_edge_litert",
                 "tflite_runtime", "tensorflow", "_hashlib"]
    ours = [m for m in loaded if m.startswith("edge_agent.")]
    assert not [m for m in loaded for f in forbidden if m == f or m.startswith(f + ".")]
    assert set(ours) <= {"edge_agent.codec", "edge_agent.codec.envelope", "edge_agent.codec.chunking",
                         "edge_agent.codec.tensor_pack", "edge_agent.codec.digest", "edge_agent.learning", "edge_agent.learning.quant"}, ours


def test_hand_written_layout_helpers_agree_with_the_codec() -> None:
    # _split/_seal write the layout out by hand: a valid envelope survives the round trip through them
    data = encode_envelope(_env())
    header, payload, kind = _split(data)
    assert decode_envelope(_seal(copy.deepcopy(header), payload, kind=kind)).update_id == "0f" * 16
