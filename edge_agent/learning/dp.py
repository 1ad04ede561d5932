"""Optional client-level differential privacy at the aggregator (DP-FedAvg): every update's change is
clipped to a fixed norm bound C (robust.clip_update), the mean of n updates then gets Gaussian noise of
standard deviation noise_multiplier x C / n, and the privacy budget spent so far is epsilon at a chosen
delta, computed by a well-kept accountant library in aggregator/privacy.py (this module stays pure).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def add_noise(params: Mapping[str, np.ndarray], keys: set[str] | frozenset[str], noise_multiplier: float,
              clip_bound: float, n_updates: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`params` with Gaussian noise (std noise_multiplier x clip_bound / n_updates) on the tensors in `keys`."""
    std = noise_multiplier * clip_bound / max(1, n_updates)
    return {k: (np.asarray(v, np.float64) + rng.normal(0.0, std, np.shape(v))).astype(np.float32) if k in keys
            else v for k, v in params.items()}
