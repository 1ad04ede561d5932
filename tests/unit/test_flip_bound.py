"""`int8_logit_intervals` / `prediction_flip_bound`: sound for every input in the box, and zero-width for none."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.learning.head import HeadConfig, init_params, int8_logit_intervals, prediction_flip_bound, quantize_head


@pytest.mark.parametrize("adapter_dim", [0, 16])
def test_logits_of_every_input_in_the_box_lie_in_the_intervals(adapter_dim: int) -> None:
    rng = np.random.default_rng(adapter_dim)
    head = quantize_head(init_params(HeadConfig(24, 5, adapter_dim), rng))
    x = rng.standard_normal((64, 24)).astype(np.float32)
    radius = rng.uniform(0.0, 0.08, 24)  # an embedding LSB over the standardization std, per feature
    zlo, zhi = int8_logit_intervals(head, x - radius, x + radius)
    margin, bound = prediction_flip_bound(head, x, radius)
    top = head.predict(x)
    flips = 0
    for trial in range(300):
        # Corners (+-radius, as a backbone 1 LSB away gives) and points inside.
        step = rng.integers(-1, 2, x.shape) if trial % 2 else rng.uniform(-1, 1, x.shape)
        z = head.logits((x + step * radius).astype(np.float32))
        assert np.all((zlo <= z) & (z <= zhi))
        changed = np.argmax(z, axis=1) != top
        flips += int(changed.sum())
        assert np.all(margin[changed] <= bound[changed])
    assert flips > 0  # the box is wide enough to flip some rows: the check above is not vacuous


def test_zero_radius_bounds_the_float_rounding_only() -> None:
    rng = np.random.default_rng(3)
    head = quantize_head(init_params(HeadConfig(32, 4, 8), rng))
    x = rng.standard_normal((200, 32)).astype(np.float32)
    zlo, zhi = int8_logit_intervals(head, x, x)
    z = head.logits(x)
    assert np.all((zlo <= z) & (z <= zhi))
    margin, bound = prediction_flip_bound(head, x, 0.0)
    assert np.all(margin >= 0) and np.median(bound) < 1e-3
