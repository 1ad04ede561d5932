import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.codec.tensor_pack import CodecError, pack_tensors, unpack_tensors


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"adapter.w": rng.standard_normal((64, 32)).astype(np.float32),
            "adapter.b": rng.standard_normal(32).astype(np.float32),
            "ncm.class_count": np.arange(7, dtype=np.float32)}


def test_float_round_trip_is_exact() -> None:
    t = _tensors()
    out = unpack_tensors(pack_tensors(t, int8=False))
    assert set(out) == set(t)
    for k in t:
        np.testing.assert_array_equal(out[k], t[k])


def test_int8_is_about_four_times_smaller_and_within_half_a_step() -> None:
    t = _tensors()
    small, big = pack_tensors(t, int8=True), pack_tensors(t, int8=False)
    assert len(small) < 0.35 * len(big)
    out = unpack_tensors(small)
    step = np.abs(t["adapter.w"]).max(axis=0) / 127
    assert np.all(np.abs(out["adapter.w"] - t["adapter.w"]) <= step / 2 + 1e-7)
    np.testing.assert_array_equal(out["adapter.b"], t["adapter.b"])  # vectors travel as float32


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:5], "truncated"),
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "version 9"),
    (lambda b: b[:-1], "byte range"),
    (lambda b: b + b"\0", "trailing"),
    (lambda b: b[:5] + struct.pack("<I", 10**9) + b[9:], "header length"),
])
def test_damaged_packs_raise_codec_error_naming_the_problem(mutate, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CodecError, match=message):
        unpack_tensors(mutate(pack_tensors(_tensors())))


def test_object_arrays_are_refused() -> None:
    with pytest.raises(CodecError, match="dtype"):
        pack_tensors({"x": np.array([object()])})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 600))
def test_fuzz_only_codec_error_or_success(noise: bytes, cut: int) -> None:
    good = pack_tensors(_tensors())
    for data in (noise, good[:cut] + noise, good[:cut] + noise + good[cut + len(noise):]):
        try:
            out = unpack_tensors(data)
        except CodecError:
            continue  # the one allowed failure; any other exception fails the test
        # Whatever decodes is a well-formed set of arrays that packs again.
        assert all(isinstance(v, np.ndarray) for v in out.values())
        assert isinstance(pack_tensors(out, int8=False), bytes)
