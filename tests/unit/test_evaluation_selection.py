"""The choice rule of bench/tune.py: mean over regimes, the finalists, and the floor against the baseline."""

from __future__ import annotations

import pytest

from edge_agent.evaluation.selection import (
    FLOOR_MARGIN,
    Floor,
    cell_key,
    choose,
    choose_default,
    finalists,
    floor_breaches,
    mean_over_regimes,
    per_dataset_seed,
    split_key,
)

SEEDS = (100, 101, 102, 103, 104)


def cells(**per_regime: float | list[float]) -> dict[str, float]:
    """One accuracy per (regime, seed): a number for every seed, or one per seed."""
    out: dict[str, float] = {}
    for regime, value in per_regime.items():
        values = value if isinstance(value, list) else [value] * len(SEEDS)
        out.update({cell_key(regime.replace("_", "-"), s): v for s, v in zip(SEEDS, values, strict=True)})
    return out


def test_cell_keys_round_trip_with_dashes_in_the_regime() -> None:
    assert split_key(cell_key("label-skew", 103)) == ("label-skew", 103)


def test_every_regime_weighs_the_same_whatever_its_number_of_seeds() -> None:
    c = {"natural/100": 0.9, "natural/101": 0.9, "natural/102": 0.9, "few-shot/100": 0.5}
    assert mean_over_regimes(c) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="no validation result"):
        mean_over_regimes({})


def test_finalists_are_the_best_by_mean_and_ties_keep_the_earlier() -> None:
    scored = [cells(natural=0.90), cells(natural=0.95), cells(natural=0.90), cells(natural=0.97)]
    assert finalists(scored, 3) == [3, 1, 0]
    assert finalists(scored, 0) == [3]


def test_a_consistent_gap_beyond_the_margin_breaches_the_floor() -> None:
    floor = cells(natural=0.94, few_shot=[0.93, 0.94, 0.92, 0.93, 0.94])
    under = cells(natural=0.94, few_shot=[0.80, 0.82, 0.79, 0.81, 0.80])
    breaches = floor_breaches(under, floor)
    assert list(breaches) == ["few-shot"]
    assert breaches["few-shot"].high < -FLOOR_MARGIN
    assert breaches["few-shot"].n == len(SEEDS)


def test_a_consistent_gap_within_the_margin_and_a_noisy_gap_do_not() -> None:
    floor = cells(natural=0.937, few_shot=0.93)
    # every seed 0.2 points under (a deterministic regime): below, but by less than the margin
    assert floor_breaches(cells(natural=0.935, few_shot=0.93), floor) == {}
    # one seed of five collapses: the mean suffers, the paired interval still reaches zero
    assert floor_breaches(cells(natural=0.937, few_shot=[0.93, 0.93, 0.93, 0.93, 0.75]), floor) == {}


def test_only_seeds_both_ran_are_paired() -> None:
    floor = {"few-shot/100": 0.9, "few-shot/101": 0.9}
    assert floor_breaches({"few-shot/100": 0.5}, floor) == {}  # one shared seed: nothing to test
    assert list(floor_breaches({"few-shot/100": 0.5, "few-shot/101": 0.5, "few-shot/999": 1.0}, floor)) == ["few-shot"]


def test_choose_takes_the_best_mean_among_those_that_keep_the_floor() -> None:
    floor = cells(natural=0.94, few_shot=0.93)
    best_mean_but_fragile = cells(natural=0.999, few_shot=[0.88, 0.89, 0.87, 0.88, 0.89])  # mean 0.9405
    steady = cells(natural=0.94, few_shot=0.93)  # mean 0.935
    weaker = cells(natural=0.93, few_shot=0.925)
    assert choose([best_mean_but_fragile, weaker, steady]).index == 0  # the mean alone would take it
    candidates = [best_mean_but_fragile, weaker, steady]
    pick = choose(candidates, [[Floor("personal vs local", c, floor)] for c in candidates])
    assert pick.index == 2
    assert pick.score == pytest.approx(0.935)
    assert list(pick.ruled_out) == [0] and not pick.all_below_floor
    assert pick.describe(["fragile", "weaker", "steady"])[0] == "fragile: personal vs local, few-shot -4.8 [-5.8, -3.8]"


def test_a_candidate_must_keep_every_floor_it_has() -> None:
    local, fedavg_global = cells(few_shot=0.93), cells(few_shot=0.91)
    personal_fine_global_broken = (cells(few_shot=0.96), cells(few_shot=[0.37, 0.40, 0.02, 0.30, 0.25]))
    both_fine = (cells(few_shot=0.94), cells(few_shot=[0.92, 0.93, 0.97, 0.91, 0.92]))
    floors = [[Floor("personal", p, local), Floor("global", g, fedavg_global)]
              for p, g in (personal_fine_global_broken, both_fine)]
    pick = choose([personal_fine_global_broken[0], both_fine[0]], floors)
    assert pick.index == 1
    assert list(pick.ruled_out[0]) == ["global, few-shot"]
    with pytest.raises(ValueError, match="2 floor lists for 1 candidates"):
        choose([both_fine[0]], floors)


def test_when_every_candidate_breaches_the_one_nearest_its_floor_is_kept_and_flagged() -> None:
    floor = cells(natural=0.97, dirichlet=0.97, label_skew=0.97, few_shot=0.95)
    slightly_under = cells(natural=0.955, dirichlet=0.97, label_skew=0.97, few_shot=0.95)  # 1.5 points in one regime
    far_under_best_mean = cells(natural=1.0, dirichlet=1.0, label_skew=1.0, few_shot=0.87)  # 8 points
    assert mean_over_regimes(far_under_best_mean) > mean_over_regimes(slightly_under)
    candidates = [far_under_best_mean, slightly_under]
    pick = choose(candidates, [[Floor("personal", c, floor)] for c in candidates])
    assert pick.index == 1 and pick.all_below_floor
    assert set(pick.ruled_out) == {0, 1}
    assert pick.describe(["a", "b"])[-1].startswith("every candidate breaks a floor")


def test_ties_keep_the_earlier_candidate_the_defaults() -> None:
    assert choose([cells(natural=0.9), cells(natural=0.9)]).index == 0
    with pytest.raises(ValueError, match="no candidate"):
        choose([])


def test_per_dataset_seed_averages_the_regimes_of_one_seed() -> None:
    got = per_dataset_seed({"hapt": {"natural/100": 0.9, "few-shot/100": 0.7, "natural/101": 1.0,
                                     "few-shot/101": 0.8}, "watch": {"natural/100": 0.5, "few-shot/100": 0.5}})
    assert got == pytest.approx({"hapt/100": 0.8, "hapt/101": 0.9, "watch/100": 0.5})


def test_the_default_moves_only_on_a_significant_lead_or_a_broken_floor() -> None:
    def on_both(values: list[float]) -> dict[str, dict[str, float]]:
        return {d: {cell_key("natural", s): v for s, v in zip(SEEDS, values, strict=True)} for d in ("a", "b")}

    steady = on_both([0.90, 0.91, 0.90, 0.92, 0.91])
    clearly_better = on_both([0.95, 0.96, 0.95, 0.97, 0.96])
    noisy_better = on_both([0.99, 0.85, 0.97, 0.88, 0.99])
    means = {"ditto": 0.908, "ncm": 0.958, "fedavg": 0.936}
    cells = {"ditto": steady, "ncm": clearly_better, "fedavg": noisy_better}
    default, why = choose_default("ditto", ["ditto", "ncm", "fedavg"], means, cells)
    assert default == "ncm" and "significant, it becomes the default" in str(why["text"])
    assert "97.5 % interval, 2 challengers" in str(why["text"])  # Bonferroni for the two challengers
    default, why = choose_default("ditto", ["ditto", "fedavg"], means, cells)
    assert default == "ditto" and why["challenger"] == "fedavg" and "the default stays" in str(why["text"])
    default, why = choose_default("ditto", ["fedavg"], means, cells)  # ditto broke a floor
    assert default == "fedavg" and "ditto breaks a floor" in str(why["text"])
    assert choose_default("ditto", [], means, cells)[0] == "ditto"
    with pytest.raises(ValueError, match="other \\(dataset, seed\\) pairs"):
        choose_default("ditto", ["ditto", "ncm"], means, {"ditto": steady, "ncm": {"a": clearly_better["a"]}})
