"""The compact update frame: golden bytes, round trips for every codec, precise refusals, fuzzing, and its size.

The only allowed outcomes of `decode_update_frame` on any bytes are a fully checked update or EnvelopeError.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import struct
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.codec import update_frame as frame_module
from edge_agent.codec.compression import (
    CODECS,
    CodecSpec,
    ErrorFeedback,
    decode_tensor,
    encode_tensor,
    error_bound,
    payload_bytes,
)
from edge_agent.codec.envelope import Envelope, EnvelopeError, Kind, encode_envelope
from edge_agent.codec.update_frame import (
    HEADER_SIZE,
    MAGIC,
    SIGNATURE_SIZE,
    UpdateFrame,
    decode_update_frame,
    encode_update_frame,
    fraction_from_wire,
    fraction_to_wire,
    frame_seed,
    frame_seeds,
    is_update_frame,
    pack_update_frame,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UID = "00112233445566778899aabbccddeeff"
SEEDS = frame_seeds("dev-1")
SMALL = {"w": (3, 2), "b": (2,)}
# the default head (64-d embedding, 32-d adapter, 7 classes): what fedavg and ditto upload
DEFAULT_HEAD = {"adapter.w": (64, 32), "adapter.b": (32,), "classifier.w": (32, 7), "classifier.b": (7,)}


def _all_specs() -> list[CodecSpec]:
    """Every codec with and without each option it takes (fractions: a few, 1 included)."""
    specs = []
    for name, rotate, stochastic in itertools.product(CODECS, (False, True), (False, True)):
        for fraction in ((0.05, 0.3, 1.0) if name in ("topk", "subsample") else (None,)):
            try:
                specs.append(CodecSpec(name, fraction, rotate, stochastic))
            except ValueError:
                pass  # an option this codec does not take
    return specs


ALL_SPECS = _all_specs()


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}


def _frame(spec: CodecSpec | str = "int8", shapes: dict[str, tuple[int, ...]] | None = None,
           **over: Any) -> UpdateFrame:
    fields: dict[str, Any] = dict(device_id="dev-1", round=4, model_version=3, strategy="ditto", update_id=UID,
                                  num_examples=120, codec=CodecSpec.parse(spec) if isinstance(spec, str) else spec,
                                  tensors=_tensors(SMALL if shapes is None else shapes))
    fields.update(over)
    return UpdateFrame(**fields)


def _encode(spec: CodecSpec | str = "int8", shapes: dict[str, tuple[int, ...]] | None = None, **over: Any) -> bytes:
    return encode_update_frame(_frame(spec, shapes, **over), SMALL if shapes is None else shapes, SEEDS)


def _decode(data: Any, shapes: dict[str, tuple[int, ...]] | None = None, **over: Any) -> UpdateFrame:
    kwargs: dict[str, Any] = dict(device_id="dev-1", strategy="ditto", shapes=SMALL if shapes is None else shapes,
                                  seed_of=SEEDS)
    kwargs.update(over)
    return decode_update_frame(data, **kwargs)


def _reseal(data: bytes) -> bytes:
    """Recompute the digest of an unsigned frame (hashlib, not the module's), so damage reaches later checks."""
    return data[:36] + hashlib.sha256(data[:36] + data[52:]).digest()[:16] + data[52:]


# --- golden bytes ---------------------------------------------------------------------------------------------


def test_golden_frame_bytes() -> None:
    frame = _frame("float32", {"b": (2,)}, round=7, num_examples=5, tensors={"b": np.array([1.0, -2.0], np.float32)})
    data = encode_update_frame(frame, {"b": (2,)}, SEEDS)
    # magic, version 1, flags 0, codec 0 (float32), options 0, fraction 0, round 7, model_version 3, examples 5
    header = bytes.fromhex("4555" "01" "00" "00" "00" "0000" "07000000" "03000000" "05000000") + bytes.fromhex(UID)
    body = struct.pack("<2f", 1.0, -2.0)
    assert data == header + hashlib.sha256(header + body).digest()[:16] + body
    assert len(data) == HEADER_SIZE + 8 == 60
    back = _decode(data, {"b": (2,)})
    assert (back.device_id, back.round, back.model_version, back.strategy, back.update_id, back.num_examples,
            str(back.codec)) == ("dev-1", 7, 3, "ditto", UID, 5, "float32")
    np.testing.assert_array_equal(back.tensors["b"], [1.0, -2.0])


def test_header_layout() -> None:
    assert frame_module.HEADER.format == "<2sBBBBHIII16s"
    assert (frame_module.HEADER.size, HEADER_SIZE, SIGNATURE_SIZE) == (36, 52, 64)
    data = _encode("topk:0.5", update_id="ff" * 16, round=2**32 - 1, model_version=9, num_examples=2**32 - 1)
    magic, version, flags, codec, options, units, round_no, version_from, examples, uid = struct.unpack_from(
        "<2sBBBBHIII16s", data)
    assert (magic, version, flags, codec, options) == (b"EU", 1, 0, CODECS.index("topk"), 0)
    assert (units, round_no, version_from, examples, uid) == (32768, 2**32 - 1, 9, 2**32 - 1, b"\xff" * 16)


# --- round trips ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_every_codec_round_trips(spec: CodecSpec, signed: bool) -> None:
    shapes = {"w": (5, 3), "b": (3,), "zero": (2, 2), "const": (4,), "empty": (0, 3), "scalar": ()}
    tensors = _tensors(shapes, seed=1)
    tensors["zero"] = np.zeros((2, 2), np.float32)
    tensors["const"] = np.full(4, 0.25, np.float32)
    sign = (lambda body: hashlib.sha512(body).digest()) if signed else None  # any 64 bytes: decode does not check
    frame = _frame(spec, shapes, tensors=tensors)
    data = encode_update_frame(frame, shapes, SEEDS, sign=sign)
    assert data[3] == (1 if signed else 0)
    back = _decode(data, shapes)
    assert back.codec == spec and str(back.codec) == str(spec)
    assert (back.round, back.model_version, back.update_id, back.num_examples) == (4, 3, UID, 120)
    assert list(back.tensors) == sorted(shapes)
    for name, shape in shapes.items():
        expected = decode_tensor(encode_tensor(tensors[name], spec, SEEDS(4, UID, name)), shape, spec,
                                 SEEDS(4, UID, name))
        assert back.tensors[name].dtype == np.float32 and back.tensors[name].shape == shape
        np.testing.assert_array_equal(back.tensors[name], expected)
    np.testing.assert_array_equal(back.tensors["zero"], 0)
    np.testing.assert_array_equal(back.tensors["const"], 0.25)


@FUZZ
@given(st.sampled_from(ALL_SPECS), st.data())
def test_fuzz_round_trip_any_shapes(spec: CodecSpec, data: st.DataObject) -> None:
    names = data.draw(st.lists(st.text("abcxyz.", min_size=1, max_size=4), max_size=4, unique=True), label="names")
    shapes = {n: tuple(data.draw(st.lists(st.integers(0, 9), max_size=3), label=n)) for n in names}
    tensors = {n: data.draw(hnp.arrays(np.float32, s, elements=st.floats(-1e3, 1e3, width=32)), label=f"{n} values")
               for n, s in shapes.items()}
    back = _decode(encode_update_frame(_frame(spec, shapes, tensors=tensors), shapes, SEEDS), shapes)
    for n, s in shapes.items():
        assert back.tensors[n].shape == s and np.all(np.isfinite(back.tensors[n]))
        bound = error_bound(tensors[n], spec)
        assert np.all(np.abs(back.tensors[n].astype(np.float64) - tensors[n]) <= bound)


def test_tensor_order_is_the_sorted_names_not_the_mappings() -> None:
    forward = {"w": (3, 2), "b": (2,), "a": (1,)}
    backward = dict(reversed(list(forward.items())))
    tensors = _tensors(forward)
    one = encode_update_frame(_frame("int8", forward, tensors=tensors), forward, SEEDS)
    other = encode_update_frame(_frame("int8", backward, tensors=dict(reversed(list(tensors.items())))), backward,
                                SEEDS)
    assert one == other
    assert list(_decode(one, backward).tensors) == ["a", "b", "w"]


def test_error_feedback_bytes_frame_as_they_are() -> None:
    """The agent path: ErrorFeedback.compress encodes; pack_update_frame frames the bytes it returns."""
    spec = CodecSpec.parse("topk:0.1")
    seeds = {name: SEEDS(4, UID, name) for name in DEFAULT_HEAD}
    encoded, decoded = ErrorFeedback().compress(_tensors(DEFAULT_HEAD), spec, seeds)
    data = pack_update_frame(round_no=4, model_version=3, update_id=UID, num_examples=120, codec=spec,
                             encoded=encoded, shapes=DEFAULT_HEAD)
    back = _decode(data, DEFAULT_HEAD)
    for name in DEFAULT_HEAD:
        np.testing.assert_array_equal(back.tensors[name], decoded[name])


def test_decoded_arrays_are_owned_and_writable() -> None:
    data = bytearray(_encode("float32"))
    back = _decode(data)
    expected = back.tensors["w"].copy()
    data[-4:] = b"\0\0\0\0"
    np.testing.assert_array_equal(back.tensors["w"], expected)
    back.tensors["w"][0, 0] = 9.0


def test_bytes_bytearray_and_memoryview_are_accepted() -> None:
    data = _encode("sign1+rot")
    assert _decode(memoryview(data)).update_id == _decode(bytearray(data)).update_id == UID


def test_seed_of_gets_the_round_update_id_and_tensor_name() -> None:
    calls: list[tuple[int, str, str]] = []

    def seed_of(round_no: int, update_id: str, tensor: str) -> bytes:
        calls.append((round_no, update_id, tensor))
        return b"seed"

    frame = _frame("subsample:0.5")
    _decode(encode_update_frame(frame, SMALL, seed_of), seed_of=seed_of)
    assert calls == [(4, UID, "b"), (4, UID, "w")] * 2


# --- fractions ------------------------------------------------------------------------------------------------


def test_every_fraction_of_at_most_four_decimal_places_round_trips() -> None:
    units = set()
    for k in range(1, 10_001):
        fraction = k / 10_000
        unit = fraction_to_wire(fraction)
        assert fraction_from_wire(unit) == fraction, fraction
        units.add(unit)
    assert len(units) == 10_000
    assert fraction_to_wire(1.0) == 65535 and fraction_from_wire(65535) == 1.0


def test_every_wire_fraction_decodes_to_a_fraction_that_encodes_back() -> None:
    for unit in range(1, 65536):
        fraction = fraction_from_wire(unit)
        assert 0 < fraction <= 1 and fraction_to_wire(fraction) == unit
        assert len(repr(fraction)) <= 8  # at most 5 decimal places: "0.12345"


@pytest.mark.parametrize("text", ["topk:0.05", "subsample:0.1", "topk:0.0125", "topk:1", "subsample:0.0001+sr"])
def test_announced_fractions_reach_the_receiver_exactly(text: str) -> None:
    assert str(_decode(_encode(text)).codec) == str(CodecSpec.parse(text))


@pytest.mark.parametrize("fraction", [0.123456, 0.00001, 1e-9, 0.050001])
def test_a_fraction_the_wire_cannot_carry_is_refused_on_encode(fraction: float) -> None:
    with pytest.raises(ValueError, match="not exactly representable") as info:
        _encode(CodecSpec("topk", fraction))
    assert not isinstance(info.value, EnvelopeError)


# --- encoding refuses what decoding would refuse --------------------------------------------------------------


@pytest.mark.parametrize("over, message", [
    ({"round": -1}, "round = -1 is out of range"),
    ({"round": 2**32}, "round = 4294967296 is out of range"),
    ({"model_version": 2**32}, "model_version"),
    ({"num_examples": 2**32}, r"num_examples = 4294967296 is out of range \(0 <= num_examples < 2\*\*32\)"),
    ({"num_examples": True}, "num_examples must be an integer"),
    ({"round": 1.0}, "round must be an integer"),
    ({"update_id": "u1"}, "32 lowercase hex"),
    ({"update_id": UID.upper()}, "32 lowercase hex"),
    ({"update_id": UID + "0"}, "32 lowercase hex"),
    ({"codec": "int8"}, "codec must be a CodecSpec"),
    ({"tensors": {"w": np.zeros((3, 2), np.float32)}}, r"tensors \['w'\] do not match the shapes' names"),
    ({"tensors": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}}, r"'w' has shape \(2, 3\)"),
    ({"tensors": {"w": np.full((3, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}}, "'w': .*NaN or inf"),
    ({"tensors": {"w": np.array([[1e6, 0], [0, 0], [0, 0]], np.float32), "b": np.zeros(2, np.float32)},
      "codec": CodecSpec("float16")}, "float16's range"),
])
def test_encode_refuses_bad_input_with_value_error(over: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        _encode(**over)
    assert not isinstance(info.value, EnvelopeError)  # bad input, not bad bytes


def test_encode_refuses_bad_shapes_and_signers() -> None:
    with pytest.raises(ValueError, match="non-negative integers"):
        encode_update_frame(_frame(), {"w": (3, -2), "b": (2,)}, SEEDS)
    with pytest.raises(ValueError, match="signer returned 3 bytes"):
        encode_update_frame(_frame(), SMALL, SEEDS, sign=lambda body: b"abc")


@pytest.mark.parametrize("spec, raw, message", [
    ("int8", b"\x00\x01", r"frame truncated: tensor 'b' of shape \(2,\) needs 7 bytes from offset 0, 2 are left"),
    ("int8", b"\x07", "unknown mode byte 7"),
    ("int8", b"\x01\x00", r"2 bytes are not a int8 encoding \(1 expected\)"),
    ("float32", b"\0" * 7, "needs 8 bytes"),
    ("topk:0.5", b"", r"length 0 .* is not in 1\.\.8"),
    ("topk:0.5", b"\0" * 12, r"length 12 .* is not in 1\.\.8"),
])
def test_pack_refuses_bytes_that_do_not_fit_the_shape(spec: str, raw: bytes, message: str) -> None:
    codec = CodecSpec.parse(spec)
    encoded = {"w": encode_tensor(_tensors(SMALL)["w"], codec, b"s"), "b": raw}
    with pytest.raises(ValueError, match=message):
        pack_update_frame(round_no=1, model_version=0, update_id=UID, num_examples=1, codec=codec, encoded=encoded,
                          shapes=SMALL)


# --- decoding refuses, precisely ------------------------------------------------------------------------------


def test_oversized_is_refused_before_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode()

    def no_hashing() -> None:
        raise AssertionError("hashed an oversized frame")

    monkeypatch.setattr(frame_module, "sha256", no_hashing)
    with pytest.raises(EnvelopeError, match=f"oversized: {len(data)} bytes, at most {len(data) - 1}"):
        _decode(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize("spec", ["int8", "float32", "topk:0.3", "sign1+rot"])
def test_every_truncation_is_refused_as_truncated(spec: str) -> None:
    data = _encode(spec)
    for cut in range(len(data)):
        with pytest.raises(EnvelopeError, match="truncated") as info:
            _decode(data[:cut])
        if cut < HEADER_SIZE:
            assert "expected at least 52" in str(info.value)


def test_every_truncation_of_a_signed_frame_is_refused() -> None:
    data = encode_update_frame(_frame(), SMALL, SEEDS, sign=lambda body: bytes(64))
    for cut in range(len(data)):
        with pytest.raises(EnvelopeError):
            _decode(data[:cut])


@pytest.mark.parametrize("spec", ["int8", "float32", "topk:0.3", "subsample:0.5+sr", "sign1+rot+sr", "int4"])
def test_every_single_byte_and_bit_flip_is_refused(spec: str) -> None:
    data = _encode(spec, {"w": (2, 3), "b": (3,)})
    for i in range(len(data)):
        for mask in (0xFF, *(1 << bit for bit in range(8))):
            flipped = bytearray(data)
            flipped[i] ^= mask
            with pytest.raises(EnvelopeError):
                _decode(bytes(flipped), {"w": (2, 3), "b": (3,)})


def _at(offset: int, value: bytes) -> Callable[[bytes], bytes]:
    return lambda b: b[:offset] + value + b[offset + len(value):]


def _sealed(offset: int, value: bytes) -> Callable[[bytes], bytes]:
    return lambda b: _reseal(b[:offset] + value + b[offset + len(value):])


# SMALL in wire order: "b" (2,) from offset 52, then "w" (3, 2)
@pytest.mark.parametrize("spec, mutate, message", [
    ("int8", lambda b: b"EX" + b[2:], "not an update frame: magic b'EX' at offset 0, expected b'EU'"),
    ("int8", _at(2, b"\x02"), r"version 2 \(offset 2\) is not supported; this build reads version\(s\) 1"),
    ("int8", _at(3, b"\x02"), "flags 0x02 at offset 3 are not supported"),
    ("int8", _at(3, b"\x01"), "truncated"),  # flagged signed: the last 64 bytes would be the signature
    ("int8", _at(4, b"\x07"), "unknown codec index 7 at offset 4 .*6 subsample"),
    ("int8", _at(5, b"\x04"), "options 0x04 at offset 5 are not supported"),
    ("int8", _at(5, b"\x01"), r"options 0x01 at offset 5: .*\+rot applies to sign1 only"),
    ("float32", _at(5, b"\x02"), r"options 0x02 at offset 5: .*\+sr applies to"),
    ("int8", _at(6, b"\x01\x00"), "fraction 1/65535 at offset 6: codec int8 takes no fraction"),
    ("topk:0.5", _at(6, b"\x00\x00"), r"fraction 0 at offset 6: codec topk needs a fraction in \(0, 1\]"),
    ("int8", lambda b: b + b"\0", "frame has 1 bytes after its last tensor"),
    ("int8", _at(52, b"\x09"), r"tensor 'b' of shape \(2,\): unknown mode byte 9 at offset 52"),
    # 'b' read as a constant: 'w' then starts at one of b's int8 levels, +-127
    ("int8", _at(52, b"\x02"), r"tensor 'w' of shape \(3, 2\): unknown mode byte 1(27|29) at offset 57"),
    ("topk:0.5", _at(52, b"\x80\x00"), "length varint at offset 52 is not in its shortest form"),
    ("topk:0.5", _at(52, b"\xff\xff\xff\xff\xff"), "longer than 5 bytes"),
    ("topk:0.5", _at(52, b"\x00"), r"tensor 'b' of shape \(2,\): length 0 at offset 52 is not in 1\.\.8"),
    ("int8", _at(20, b"\x01"), "frame corrupted: the digest at offset 36 does not match"),
    ("int8", _at(40, b"\x01"), "frame corrupted"),
    ("int8", lambda b: b[:-1] + bytes([b[-1] ^ 1]), "frame corrupted"),
    ("int8", _sealed(53, struct.pack("<f", -1.0)), r"tensor 'b' at offset 52: int8: .*scale is negative"),
    ("int8", _sealed(57, b"\x80"), r"tensor 'b' at offset 52: int8: .*level -128"),
    ("float32", _sealed(52, struct.pack("<f", math.nan)), r"tensor 'b' at offset 52: float32: .*NaN or inf"),
    ("float32", lambda b: "text", "a frame is bytes, not str"),
])
def test_damaged_bytes_are_refused_naming_the_problem(spec: str, mutate: Callable[[bytes], Any],
                                                      message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        _decode(mutate(_encode(spec)))


def test_hostile_floats_are_refused_whatever_the_numpy_error_settings() -> None:
    signalling_nan = struct.pack("<I", 0x7F800001)
    data = _reseal(_encode("int8")[:53] + signalling_nan + _encode("int8")[57:])  # the scale of 'b'
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        with pytest.raises(EnvelopeError, match=r"tensor 'b' at offset 52: .*scale is negative, NaN or inf"):
            _decode(data)


def test_the_receivers_shapes_must_be_the_senders() -> None:
    data = _encode()
    with pytest.raises(EnvelopeError, match="after its last tensor"):
        _decode(data, {"w": (3, 2)})
    with pytest.raises(EnvelopeError):
        _decode(data, {"w": (3, 2), "b": (2,), "c": (4,)})
    with pytest.raises(EnvelopeError):
        _decode(data, {"w": (2, 3), "b": (2,)})


@pytest.mark.parametrize("over, message", [
    ({"device_id": "bad id"}, "device_id"),
    ({"device_id": "aggregator"}, "device_id"),
    ({"strategy": ""}, "strategy"),
    ({"shapes": {"w": (1.5,)}}, "non-negative integers"),
])
def test_bad_arguments_are_value_errors_not_bad_bytes(over: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        _decode(_encode(), **over)
    assert not isinstance(info.value, EnvelopeError)


# --- fuzzing --------------------------------------------------------------------------------------------------


def _decodes_or_refuses(data: bytes, shapes: dict[str, tuple[int, ...]] | None = None) -> UpdateFrame | None:
    try:
        frame = _decode(data, shapes)
    except EnvelopeError:
        return None
    for name, shape in (SMALL if shapes is None else shapes).items():
        assert frame.tensors[name].shape == shape and np.all(np.isfinite(frame.tensors[name]))
    return frame


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(noise: bytes) -> None:
    assert _decodes_or_refuses(noise) is None or noise.startswith(MAGIC)  # not even a frame: refused
    # Past the magic, version and flags: random bytes cannot carry the digest of what they hold.
    assert _decodes_or_refuses(MAGIC + b"\x01\x00" + noise) is None


@FUZZ
@given(st.integers(0, len(CODECS) - 1), st.integers(0, 3), st.integers(0, 65535), st.binary(max_size=120),
       st.booleans())
def test_fuzz_sealed_headers_and_bodies(codec: int, options: int, units: int, body: bytes, from_valid: bool) -> None:
    """A correct digest around random codec fields and body bytes: the tensor checks must hold on their own."""
    if from_valid:  # a real body under a random codec header
        body = _encode("int8")[52:]
    header = MAGIC + struct.pack("<BBBBHIII", 1, 0, codec, options, units, 1, 0, 1) + bytes(16)
    _decodes_or_refuses(_reseal(header + bytes(16) + body))


@FUZZ
@given(st.sampled_from(["int8", "topk:0.3", "sign1+rot", "subsample:0.5", "float16"]), st.integers(0, 10_000),
       st.binary(min_size=1, max_size=12), st.booleans())
def test_fuzz_spliced_bytes(spec: str, at: int, noise: bytes, reseal: bool) -> None:
    data = _encode(spec)
    at %= len(data)
    spliced = data[:at] + noise + data[at + len(noise):]
    if reseal:
        spliced = _reseal(spliced)
    frame = _decodes_or_refuses(spliced)
    assert frame is not None or spliced != data
    if not reseal:
        assert frame is None or spliced == data  # any change is caught by the digest


# --- is_update_frame and the seeds ----------------------------------------------------------------------------


def test_is_update_frame_tells_frames_from_envelopes() -> None:
    data = _encode()
    assert is_update_frame(data) and is_update_frame(bytearray(data)) and is_update_frame(memoryview(data))
    envelope = encode_envelope(Envelope(Kind.UPDATE, "dev-1", 1, 0, "ditto", "u1", 1, {"b": np.zeros(2, np.float32)}))
    assert not is_update_frame(envelope)
    assert not is_update_frame(b"") and not is_update_frame(b"E") and not is_update_frame(b"EF")
    assert is_update_frame(b"EU")  # only a hint: decoding checks the rest


def test_frame_seeds_differ_in_every_field_and_cannot_be_confused() -> None:
    seeds = {frame_seed("dev-1", 4, "w"), frame_seed("dev-2", 4, "w"), frame_seed("dev-1", 5, "w"),
             frame_seed("dev-1", 4, "b")}
    assert len(seeds) == 4 and all(len(s) == 32 for s in seeds)
    assert frame_seed("dev-1", 1, "1w") != frame_seed("dev-1", 11, "w")  # length-prefixed fields
    # Not the update id: a resend, and a fleet that replays the simulation, use the very same seeds.
    assert SEEDS(4, UID, "w") == SEEDS(4, "ff" * 16, "w") == frame_seed("dev-1", 4, "w")


# --- what it costs on the wire --------------------------------------------------------------------------------


def _overhead(spec: str, shapes: dict[str, tuple[int, ...]]) -> int:
    frame = _frame(spec, shapes)
    data = encode_update_frame(frame, shapes, SEEDS)
    codec_bytes = sum(len(encode_tensor(frame.tensors[n], frame.codec, SEEDS(4, UID, n))) for n in shapes)
    return len(data) - codec_bytes


@pytest.mark.parametrize("spec", ["float32", "int8", "sign1+rot", "subsample:0.05", "topk:0.05"])
def test_the_fixed_overhead_is_52_bytes_plus_a_varint_per_topk_tensor(spec: str) -> None:
    overhead = _overhead(spec, DEFAULT_HEAD)
    assert overhead <= 64
    if spec.startswith("topk"):
        assert HEADER_SIZE + 4 <= overhead <= HEADER_SIZE + 8  # 1..2 length bytes per tensor
    else:
        assert overhead == HEADER_SIZE


def test_default_head_update_sizes_against_the_envelope() -> None:
    tensors = _tensors(DEFAULT_HEAD)
    envelope = len(encode_envelope(Envelope(Kind.UPDATE, "dev-1", 4, 3, "ditto", UID, 120, tensors, codec="int8")))
    sizes = {spec: len(_encode(spec, DEFAULT_HEAD, tensors=tensors)) for spec in ("int8", "sign1", "topk:0.05")}
    for spec in ("int8", "sign1"):  # fixed-size codecs: exactly the header plus compression's payload
        assert sizes[spec] == HEADER_SIZE + payload_bytes(DEFAULT_HEAD, CodecSpec.parse(spec))
    assert (sizes["int8"], sizes["sign1"]) == (2531, 509)
    assert sizes["topk:0.05"] <= HEADER_SIZE + 8 + payload_bytes(DEFAULT_HEAD, CodecSpec.parse("topk:0.05"))
    assert envelope - sizes["int8"] > 800  # the JSON header, gone (and int8 biases: 4 bytes a value there)
    assert sizes["sign1"] * 6 < envelope
