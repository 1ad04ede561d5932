import numpy as np
import pytest

from edge_agent.learning.quant import int8_dense, quantize_per_channel, quantize_rows


def test_per_channel_scales_are_max_abs_over_127_golden() -> None:
    w = np.array([[1.27, -0.5], [-2.54, 0.25]], np.float32)
    qt = quantize_per_channel(w, axis=-1)
    np.testing.assert_allclose(qt.scale, [0.02, 0.5 / 127], rtol=1e-6)
    np.testing.assert_array_equal(qt.q, [[64, -127], [-127, 64]])
    assert qt.q.dtype == np.int8


def test_round_trip_error_is_at_most_half_a_step() -> None:
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    qt = quantize_per_channel(w)
    err = np.abs(qt.dequantize() - w)
    assert np.all(err <= qt.scale[None, :] / 2 + 1e-7)


def test_all_zero_channel_gets_a_finite_scale() -> None:
    w = np.zeros((4, 3), np.float32)
    w[:, 1] = [1, -1, 0.5, 0]
    qt = quantize_per_channel(w)
    assert np.all(np.isfinite(qt.scale)) and np.all(qt.scale > 0)
    np.testing.assert_array_equal(qt.dequantize()[:, 0], 0)


def test_int8_dense_matches_float_within_quantization_error() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 64)).astype(np.float32)
    w = rng.standard_normal((64, 16)).astype(np.float32) * 0.1
    b = rng.standard_normal(16).astype(np.float32)
    ref = x @ w + b
    got = int8_dense(x, quantize_per_channel(w), b)
    assert np.max(np.abs(got - ref)) < 0.02 * np.max(np.abs(ref))


def test_quantize_rows_uses_one_scale_per_row() -> None:
    q, s = quantize_rows(np.array([[1.0, -2.0], [0.0, 0.0]], np.float32))
    np.testing.assert_allclose(s[0], 2.0 / 127)
    np.testing.assert_array_equal(q[0], [64, -127])
    np.testing.assert_array_equal(q[1], [0, 0])


def test_int8_dense_rejects_weights_quantized_on_the_wrong_axis() -> None:
    w = quantize_per_channel(np.ones((3, 2), np.float32), axis=0)
    with pytest.raises(ValueError, match="output"):
        int8_dense(np.ones((1, 3), np.float32), w, np.zeros(2, np.float32))
