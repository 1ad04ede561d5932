"""What a comparison of two strategies may claim: paired differences per user over seeds, with 95 % intervals.

Results arrive as accuracy per (seed, user): every strategy is run on the same seeds, and a seed fixes the
same partition, shots, initialisation and (where the data allows) test session for all of them, so A and B are
compared pair by pair, user by user.

Two intervals, because there are two things to generalise over:
- over SEEDS (`seeds`): the per-seed mean over users of A - B, a t interval across seeds. It answers "on these
  users, is the gap more than the luck of a draw?"; it is the one a claim in the README needs to exclude zero.
- over USERS (`users`): each user's mean over seeds of A - B, a t interval across users. It answers "would a
  new user of the same kind gain?"; with 6 or 10 users it is wide, and it is reported beside, never hidden.

A "percentile" of 6 users means little, so the low end of the spread is given by name: the worst user (lowest
mean over seeds) and the mean of the worst quarter of users (at least one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Accuracies = Mapping[int, Mapping[str, float]]  # seed -> user -> accuracy in [0, 1]

CONFIDENCE = 0.95


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t quantile (scipy's; scipy comes with the aggregator's extra)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df {df})")
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        """"higher" / "lower" when the interval excludes zero, else "no difference"."""
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "no difference"

    def points(self) -> str:
        """'+1.2 [+0.4, +2.0]' in accuracy points."""
        return f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size < 2:
        raise ValueError(f"an interval needs at least 2 values, got {v.size}: run at least 2 seeds (the report "
                         "uses 10)")
    if not np.all(np.isfinite(v)):
        raise ValueError("an interval over values that are not all finite (a run without a score?)")
    m = float(v.mean())
    half = t_quantile(v.size - 1, confidence) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return Interval(m, m - half, m + half, int(v.size))


def _matrix(acc: Accuracies, seeds: Sequence[int], users: Sequence[str]) -> np.ndarray:
    """[seed, user] accuracies; refuses a missing cell rather than comparing unlike with unlike."""
    missing = [(s, u) for s in seeds for u in users if u not in acc.get(s, {})]
    if missing:
        shown = ", ".join(f"seed {s} user {u!r}" for s, u in missing[:5])
        raise KeyError(f"no result for {shown}{' and more' if len(missing) > 5 else ''}: every user needs a result "
                       "at every seed; rerun the runs that failed (the benchmark's .jsonl record keeps the rest)")
    return np.array([[acc[s][u] for u in users] for s in seeds], np.float64)


def common_keys(a: Accuracies, b: Accuracies) -> tuple[list[int], list[str]]:
    """The seeds and users of two results, which must be the same."""
    seeds = sorted(set(a) | set(b))
    if set(a) != set(b):
        raise ValueError(f"the two results have different seeds: {sorted(a)} and {sorted(b)}; run both on the same")
    users = sorted(set().union(*(set(a[s]) | set(b[s]) for s in seeds)))
    return seeds, users


@dataclass(frozen=True)
class PairedDifference:
    """A - B, paired by seed and user."""

    seeds: Interval  # over seeds, of the per-seed mean over users
    users: Interval  # over users, of the per-user mean over seeds
    per_user: Mapping[str, Interval]  # each user's difference over seeds
    worst_user: Interval  # over seeds, of A's worst user minus B's worst user (each seed's own worst)

    @property
    def verdict(self) -> str:
        return self.seeds.verdict

    def users_significant(self) -> tuple[int, int]:
        """(users significantly higher, users significantly lower), each user's interval over seeds."""
        v = [i.verdict for i in self.per_user.values()]
        return v.count("higher"), v.count("lower")


def paired_difference(a: Accuracies, b: Accuracies, confidence: float = CONFIDENCE) -> PairedDifference:
    seeds, users = common_keys(a, b)
    d = _matrix(a, seeds, users) - _matrix(b, seeds, users)
    worst = _matrix(a, seeds, users).min(axis=1) - _matrix(b, seeds, users).min(axis=1)
    return PairedDifference(
        seeds=t_interval(d.mean(axis=1), confidence),
        users=t_interval(d.mean(axis=0), confidence),
        per_user={u: t_interval(d[:, j], confidence) for j, u in enumerate(users)},
        worst_user=t_interval(worst, confidence),
    )


@dataclass(frozen=True)
class Spread:
    """How one strategy treats its users: the mean, the users by mean accuracy over seeds, the worst ones."""

    mean: Interval  # the mean over users, as an interval over seeds
    per_user: Mapping[str, float]  # mean over seeds, best first
    worst_user: str
    worst_quarter_mean: float  # mean of the ceil(n/4) users with the lowest means
    best_minus_worst: float


def spread(acc: Accuracies, confidence: float = CONFIDENCE) -> Spread:
    seeds = sorted(acc)
    users = sorted(set().union(*(set(acc[s]) for s in seeds)))
    m = _matrix(acc, seeds, users)
    by_user = dict(sorted(zip(users, m.mean(axis=0).tolist(), strict=True), key=lambda kv: -kv[1]))
    ranked = list(by_user.values())
    quarter = max(1, math.ceil(len(users) / 4))
    return Spread(
        mean=t_interval(m.mean(axis=1), confidence) if len(seeds) > 1 else Interval(*(float(m.mean()),) * 3, 1),
        per_user=by_user,
        worst_user=next(reversed(by_user)),
        worst_quarter_mean=float(np.mean(ranked[-quarter:])),
        best_minus_worst=ranked[0] - ranked[-1],
    )
