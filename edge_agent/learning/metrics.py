"""Per-user accuracy summaries: the mean alone hides the users a strategy hurts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(pred == y)) if y.size else float("nan")


def summarize(client_acc: Sequence[float]) -> dict[str, float]:
    """The mean, the worst, and `p10_acc`: the nearest-rank 10th percentile, i.e. the ceil(n / 10)-th lowest
    client accuracy (an accuracy some client really has; at most 10 % of the clients are below it). With 10 or
    fewer clients it is the worst client's: an interpolated percentile of 6 clients would be a point between the
    two worst that no client has, and says nothing the worst does not."""
    a = np.asarray([v for v in client_acc if not np.isnan(v)], dtype=np.float64)
    if a.size == 0:
        return {"mean_acc": float("nan"), "p10_acc": float("nan"), "worst_acc": float("nan")}
    return {
        "mean_acc": float(a.mean()),
        "p10_acc": float(np.percentile(a, 10, method="inverted_cdf")),
        "worst_acc": float(a.min()),
    }
