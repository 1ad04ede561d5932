"""Merging the partial aggregates of several aggregator workers into the one a single process would hold.

Each worker of a shared store (pgstore.py) keeps the running aggregate of the updates IT counted, in the form
the service stores (service.accumulator_snapshot: the accumulator's `to_arrays()` plus the round's norms and
example counts). A round's aggregate is the merge of every worker's part: sums add, stacked updates and the
norm / count lists concatenate. Pure: arrays in, arrays out.

Equal to the single-process aggregate: exactly for the stacked rules (median and trimmed mean do not depend on
the order of the rows) and the counts; for the weighted mean, up to the order of float64 additions (a relative
difference of about 1e-16 before the result is cast to float32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

_ADDED = ("__total_weight__", "__count__")
_CONCATENATED = ("__norms__", "__counts__")


def merge_partials(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """One snapshot from the workers' snapshots of the same round (None: no worker stored one)."""
    if not parts:
        return None
    merged: dict[str, np.ndarray] = {}
    for part in parts:
        for key, value in part.items():
            value = np.asarray(value)
            if key not in merged:
                merged[key] = value.copy()
            elif key.startswith("sum:") or key in _ADDED:
                merged[key] = merged[key] + value
            elif key.startswith("stack:") or key in _CONCATENATED:
                merged[key] = np.concatenate([merged[key], value])
            elif not np.array_equal(merged[key], value):  # the rule's settings: the same in every worker
                raise ValueError(f"workers' partial aggregates disagree on {key}: {merged[key]} vs {value}; "
                                 f"every worker of a fleet must run the same [aggregator] settings")
    return merged
