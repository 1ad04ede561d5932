"""Merging the partial aggregates of several aggregator workers gives the aggregate one process would hold."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.aggregator.partials import merge_partials
from edge_agent.learning.aggregate import WeightedMean
from edge_agent.learning.robust import StackedUpdates


def _updates(n: int = 23) -> list[tuple[dict[str, np.ndarray], int]]:
    rng = np.random.default_rng(7)
    return [({"w": rng.normal(size=(8, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)},
             int(rng.integers(1, 50))) for _ in range(n)]


def _snapshot(acc: WeightedMean, norms: list[float], counts: list[int]) -> dict[str, np.ndarray]:
    return {**acc.to_arrays(), "__norms__": np.array(norms), "__counts__": np.array(counts, np.int64)}


def _split(make: type[WeightedMean], parts: int) -> tuple[WeightedMean, list[dict[str, np.ndarray]]]:
    """The single-process accumulator over all updates, and `parts` workers' snapshots of a round-robin split."""
    updates = _updates()
    whole = make()
    workers = [make() for _ in range(parts)]
    norms: list[list[float]] = [[] for _ in range(parts)]
    counts: list[list[int]] = [[] for _ in range(parts)]
    for i, (tensors, weight) in enumerate(updates):
        whole.add(tensors, weight)
        workers[i % parts].add(tensors, weight)
        norms[i % parts].append(float(i))
        counts[i % parts].append(weight)
    return whole, [_snapshot(w, n, c) for w, n, c in zip(workers, norms, counts, strict=True)]


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_weighted_means_merge_to_the_single_process_mean(parts: int) -> None:
    whole, snapshots = _split(WeightedMean, parts)
    merged = merge_partials(snapshots)
    assert merged is not None
    acc = WeightedMean.from_arrays(merged)
    assert acc.count == whole.count and acc.total_weight == whole.total_weight
    for k, v in whole.result().items():
        np.testing.assert_allclose(acc.result()[k], v, rtol=1e-6, err_msg=k)  # float64 sums, another order
    assert sorted(merged["__norms__"].tolist()) == [float(i) for i in range(len(_updates()))]
    assert sorted(merged["__counts__"].tolist()) == sorted(w for _, w in _updates())


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_stacked_updates_merge_to_exactly_the_single_process_result(rule: str) -> None:
    whole, snapshots = _split(lambda: StackedUpdates(rule, 0.2), 3)  # type: ignore[arg-type, return-value]
    merged = merge_partials(snapshots)
    assert merged is not None
    acc = StackedUpdates.from_arrays(merged)
    for k, v in whole.result().items():
        np.testing.assert_array_equal(acc.result()[k], v, err_msg=k)  # order-free rules: bit for bit


def test_a_worker_with_nothing_counted_changes_nothing() -> None:
    whole, snapshots = _split(WeightedMean, 2)
    merged = merge_partials([*snapshots, _snapshot(WeightedMean(), [], [])])
    assert merged is not None
    for k, v in whole.result().items():
        np.testing.assert_allclose(WeightedMean.from_arrays(merged).result()[k], v, rtol=1e-6)
    assert merge_partials([]) is None


def test_workers_with_different_rules_are_refused() -> None:
    a = _snapshot(StackedUpdates("median"), [], [])
    b = _snapshot(StackedUpdates("trimmed-mean"), [], [])
    with pytest.raises(ValueError, match="same \\[aggregator\\] settings"):
        merge_partials([a, b])
