"""Bounded influence: how much one update may move the global head, as pure code.

The weighted mean (aggregate.WeightedMean) lets one device steer the fleet at will: it claims any example
count and sends any values. This module holds what the aggregator applies instead, all of it pure (no I/O,
no clock): a weight the server allows (a cap on the self-reported count, or equal weights), a bound on the
norm of an update's change to the global head (clip or reject), adaptive to the fleet (a quantile of recent
norms within a floor and a ceiling), and coordinate-wise trimmed mean and median as aggregation rules.

The mean streams (O(head) memory whatever the number of updates). Trimmed mean and median need every
update of a round at once: `StackedUpdates` keeps them all, n_updates x head size (float32), and is stored
whole with each accepted update so a killed aggregator loses nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .aggregate import WeightedMean
from .validate import DEFAULT_MAX_ABS, head_problem

RULES = ("mean", "trimmed-mean", "median")
WEIGHTINGS = ("count", "equal")
CLIP_MODES = ("off", "clip", "reject")


@dataclass(frozen=True)
class RobustConfig:
    """The aggregator's `[aggregator]` table: how updates are weighted, bounded and combined."""

    rule: str = "mean"  # "mean" (streaming, weighted) | "trimmed-mean" | "median" (coordinate-wise, unweighted)
    trim_fraction: float = 0.2  # trimmed-mean: share of the updates dropped at EACH end of every coordinate
    weighting: str = "count"  # "count": min(self-reported examples, max_examples); "equal": every update weighs 1
    max_examples: int = 10_000  # the most examples one update may count for (announced in the task) ...
    # ... and, once the fleet has a history, at most this many times the median count recent accepted updates
    # claimed (0: off). A liar is a minority: it cannot move the median, so it weighs at most this many devices.
    count_factor: float = 2.0
    # Any value beyond this magnitude (or not finite): the update is rejected at ingest. The same bound is announced
    # with every task and model; devices refuse a global model beyond it (learning/validate.py, capped at HARD_MAX_ABS).
    max_abs: float = DEFAULT_MAX_ABS
    clip: str = "off"  # "clip": scale an update's change down to the norm bound; "reject": refuse it; "off"
    clip_quantile: float = 0.5  # the bound adapts to this quantile of recent accepted updates' norms ...
    clip_floor: float = 0.01  # ... never below this ...
    clip_ceiling: float = 10.0  # ... nor above this (and is this in the first round, before any history)
    clip_window: int = 100  # how many recent norms (and example counts) the bounds are taken over
    noise_multiplier: float = 0.0  # > 0: differential privacy, Gaussian noise of std noise_multiplier x bound / n
    dp_delta: float = 1e-5  # the delta at which the privacy budget epsilon is reported

    def __post_init__(self) -> None:
        problems = []
        if self.rule not in RULES:
            problems.append(f"rule {self.rule!r}: choose one of {', '.join(RULES)}")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting {self.weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        if self.clip not in CLIP_MODES:
            problems.append(f"clip {self.clip!r}: choose one of {', '.join(CLIP_MODES)}")
        if not 0.0 <= self.trim_fraction < 0.5:
            problems.append(f"trim_fraction {self.trim_fraction}: must be at least 0 and below 0.5")
        if self.max_examples < 1 or not self.max_abs > 0 or self.clip_window < 1:
            problems.append("max_examples, max_abs and clip_window must be positive")
        if not (self.count_factor == 0 or self.count_factor >= 1):
            problems.append(f"count_factor {self.count_factor}: must be 0 (off) or at least 1")
        if not 0.0 < self.clip_quantile <= 1.0 or not 0 < self.clip_floor <= self.clip_ceiling:
            problems.append(f"clip_quantile must be in (0, 1] and 0 < clip_floor <= clip_ceiling, got "
                            f"{self.clip_quantile}, {self.clip_floor}, {self.clip_ceiling}")
        if self.noise_multiplier < 0 or not 0 < self.dp_delta < 1:
            problems.append("noise_multiplier must be >= 0 and dp_delta in (0, 1)")
        if self.noise_multiplier > 0 and (self.clip != "clip" or self.weighting != "equal" or self.rule != "mean"):
            # The Gaussian mechanism's sensitivity is the clip bound of one equally weighted update in a mean.
            problems.append('noise_multiplier > 0 (differential privacy) needs clip = "clip", weighting = "equal" '
                            'and rule = "mean"')
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def dp(self) -> bool:
        return self.noise_multiplier > 0

    def weight(self, num_examples: int, cap: int | None = None) -> int:
        """The weight the server allows an update that claims `num_examples`: at most `cap` (count_cap's),
        never above max_examples."""
        limit = self.max_examples if cap is None else min(cap, self.max_examples)
        return 1 if self.weighting == "equal" else max(1, min(int(num_examples), limit))


# --- checks and bounds on one update ------------------------------------------------------------------------

def out_of_range(tensors: Mapping[str, np.ndarray], max_abs: float) -> str | None:
    """Why an update's values are not sane (the first offending tensor), or None: the same check devices and
    the aggregator apply to a global model (learning/validate.py), on values only. One reduction per tensor when
    all is well (this runs for every update); the full check, which says what is wrong, only when it is not."""
    for value in tensors.values():
        v = np.asarray(value)
        if v.dtype.kind not in "fiu":
            break
        if v.size == 0:
            continue
        peak = float(np.max(np.abs(v)))  # NaN and inf carry through the reduction
        if not (math.isfinite(peak) and peak <= max_abs):
            break
    else:
        return None
    return head_problem(tensors, None, max_abs=max_abs, what="update")


def delta_norm(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of the change an update makes to `reference`, over all its tensors together."""
    total = 0.0
    for k, v in tensors.items():
        d = np.asarray(v, np.float64) - np.asarray(reference[k], np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def clip_update(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                bound: float) -> tuple[dict[str, np.ndarray], float]:
    """The update with its change to `reference` scaled to norm <= `bound`, and the norm it had. An update
    within the bound comes back as it was (the very same arrays: no rounding through float64)."""
    norm = delta_norm(tensors, reference)
    if norm <= bound:
        return dict(tensors), norm
    scale = bound / norm
    out = {k: (np.asarray(reference[k], np.float64)
               + (np.asarray(v, np.float64) - np.asarray(reference[k], np.float64)) * scale).astype(np.float32)
           for k, v in tensors.items()}
    return out, norm


def adaptive_bound(recent_norms: Sequence[float], config: RobustConfig) -> float:
    """The norm bound for the next round: the configured quantile of recent accepted norms, clamped to
    [clip_floor, clip_ceiling]; the ceiling while there is no history. An attacker who is a minority cannot
    raise a median-like quantile, and the ceiling caps what even a majority can do."""
    norms = [n for n in recent_norms[-config.clip_window:] if math.isfinite(n)]
    if not norms:
        return config.clip_ceiling
    q = float(np.quantile(np.asarray(norms, np.float64), config.clip_quantile))
    return min(config.clip_ceiling, max(config.clip_floor, q))


def count_cap(recent_counts: Sequence[int], config: RobustConfig) -> int:
    """The most examples one update may count for in the next round: count_factor x the median of the
    counts recent accepted updates claimed (each already capped at max_examples), within [1, max_examples];
    max_examples while there is no history or the factor is 0."""
    counts = list(recent_counts[-config.clip_window:])
    if config.count_factor == 0 or not counts:
        return config.max_examples
    median = float(np.median(np.asarray(counts, np.float64)))
    return max(1, min(config.max_examples, math.ceil(config.count_factor * median)))


# --- robust rules ---------------------------------------------------------------------------------------

def trim_count(n: int, trim_fraction: float) -> int:
    """How many values a trimmed mean drops at each end of `n`: at most (n - 1) // 2, so one always stays."""
    return min(math.floor(trim_fraction * n), (n - 1) // 2)


def trimmed_mean(stack: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean of `stack` (n, ...) without its `trim_count` lowest and highest values."""
    n = stack.shape[0]
    k = trim_count(n, trim_fraction)
    ordered = np.sort(np.asarray(stack, np.float64), axis=0)
    return np.asarray(ordered[k:n - k].mean(axis=0))


def coordinate_median(stack: np.ndarray) -> np.ndarray:
    return np.asarray(np.median(np.asarray(stack, np.float64), axis=0))


def combine(stack: np.ndarray, rule: str, trim_fraction: float) -> np.ndarray:
    if rule == "median":
        return coordinate_median(stack)
    if rule == "trimmed-mean":
        return trimmed_mean(stack, trim_fraction)
    raise ValueError(f"rule {rule!r} does not need every update; use WeightedMean")


class StackedUpdates(WeightedMean):
    """Every update of a round, for a rule that is not streaming (trimmed mean, median).

    Memory: n_updates x head size in float32 (about 9 KB an update for the default head), plus the same
    again in the durable snapshot the aggregator commits with each accepted update. Weights are kept for
    the record; the rules are unweighted (a device's claimed count must not buy it a larger share).
    """

    def __init__(self, rule: str = "median", trim_fraction: float = 0.2) -> None:
        super().__init__()
        if rule not in ("trimmed-mean", "median"):
            raise ValueError(f"StackedUpdates serves trimmed-mean and median, not {rule!r}")
        self.rule, self.trim_fraction = rule, trim_fraction
        self._rows: dict[str, list[np.ndarray]] = {}

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"aggregation weight must be positive, got {weight}")
        if self._rows and set(tensors) != set(self._rows):
            raise ValueError(f"update tensors {sorted(tensors)} differ from earlier ones {sorted(self._rows)}")
        for k, v in tensors.items():
            self._rows.setdefault(k, []).append(np.asarray(v, np.float32).copy())
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if not self.count:
            raise ValueError("no updates to aggregate")
        return {k: combine(np.stack(rows), self.rule, self.trim_fraction).astype(np.float32)
                for k, rows in self._rows.items()}

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {**{f"stack:{k}": np.stack(rows) for k, rows in self._rows.items()},
                "__rule__": np.array(RULES.index(self.rule)), "__trim__": np.array(self.trim_fraction),
                "__total_weight__": np.array(self.total_weight), "__count__": np.array(self.count)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> StackedUpdates:
        acc = cls(RULES[int(arrays["__rule__"])], float(arrays["__trim__"]))
        acc._rows = {k[6:]: list(np.asarray(v, np.float32)) for k, v in arrays.items() if k.startswith("stack:")}
        acc.total_weight = float(arrays["__total_weight__"])
        acc.count = int(arrays["__count__"])
        return acc
