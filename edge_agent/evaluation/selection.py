"""How a setting is chosen on validation results: screen on a few seeds, choose among the best few on fresh seeds, and
never pick one that is clearly worse than a baseline in some regime.

A result here is a "cell": the mean validation accuracy of one configuration in one (regime, seed), keyed
"regime/seed". Everything is pure: bench/tune.py runs the federations and hands the cells over.

Why floors as well as the mean. A fleet does not know its regime in advance, so one configuration per strategy is
chosen on the mean over regimes; but a configuration that wins the mean by a few tenths while failing at one of
its promises in one regime is a bad choice. A floor rules a configuration out when it is significantly worse than
a tuned baseline on one measure by more than a margin, in some regime: the 95 % interval of (candidate -
baseline), paired over the seeds both ran, lies wholly below -margin. This is not a non-inferiority test (that
would ask the candidate to PROVE it is within the margin, which three seeds rarely can): a candidate is ruled out
only on evidence. bench/tune.py holds every strategy's personalized accuracy to tuned local training, and the
head a strategy gives a NEW user (its global head) to tuned FedAvg's: with five labels per class, a learning
rate low enough to leave the personal heads fine can leave that global head near chance, which the personalized
mean alone never shows.

The margin (one point) keeps a consistent but negligible gap from ruling out everything. Where every seed gives
the same validation score (a regime whose draws change nothing, such as HAPT natural), the interval has no width
and a breach means a gap of more than the margin; the error of the fixed validation windows themselves is not
in it (one point is about nine of HAPT's 868 validation windows). A collapse on one seed of three widens the
interval rather than breaching it: it shows in the mean instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from edge_agent.evaluation.stats import CONFIDENCE, Interval, t_interval

Cells = Mapping[str, float]  # "regime/seed" -> validation accuracy in [0, 1]

FLOOR_MARGIN = 0.01


def cell_key(regime: str, seed: int) -> str:
    return f"{regime}/{seed}"


def split_key(key: str) -> tuple[str, int]:
    regime, _, seed = key.rpartition("/")
    return regime, int(seed)


def mean_over_regimes(cells: Cells) -> float:
    """The mean over regimes of each regime's mean over seeds: every regime weighs the same, whatever its seeds."""
    by_regime: dict[str, list[float]] = {}
    for key, value in cells.items():
        by_regime.setdefault(split_key(key)[0], []).append(value)
    if not by_regime:
        raise ValueError("no validation result to score")
    return float(np.mean([np.mean(v) for v in by_regime.values()]))


def floor_breaches(cells: Cells, floor: Cells, margin: float = FLOOR_MARGIN) -> dict[str, Interval]:
    """Regimes where `cells` is significantly below `floor` by more than `margin`: the paired difference over
    the seeds both ran, its 95 % interval wholly below -margin. Regimes with fewer than 2 shared seeds cannot be
    tested and are not reported."""
    shared: dict[str, list[float]] = {}
    for key in sorted(set(cells) & set(floor)):
        shared.setdefault(split_key(key)[0], []).append(cells[key] - floor[key])
    return {regime: interval for regime, diffs in shared.items() if len(diffs) >= 2
            and (interval := t_interval(diffs)).high < -margin}


@dataclass(frozen=True)
class Floor:
    """One promise a candidate must keep: its `cells` on some measure not significantly below `floor`'s."""

    what: str  # e.g. "personal heads vs local"
    cells: Cells
    floor: Cells


@dataclass(frozen=True)
class Choice:
    """The configuration chosen (its index in the candidates), and why."""

    index: int
    score: float
    ruled_out: dict[int, dict[str, Interval]] = field(default_factory=dict)  # candidate -> "what: regime" breaches
    all_below_floor: bool = False

    def describe(self, names: Sequence[str]) -> list[str]:
        lines = [f"{names[i]}: " + "; ".join(f"{k} {iv.points()}" for k, iv in breaches.items())
                 for i, breaches in self.ruled_out.items()]
        if self.all_below_floor:
            lines.append("every candidate breaks a floor somewhere: the one nearest its floors is kept")
        return lines


def breaches(floors: Sequence[Floor], margin: float = FLOOR_MARGIN) -> dict[str, Interval]:
    return {f"{f.what}, {regime}": interval for f in floors
            for regime, interval in floor_breaches(f.cells, f.floor, margin).items()}


def choose(candidates: Sequence[Cells], floors: Sequence[Sequence[Floor]] | None = None,
           margin: float = FLOOR_MARGIN) -> Choice:
    """The candidate with the best mean over regimes among those that keep all their floors (`floors[i]`: the
    candidate i's; none: every candidate is eligible). If none keeps them, the one that misses them least (its
    worst breach's mean nearest the floor), flagged: the report must then say so rather than pretend. Not
    the best mean: that would hand the choice back to the candidate the floors exist to stop."""
    if not candidates:
        raise ValueError("no candidate to choose from")
    if floors is not None and len(floors) != len(candidates):
        raise ValueError(f"{len(floors)} floor lists for {len(candidates)} candidates")
    scores = [mean_over_regimes(c) for c in candidates]
    ruled_out = {i: found for i, fs in enumerate(floors or []) if (found := breaches(fs, margin))}
    pool = [i for i in range(len(candidates)) if i not in ruled_out]
    if pool:
        best = max(pool, key=lambda i: (scores[i], -i))  # ties: the earlier candidate
    else:  # the least bad: the candidate whose worst breach is nearest the floor, then the best mean
        best = max(ruled_out, key=lambda i: (min(iv.mean for iv in ruled_out[i].values()), scores[i], -i))
    return Choice(best, scores[best], ruled_out, all_below_floor=not pool)


def finalists(candidates: Sequence[Cells], count: int) -> list[int]:
    """The `count` best candidates by mean over regimes on the screening seeds, best first (ties: earlier)."""
    order = sorted(range(len(candidates)), key=lambda i: (-mean_over_regimes(candidates[i]), i))
    return order[:max(1, count)]


def per_dataset_seed(cells: Mapping[str, Cells]) -> dict[str, float]:
    """One configuration's cells on several datasets (dataset -> cells), as the mean over regimes per (dataset,
    seed): the regimes of one seed share that seed's luck, so they are averaged, not counted as pairs."""
    out = {}
    for name, dataset_cells in cells.items():
        for seed in sorted({split_key(k)[1] for k in dataset_cells}):
            out[f"{name}/{seed}"] = float(np.mean([v for k, v in dataset_cells.items() if split_key(k)[1] == seed]))
    return out


def choose_default(incumbent: str, eligible: Sequence[str], means: Mapping[str, float],
                   cells: Mapping[str, Mapping[str, Cells]]) -> tuple[str, dict[str, object]]:
    """The default strategy among `eligible` (those that may be one: they give a new user a head and keep their
    floors), from their `means` and their chosen configurations' `cells` (strategy -> dataset -> cells). The
    `incumbent` stays unless:
    - it is not eligible any more: the best eligible replaces it;
    - the best eligible beats it significantly: the paired difference per (dataset, seed), a t interval at a
      Bonferroni-corrected level for the number of challengers (the best was picked among them on the same
      cells), that excludes zero. A change of default is a change for every fleet, not worth a difference the
      tuning seeds cannot tell from noise."""
    if not eligible:
        return incumbent, {"challenger": None, "text": f"no strategy keeps its floors: {incumbent} stays"}
    best = max(eligible, key=lambda s: (means[s], s == incumbent))
    if incumbent not in eligible:
        return best, {"challenger": best, "text": f"{incumbent} breaks a floor: {best} replaces it"}
    if best == incumbent:
        return best, {"challenger": None, "text": "the best validation mean among the eligible strategies"}
    a, b = per_dataset_seed(cells[best]), per_dataset_seed(cells[incumbent])
    if set(a) != set(b):
        raise ValueError(f"{best} and {incumbent} were tuned on other (dataset, seed) pairs: "
                         f"{sorted(set(a) ^ set(b))}; tune both on the same datasets and seeds")
    challengers = len(eligible) - 1
    confidence = 1 - (1 - CONFIDENCE) / challengers
    interval = t_interval([a[k] - b[k] for k in sorted(a)], confidence=confidence)
    moved = interval.low > 0
    text = (f"{best} has the best validation mean among the eligible strategies, {interval.points()} points "
            f"against {incumbent} over {interval.n} paired (dataset, seed) means ({100 * confidence:.1f} % "
            f"interval, {challengers} challengers): "
            + ("significant, it becomes the default" if moved else "no significant difference, the default stays"))
    return (best if moved else incumbent), {"challenger": best, "difference": asdict(interval), "text": text}
