"""The lossy update codecs: stated error bounds, exact sizes, refusal of bad bytes, seeds, error feedback."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.codec.compression import (
    CODECS,
    MODE_CODED,
    MODE_CONSTANT,
    MODE_VARINT,
    MODE_ZERO,
    CodecSpec,
    ErrorFeedback,
    decode_tensor,
    encode_tensor,
    error_bound,
    payload_bytes,
    subsample_indices,
    tensor_bytes,
)
from edge_agent.codec.tensor_pack import CodecError

SPEC_TEXTS = ("float32", "float16", "int8", "int8+sr", "int4", "int4+sr", "sign1", "sign1+sr", "sign1+rot",
              "sign1+rot+sr", "topk:0.05", "topk:0.3", "topk:1.0", "subsample:0.1", "subsample:0.1+sr",
              "subsample:1.0")
SPECS = [CodecSpec.parse(t) for t in SPEC_TEXTS]
LOSSY_DETERMINISTIC = [s for s in SPECS if not s.lossless and not s.stochastic]
# The shared part of the default head (fedavg and ditto share every tensor): embedding 64, adapter 32, 7 classes.
HEAD = {"adapter.w": (64, 32), "adapter.b": (32,), "classifier.w": (32, 7), "classifier.b": (7,)}
F32_MAX = float(np.finfo(np.float32).max)


def _random(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _round_trip(x: np.ndarray, spec: CodecSpec, seed: bytes = b"s") -> tuple[bytes, np.ndarray]:
    data = encode_tensor(x, spec, seed)
    return data, decode_tensor(data, x.shape, spec, seed)


# --- CodecSpec --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SPEC_TEXTS)
def test_spec_text_round_trips(text: str) -> None:
    spec = CodecSpec.parse(text)
    assert str(spec) == text
    assert CodecSpec.parse(str(spec)) == spec


@given(st.sampled_from(["topk", "subsample"]), st.floats(min_value=1e-9, max_value=1.0, exclude_min=True))
def test_any_fraction_round_trips_exactly(name: str, fraction: float) -> None:
    spec = CodecSpec(name, fraction)
    assert CodecSpec.parse(str(spec)) == spec


def test_parse_accepts_flags_in_any_order_and_normalizes() -> None:
    assert str(CodecSpec.parse("sign1+sr+rot")) == "sign1+rot+sr"
    assert CodecSpec.parse("topk:1") == CodecSpec("topk", 1.0)
    assert CodecSpec.parse("topk:5e-2").fraction == 0.05


@pytest.mark.parametrize("text", [
    "", "int3", "INT8", " int8", "int8 ", "topk", "topk:", "topk:0", "topk:1.5", "topk:-0.1", "topk:nan",
    "topk:inf", "topk:1e400", "topk:0.1:0.2", "int8:0.5", "float32+sr", "float16+sr", "int8+rot", "topk:0.1+sr",
    "sign1+rot+rot", "sign1+foo", "sign1+", "subsample", "subsample:2",
])
def test_bad_spec_text_is_refused_naming_it_and_the_valid_forms(text: str) -> None:
    with pytest.raises(CodecError) as err:
        CodecSpec.parse(text)
    assert repr(text) in str(err.value) or repr(text.split("+")[0]) in str(err.value)
    assert "valid forms" in str(err.value) and "topk:F" in str(err.value)


def test_spec_constructor_checks_too() -> None:
    with pytest.raises(CodecError, match="fraction"):
        CodecSpec("topk", 2.0)
    with pytest.raises(CodecError, match="unknown codec"):
        CodecSpec("zip")
    assert {s.name for s in SPECS} == set(CODECS)


# --- round trips within the stated bounds -----------------------------------------------------------------------


_SHAPES = st.one_of(hnp.array_shapes(min_dims=1, max_dims=1, min_side=1, max_side=64),
                    st.tuples(st.integers(1, 64), st.integers(1, 32)))


@st.composite
def _tensors(draw: st.DrawFn) -> np.ndarray:
    shape = draw(_SHAPES)
    unit = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    scale = 10.0 ** draw(st.floats(-6, 6))
    scaled: np.ndarray = (unit * np.float32(scale)).astype(np.float32)
    return scaled


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_TEXTS)
@settings(max_examples=40, deadline=None)
@given(x=_tensors(), seed=st.binary(max_size=16))
def test_round_trip_error_within_the_stated_bound(spec: CodecSpec, x: np.ndarray, seed: bytes) -> None:
    with np.errstate(over="ignore"):
        beyond_float16 = not np.all(np.isfinite(x.astype(np.float16)))
    constant = bool(np.all(x == x.flat[0]))  # sent as one exact float32 whatever the codec: no float16 involved
    if spec.name == "float16" and beyond_float16 and not constant:
        with pytest.raises(CodecError, match="float16"):
            encode_tensor(x, spec, seed)
        return
    data, out = _round_trip(x, spec, seed)
    assert out.dtype == np.float32 and out.shape == x.shape and np.all(np.isfinite(out))
    assert np.max(np.abs(out.astype(np.float64) - x)) <= error_bound(x, spec)
    constant = np.all(x == x.flat[0])
    if constant and not spec.lossless:
        assert len(data) <= 5
        np.testing.assert_array_equal(out, x)
    elif spec.fixed_size:
        assert len(data) == tensor_bytes(x.shape, spec)
    else:
        assert len(data) <= tensor_bytes(x.shape, spec)


def test_float32_is_exact_and_float16_within_half_an_ulp() -> None:
    x = _random((64, 32))
    np.testing.assert_array_equal(_round_trip(x, CodecSpec("float32"))[1], x)
    np.testing.assert_array_equal(_round_trip(x, CodecSpec("float16"))[1], x.astype(np.float16).astype(np.float32))


def test_int8_keeps_the_largest_value_of_each_channel_exactly() -> None:
    x = _random((64, 32))
    out = _round_trip(x, CodecSpec("int8"))[1]
    rows, cols = np.argmax(np.abs(x), axis=0), np.arange(32)
    np.testing.assert_array_equal(out[rows, cols], x[rows, cols])


def test_topk_keeps_the_largest_values_and_zeroes_the_rest() -> None:
    x = _random((64, 32))
    out = _round_trip(x, CodecSpec("topk", 0.05))[1]
    k = math.ceil(0.05 * x.size)
    assert np.count_nonzero(out) == k
    assert set(np.flatnonzero(out)) == set(np.argsort(-np.abs(x).ravel())[:k])


def test_subsample_sends_the_seeded_coordinates_only() -> None:
    spec, x = CodecSpec("subsample", 0.1), _random((64, 32))
    out = _round_trip(x, spec, b"seed")[1].ravel()
    index = subsample_indices(x.size, spec, b"seed")
    assert index.size == math.ceil(0.1 * x.size) and np.all(np.diff(index) > 0)
    assert np.all(out[np.setdiff1d(np.arange(x.size), index)] == 0)
    np.testing.assert_allclose(out[index], x.ravel()[index], atol=float(np.abs(x.ravel()[index]).max()) / 254 + 1e-7)


def test_three_and_more_dimensions_scale_per_last_axis() -> None:
    x = _random((3, 4, 5))
    for spec in SPECS:
        out = _round_trip(x, spec)[1]
        assert out.shape == x.shape
        assert np.max(np.abs(out - x)) <= error_bound(x, spec)


# --- sizes --------------------------------------------------------------------------------------------------------


# Bytes of the default head's update (payload only, no envelope) for each codec: the layout, pinned.
HEAD_BYTES = {"float32": 9244, "float16": 4626, "int8": 2479, "int8+sr": 2479, "int4": 1324, "sign1": 457,
              "sign1+rot": 457, "subsample:0.1": 253, "subsample:1.0": 2331}


@pytest.mark.parametrize("text", SPEC_TEXTS)
def test_payload_bytes_is_the_exact_size_of_a_head_update(text: str) -> None:
    spec = CodecSpec.parse(text)
    sizes = [len(encode_tensor(_random(shape, i), spec, name.encode())) for i, (name, shape) in enumerate(HEAD.items())]
    if spec.fixed_size:
        assert sum(sizes) == payload_bytes(HEAD, spec)
    else:
        assert sum(sizes) <= payload_bytes(HEAD, spec)
    if text in HEAD_BYTES:
        assert payload_bytes(HEAD, spec) == HEAD_BYTES[text]


def test_topk_picks_the_smaller_index_coding() -> None:
    x = _random((64, 32))
    sparse = encode_tensor(x, CodecSpec("topk", 0.01), b"")  # 21 of 2048: 21-42 bytes of varints, bitmap 256
    dense = encode_tensor(x, CodecSpec("topk", 0.5), b"")  # 1024 of 2048: the bitmap wins
    assert sparse[0] == MODE_VARINT and 21 <= len(sparse) - (1 + 4 + 2 * 21) <= 42
    assert dense[0] == MODE_CODED and len(dense) == 1 + 4 + 256 + 2 * 1024


def test_tensor_bytes_refuses_a_bad_shape() -> None:
    for shape in ((-1, 2), (2.0,), (True,)):
        with pytest.raises(CodecError, match="shape"):
            tensor_bytes(shape, CodecSpec("int8"))  # type: ignore[arg-type]


# --- empty, constant, huge, non-finite ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0)])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_TEXTS)
def test_empty_tensors_are_zero_bytes(spec: CodecSpec, shape: tuple[int, ...]) -> None:
    x = np.zeros(shape, np.float32)
    data, out = _round_trip(x, spec)
    assert data == b"" and out.shape == shape and tensor_bytes(shape, spec) == 0
    with pytest.raises(CodecError, match="expected 0 bytes"):
        decode_tensor(b"\0", shape, spec, b"s")


@pytest.mark.parametrize("value", [0.0, -0.0, 1e-30, -3.3, 65504.0, F32_MAX, -F32_MAX])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_TEXTS)
def test_constant_tensors_round_trip_exactly(spec: CodecSpec, value: float) -> None:
    for shape in ((1,), (7,), (64, 32)):
        x = np.full(shape, value, np.float32)
        data, out = _round_trip(x, spec)
        np.testing.assert_array_equal(out, x)
        if not spec.lossless:
            assert data[0] == (MODE_ZERO if value == 0 else MODE_CONSTANT)
            assert len(data) == (1 if value == 0 else 5)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_TEXTS)
def test_values_up_to_float32_max_do_not_overflow(spec: CodecSpec) -> None:
    x = (np.random.default_rng(1).uniform(-1, 1, (64, 32)) * F32_MAX).astype(np.float32)
    x[0, :] = F32_MAX  # every channel holds the largest float32
    x[1, ::2] = -F32_MAX
    if spec.name == "float16":  # refused rather than clipped: see the module docstring
        with pytest.raises(CodecError, match="float16's range"):
            encode_tensor(x, spec, b"s")
        return
    out = _round_trip(x, spec)[1]
    assert np.all(np.isfinite(out))
    assert np.max(np.abs(out.astype(np.float64) - x)) <= error_bound(x, spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_TEXTS)
def test_non_finite_tensors_are_refused(spec: CodecSpec, bad: float) -> None:
    x = _random((4, 3))
    x[2, 1] = bad
    with pytest.raises(CodecError, match="tensor contains NaN or inf"):
        encode_tensor(x, spec, b"s")
    with pytest.raises(CodecError, match="tensor contains NaN or inf"):
        encode_tensor(np.array([1e300, 1.0]), spec, b"s")  # float64 beyond float32's range


def test_non_numeric_tensors_are_refused() -> None:
    with pytest.raises(CodecError, match="dtype"):
        encode_tensor(np.array(["a"]), CodecSpec("int8"), b"")


# --- bytes that do not match the shape and codec ------------------------------------------------------------


def _corruptions(data: bytes) -> list[tuple[str, bytes]]:
    out = [("truncated", data[:-1]), ("extended", data + b"\0"), ("empty", b"")]
    out += [(f"mode {mode}", bytes([mode]) + data[1:]) for mode in range(256) if mode != data[0]]
    return out


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.lossless], ids=[t for t in SPEC_TEXTS if t != "float32"])
def test_truncated_extended_or_reflagged_bytes_are_refused_naming_the_codec(spec: CodecSpec) -> None:
    x = _random((16, 9))
    data = encode_tensor(x, spec, b"s")
    for what, bad in _corruptions(data):
        try:
            decode_tensor(bad, x.shape, spec, b"s")
        except CodecError as err:
            assert str(err).startswith(f"{spec}: "), what
        else:
            pytest.fail(f"{what}: accepted")


def test_float32_bytes_of_the_wrong_length_or_non_finite_are_refused() -> None:
    spec = CodecSpec("float32")
    data = encode_tensor(_random((3,)), spec, b"")
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(CodecError, match=r"float32: tensor of shape \(3,\): expected 12 bytes"):
            decode_tensor(bad, (3,), spec, b"")
    with pytest.raises(CodecError, match="NaN or inf"):
        decode_tensor(struct.pack("<3f", 1, math.nan, 2), (3,), spec, b"")


def test_wrong_shape_is_refused() -> None:
    spec = CodecSpec("int8")
    data = encode_tensor(_random((8, 4)), spec, b"")
    for shape in ((4, 8), (8, 5), (32,)):
        with pytest.raises(CodecError, match=r"expected \d+ bytes"):
            decode_tensor(data, shape, spec, b"")


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


@pytest.mark.parametrize("text, x, offset, new, message", [
    ("int8", np.arange(-2, 2, dtype=np.float32), 5, b"\x80", "level -128"),
    ("int4", np.arange(-2, 2, dtype=np.float32), 5, b"\x10", "nibble 0"),
    ("int4", np.arange(-1, 2, dtype=np.float32), 6, b"\xf8", "padding nibble"),
    ("int8", np.arange(-2, 2, dtype=np.float32), 1, struct.pack("<f", -1), "negative, NaN or inf"),
    ("sign1", np.arange(-1, 2, dtype=np.float32), 1, struct.pack("<f", math.nan), "negative, NaN or inf"),
    ("sign1", np.arange(-1, 2, dtype=np.float32), 5, b"\x7f", "padding bits"),
    ("float16", np.arange(-1, 2, dtype=np.float32), 1, b"\x00\x7c", "NaN or inf"),
    ("topk:0.5", np.arange(1, 5, dtype=np.float32), 5, b"\x70", "bitmap marks 3 positions, 2 expected"),
    ("topk:0.5", np.arange(1, 5, dtype=np.float32), 6, b"\x00\x7c", "beyond the scale"),
    ("subsample:0.5", np.arange(1, 5, dtype=np.float32), 5, b"\x80", "level -128"),
])
def test_inconsistent_fields_are_refused(text: str, x: np.ndarray, offset: int, new: bytes, message: str) -> None:
    spec = CodecSpec.parse(text)
    data = encode_tensor(x, spec, b"s")
    decode_tensor(data, x.shape, spec, b"s")  # the unpatched bytes are fine
    with pytest.raises(CodecError, match=message):
        decode_tensor(_patch(data, offset, new), x.shape, spec, b"s")


def test_bad_varint_indices_are_refused() -> None:
    spec, n = CodecSpec("topk", 0.01), 1000  # k = 10: varints (10 bytes) beat the bitmap (125)
    x = np.linspace(-1, 1, n).astype(np.float32)
    data = encode_tensor(x, spec, b"")
    assert data[0] == MODE_VARINT
    head, values = data[:5], data[-20:]
    assert len(data) == 5 + 11 + 20  # indices 0-4 and 995-999: nine 1-byte gaps and one of 990 in 2 bytes
    cases = [
        (b"\x80\x00" + b"\x00" * 9 + values, "shortest form"),  # 0 written in two bytes
        (b"\x00" * 9 + b"\xe7\x07" + values, "reaches 1008, beyond the tensor's 1000 values"),  # 9 + 999
        (b"\xff\xff\x03" + b"\x00" * 9 + values, "longer than 2 bytes"),
        (b"\x80" * 11, "10 varint indices expected, 0 found"),
        (b"\x00" * 10 + values[:-1], "truncated"),
    ]
    for index, message in cases:
        with pytest.raises(CodecError, match=message):
            decode_tensor(head + index, (n,), spec, b"")
    with pytest.raises(CodecError, match="left over"):
        decode_tensor(data + b"\0\0", (n,), spec, b"")


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SPECS), st.binary(max_size=80), st.integers(0, 80))
def test_any_bytes_decode_to_a_finite_tensor_or_codec_error(spec: CodecSpec, noise: bytes, cut: int) -> None:
    good = encode_tensor(_random((6, 5)), spec, b"s")
    for data in (noise, good[:cut] + noise, good[:cut] + noise + good[cut + len(noise):]):
        try:
            out = decode_tensor(data, (6, 5), spec, b"s")
        except CodecError:
            continue
        assert out.shape == (6, 5) and out.dtype == np.float32 and np.all(np.isfinite(out))


# --- seeds ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_TEXTS)
def test_same_seed_same_bytes(spec: CodecSpec) -> None:
    x = _random((16, 8))
    assert encode_tensor(x, spec, b"round 3") == encode_tensor(x.copy(), spec, b"round 3")


def test_different_seeds_draw_different_masks_rotations_and_noise() -> None:
    x = _random((64, 32))
    spec = CodecSpec("subsample", 0.1)
    masks = {tuple(subsample_indices(x.size, spec, bytes([i]))) for i in range(20)}
    assert len(masks) == 20
    for text in ("sign1+rot", "int4+sr", "sign1+sr"):
        spec = CodecSpec.parse(text)
        assert encode_tensor(x, spec, b"a") != encode_tensor(x, spec, b"b")
    for text in ("int8", "int4", "sign1", "topk:0.05", "float16"):  # nothing random in them
        spec = CodecSpec.parse(text)
        assert encode_tensor(x, spec, b"a") == encode_tensor(x, spec, b"b")


def test_the_seeded_streams_are_pinned() -> None:
    # The mask and rotation are a wire contract between devices and aggregator on any numpy version (SHAKE-256,
    # not numpy's generators): these values must never change.
    assert subsample_indices(20, CodecSpec("subsample", 0.2), b"fleet/dev-1/7/adapter.w").tolist() == PINNED_MASK
    data = encode_tensor(np.arange(-3, 5, dtype=np.float32), CodecSpec("sign1", rotate=True), b"x")
    assert data.hex() == PINNED_ROTATION


PINNED_MASK = [4, 8, 14, 19]
PINNED_ROTATION = "0034efa53feb"


def test_decoding_with_another_seed_gives_another_tensor() -> None:
    x = _random((64, 32))
    for text in ("subsample:0.1", "sign1+rot"):
        spec = CodecSpec.parse(text)
        data = encode_tensor(x, spec, b"a")
        assert not np.array_equal(decode_tensor(data, x.shape, spec, b"a"), decode_tensor(data, x.shape, spec, b"b"))


# --- unbiasedness, measured over fixed seeds --------------------------------------------------------------------


def _bias(x: np.ndarray, spec: CodecSpec, seeds: int) -> tuple[float, float]:
    """(||mean of decodes - x|| / ||x||, the sampling noise of that mean if unbiased: rms error / sqrt(seeds))."""
    total, squares = np.zeros(x.shape), 0.0
    for i in range(seeds):
        out = _round_trip(x, spec, i.to_bytes(4, "little"))[1].astype(np.float64)
        total += out
        squares += float(np.sum((out - x) ** 2))
    norm = float(np.linalg.norm(x))
    return float(np.linalg.norm(total / seeds - x)) / norm, math.sqrt(squares / seeds) / norm / math.sqrt(seeds)


@pytest.mark.parametrize("text", ["int8+sr", "int4+sr", "sign1+sr", "sign1+rot+sr", "sign1+rot"])
@pytest.mark.parametrize("kind", ["gaussian", "heavy-tailed"])
def test_stochastic_rounding_and_rotated_sign1_are_unbiased(text: str, kind: str) -> None:
    rng = np.random.default_rng(5)
    shape = (64, 8)
    x = rng.standard_normal(shape) if kind == "gaussian" else rng.lognormal(0, 2, shape) * rng.choice([-1, 1], shape)
    bias, noise = _bias(x.astype(np.float32), CodecSpec.parse(text), 300)
    assert bias < 2.5 * noise  # fixed seeds: the same numbers on every run


@pytest.mark.parametrize("text", ["sign1", "int4"])
def test_deterministic_rounding_is_biased_which_error_feedback_corrects(text: str) -> None:
    x = np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32)
    bias, noise = _bias(x, CodecSpec.parse(text), 20)
    assert noise > 0 and bias == pytest.approx(noise * math.sqrt(20))  # every seed errs the same way


# --- error feedback -------------------------------------------------------------------------------------------------


def _run_feedback(spec: CodecSpec, rounds: int, feedback: ErrorFeedback | None = None,
                  first: int = 0) -> tuple[ErrorFeedback, dict[str, np.ndarray], dict[str, np.ndarray], list[float]]:
    shapes = {"w": (64, 32), "b": (32,)}
    feedback = feedback or ErrorFeedback()
    sent = {k: np.zeros(s) for k, s in shapes.items()}
    received = {k: np.zeros(s) for k, s in shapes.items()}
    norms = []
    for r in range(first, first + rounds):
        rng = np.random.default_rng(r)
        delta = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
        encoded, decoded = feedback.compress(delta, spec, {k: f"{k}/{r}".encode() for k in shapes})
        for k in shapes:
            assert np.array_equal(decode_tensor(encoded[k], shapes[k], spec, f"{k}/{r}".encode()), decoded[k])
            sent[k] += delta[k]
            received[k] += decoded[k]
        norms.append(feedback.residual_norm())
    return feedback, sent, received, norms


@pytest.mark.parametrize("spec", LOSSY_DETERMINISTIC, ids=[str(s) for s in LOSSY_DETERMINISTIC])
def test_error_feedback_keeps_the_accumulated_error_bounded(spec: CodecSpec) -> None:
    feedback, sent, received, norms = _run_feedback(spec, 200)
    residual = feedback.to_arrays()
    for k in sent:  # nothing is lost: what was not delivered yet is exactly the residual
        np.testing.assert_allclose(sent[k] - received[k], residual[k], atol=1e-6)
    step = 0.01 * math.sqrt(64 * 32 + 32)  # the norm of one round's delta
    # contractive codecs: the residual settles at a few steps, about 1/sqrt(fraction) for the sparse ones
    assert max(norms) <= 3 * step / math.sqrt(spec.fraction or 1.0)
    assert max(norms[100:]) <= 1.3 * max(norms[:100])  # and does not grow


def test_error_feedback_residual_stays_zero_for_float32() -> None:
    _, sent, received, norms = _run_feedback(CodecSpec("float32"), 5)
    assert max(norms) == 0.0
    for k in sent:
        np.testing.assert_array_equal(sent[k], received[k])


def test_stochastic_codecs_go_without_error_feedback() -> None:
    feedback, *_ = _run_feedback(CodecSpec("topk", 0.05), 3)
    before = feedback.to_arrays()
    for text in ("int4+sr", "sign1+sr"):
        assert not CodecSpec.parse(text).error_feedback
        _run_feedback(CodecSpec.parse(text), 3, feedback)
        after = feedback.to_arrays()
        for k in before:  # untouched: still owed when the next round's codec uses error feedback again
            np.testing.assert_array_equal(after[k], before[k])


def test_subsample_keeps_error_feedback_with_stochastic_rounding() -> None:
    # +sr rounds the values subsample sends; the 1 - F it does not send must stay owed, or they are lost for good
    spec = CodecSpec.parse("subsample:0.1+sr")
    assert spec.error_feedback
    feedback, sent, received, norms = _run_feedback(spec, 100)
    residual = feedback.to_arrays()
    for k in sent:
        np.testing.assert_allclose(sent[k] - received[k], residual[k], atol=1e-5)
    assert max(norms[50:]) <= 1.3 * max(norms[:50])  # bounded, as without +sr


def test_error_feedback_would_amplify_unbiased_sign1_noise() -> None:
    # Why +sr codecs go without it: sign1+sr's error exceeds its input, so feeding it back grows every round.
    spec, residual = CodecSpec("sign1", stochastic=True), np.zeros(256, np.float32)
    for r in range(30):
        delta = np.random.default_rng(r).standard_normal(256).astype(np.float32)
        corrected = delta + residual
        residual = corrected - _round_trip(corrected, spec, bytes([r]))[1]
    assert np.linalg.norm(residual) > 1e3 * np.linalg.norm(delta)


def test_error_feedback_survives_a_restart_through_its_arrays() -> None:
    spec = CodecSpec("topk", 0.05)
    straight, *_ = _run_feedback(spec, 20)
    first, *_ = _run_feedback(spec, 10)
    restored = ErrorFeedback.from_arrays(first.to_arrays())
    resumed, *_ = _run_feedback(spec, 10, restored, first=10)
    for k, v in straight.to_arrays().items():
        np.testing.assert_array_equal(resumed.to_arrays()[k], v)


def test_error_feedback_changes_nothing_when_a_tensor_fails() -> None:
    feedback, *_ = _run_feedback(CodecSpec("int4"), 2)
    before = feedback.to_arrays()
    bad = {"b": np.ones(32, np.float32), "w": np.full((64, 32), np.nan, np.float32)}
    with pytest.raises(CodecError, match="NaN or inf"):
        feedback.compress(bad, CodecSpec("int4"), {"b": b"1", "w": b"2"})
    with pytest.raises(ValueError, match="no seed"):
        feedback.compress({"b": np.ones(32, np.float32)}, CodecSpec("int4"), {})
    with pytest.raises(ValueError, match="reset the error feedback"):
        feedback.compress({"b": np.ones(31, np.float32)}, CodecSpec("int4"), {"b": b"1"})
    after = feedback.to_arrays()
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    feedback.reset()
    assert feedback.residual_norm() == 0.0 and feedback.to_arrays() == {}


def test_error_feedback_refuses_non_finite_arrays() -> None:
    with pytest.raises(ValueError, match="finite"):
        ErrorFeedback.from_arrays({"w": np.array([np.nan], np.float32)})
