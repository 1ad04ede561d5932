"""Standardize embeddings with statistics from the backbone subjects, never from client data.

An embedding unit that is nearly constant on the reference data would get a tiny standard deviation
and be blown up into huge values on a stranger's data; the int8 head's per-row activation scale would
then be set by that one unit and every other unit would round to zero. The floor prevents it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EmbeddingStandardizer:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, reference: np.ndarray, floor_fraction: float = 0.1) -> EmbeddingStandardizer:
        """`floor_fraction` of the median unit spread is the smallest std any unit may have."""
        mean = reference.mean(axis=0)
        std = reference.std(axis=0)
        floor = max(float(np.median(std)) * floor_fraction, 1e-6)
        return cls(mean.astype(np.float32), np.maximum(std, floor).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z: np.ndarray = ((x - self.mean) / self.std).astype(np.float32)
        return z
