"""The statistics a claim in the README rests on: paired differences over seeds and users, 95 % t intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_agent.evaluation.stats import Interval, paired_difference, spread, t_interval, t_quantile

USERS = ("u1", "u2", "u3", "u4", "u5", "u6")


def results(base: np.ndarray) -> dict[int, dict[str, float]]:
    """[seed, user] accuracies as the benchmarks record them."""
    return {seed: dict(zip(USERS, row.tolist(), strict=True)) for seed, row in enumerate(base)}


def test_t_interval_matches_the_textbook_formula() -> None:
    v = [1.0, 2.0, 3.0, 4.0, 5.0]
    i = t_interval(v)
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert (i.mean, i.n) == (3.0, 5)
    assert i.low == pytest.approx(3.0 - half, abs=1e-9) and i.high == pytest.approx(3.0 + half, abs=1e-9)
    assert t_quantile(9) == pytest.approx(2.2621571627409915)


def test_an_interval_needs_two_finite_values() -> None:
    with pytest.raises(ValueError, match="at least 2 values"):
        t_interval([0.5])
    with pytest.raises(ValueError, match="not all finite"):
        t_interval([0.5, float("nan"), 0.4])


def test_verdict_says_a_difference_only_where_the_interval_excludes_zero() -> None:
    assert Interval(0.01, 0.002, 0.018, 10).verdict == "higher"
    assert Interval(-0.01, -0.018, -0.002, 10).verdict == "lower"
    assert Interval(0.01, -0.001, 0.021, 10).verdict == "no difference"
    assert Interval(0.012, 0.004, 0.02, 10).points() == "+1.2 [+0.4, +2.0]"


def test_a_consistent_gain_is_higher_and_noise_alone_is_no_difference() -> None:
    rng = np.random.default_rng(0)
    b = rng.uniform(0.7, 0.95, size=(10, len(USERS)))
    gain = paired_difference(results(b + 0.02 + rng.normal(0, 0.005, b.shape)), results(b))
    assert gain.verdict == "higher"
    assert gain.seeds.mean == pytest.approx(0.02, abs=0.003)
    assert gain.users_significant() == (len(USERS), 0)
    noise = paired_difference(results(b + rng.normal(0, 0.01, b.shape)), results(b))
    assert noise.verdict == "no difference"
    assert noise.seeds.low < 0 < noise.seeds.high


def test_the_worst_user_comparison_takes_each_seeds_own_worst_user() -> None:
    b = np.full((4, len(USERS)), 0.9)
    b[:, 0] = [0.5, 0.52, 0.48, 0.5]  # u1 is the worst for B
    a = b.copy()
    a[:, 0] += 0.2  # A lifts u1 to 0.7 ...
    a[:, 1] = [0.6, 0.61, 0.59, 0.6]  # ... but drops u2 to 0.6: A's worst user is u2
    d = paired_difference(results(a), results(b))
    assert d.worst_user.mean == pytest.approx(0.1)
    assert d.per_user["u1"].verdict == "higher" and d.per_user["u2"].verdict == "lower"


def test_results_that_do_not_pair_are_refused() -> None:
    b = results(np.full((3, len(USERS)), 0.8))
    fewer_seeds = {s: v for s, v in b.items() if s != 2}
    with pytest.raises(ValueError, match="different seeds"):
        paired_difference(fewer_seeds, b)
    missing_user = {s: {u: a for u, a in v.items() if not (s == 1 and u == "u3")} for s, v in b.items()}
    with pytest.raises(KeyError, match="seed 1 user 'u3': every user needs a result at every seed; rerun"):
        paired_difference(missing_user, b)
    with pytest.raises(KeyError, match="seed 1 user 'u3'"):
        spread(missing_user)


def test_spread_names_the_worst_user_and_the_worst_quarter() -> None:
    means = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6])
    acc = results(np.tile(means, (5, 1)) + np.linspace(-0.01, 0.01, 5)[:, None])
    s = spread(acc)
    assert s.worst_user == "u6"
    assert s.worst_quarter_mean == pytest.approx((0.7 + 0.6) / 2)  # ceil(6 / 4) = 2 users
    assert s.best_minus_worst == pytest.approx(0.35)
    assert list(s.per_user) == list(USERS)  # best first
    assert s.mean.mean == pytest.approx(means.mean())


def test_p10_is_an_accuracy_that_90_percent_of_clients_reach() -> None:
    from edge_agent.learning.metrics import summarize

    six = [0.9, 0.5, 0.95, 0.8, 0.7, 0.85]
    assert summarize(six)["p10_acc"] == 0.5 == summarize(six)["worst_acc"]  # under 10 clients: the worst one
    twenty = [0.5 + i / 100 for i in range(20)]
    p10 = summarize(twenty)["p10_acc"]
    assert p10 == 0.51  # the ceil(20 / 10) = 2nd lowest
