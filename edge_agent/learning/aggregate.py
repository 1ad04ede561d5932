"""Streaming weighted aggregation: O(model) memory whatever the number of clients."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class WeightedMean:
    """Running sum of weight * tensor; `result()` divides by the total weight."""

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"aggregation weight must be positive, got {weight}")
        if self._sum and set(tensors) != set(self._sum):
            raise ValueError(f"update tensors {sorted(tensors)} differ from earlier ones {sorted(self._sum)}")
        for k, v in tensors.items():
            acc = self._sum.get(k)
            contrib = np.asarray(v, np.float64) * weight
            self._sum[k] = contrib if acc is None else acc + contrib
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if not self.count:
            raise ValueError("no updates to aggregate")
        return {k: (v / self.total_weight).astype(np.float32) for k, v in self._sum.items()}

    # Durable form: the whole state is a few arrays, so an aggregator can commit it with each update.
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {**{f"sum:{k}": v for k, v in self._sum.items()},
                "__total_weight__": np.array(self.total_weight), "__count__": np.array(self.count)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> WeightedMean:
        acc = cls()
        acc._sum = {k[4:]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith("sum:")}
        acc.total_weight = float(arrays["__total_weight__"])
        acc.count = int(arrays["__count__"])
        return acc


class Sum(WeightedMean):
    """Plain sums (for statistics such as class-feature sums and counts)."""

    def result(self) -> dict[str, np.ndarray]:
        if not self.count:
            raise ValueError("no updates to aggregate")
        return {k: v.astype(np.float32) for k, v in self._sum.items()}
