"""The robust aggregation rules and update bounds of learning/robust.py, as pure functions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.learning import robust
from edge_agent.learning.robust import RobustConfig, StackedUpdates

finite = st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False, width=32)
wild = st.one_of(st.floats(-1e30, 1e30, allow_nan=False), st.sampled_from([1e30, -1e30, 0.0]))


@settings(max_examples=200, deadline=None)
@given(honest=st.lists(st.lists(finite, min_size=3, max_size=3), min_size=3, max_size=12),
       adversarial=st.data(), trim=st.sampled_from([0.1, 0.2, 0.34, 0.45]))
def test_trimmed_mean_stays_within_the_honest_range(honest: list[list[float]], adversarial: st.DataObject,
                                                     trim: float) -> None:
    # With at most trim_count(n) adversarial rows, whatever they hold, every coordinate of the trimmed mean
    # lies between the honest minimum and maximum of that coordinate.
    n_honest = len(honest)
    n_total = n_honest
    while robust.trim_count(n_total + 1, trim) >= n_total + 1 - n_honest:
        n_total += 1
    n_bad = adversarial.draw(st.integers(0, n_total - n_honest))
    while robust.trim_count(n_honest + n_bad, trim) < n_bad:
        n_bad -= 1
    bad = adversarial.draw(st.lists(st.lists(wild, min_size=3, max_size=3), min_size=n_bad, max_size=n_bad))
    stack = np.array(honest + bad, np.float32)
    h = np.array(honest, np.float64)
    got = robust.trimmed_mean(stack, trim)
    assert np.all(got >= h.min(axis=0) - 1e-3) and np.all(got <= h.max(axis=0) + 1e-3)


@settings(max_examples=200, deadline=None)
@given(honest=st.lists(st.lists(finite, min_size=2, max_size=2), min_size=1, max_size=9), data=st.data())
def test_median_stays_within_the_honest_range_with_an_honest_majority(honest: list[list[float]],
                                                                      data: st.DataObject) -> None:
    n_bad = data.draw(st.integers(0, len(honest) - 1))  # fewer adversarial rows than honest ones
    bad = data.draw(st.lists(st.lists(wild, min_size=2, max_size=2), min_size=n_bad, max_size=n_bad))
    h = np.array(honest, np.float64)
    got = robust.coordinate_median(np.array(honest + bad, np.float32))
    assert np.all(got >= h.min(axis=0) - 1e-3) and np.all(got <= h.max(axis=0) + 1e-3)


@settings(max_examples=200, deadline=None)
@given(update=st.lists(wild, min_size=1, max_size=20), bound=st.floats(1e-3, 1e3))
def test_clipping_bounds_the_norm_of_the_change(update: list[float], bound: float) -> None:
    ref = {"w": np.linspace(-1, 1, len(update)).astype(np.float32)}
    clipped, norm = robust.clip_update({"w": np.array(update, np.float32)}, ref, bound)
    assert robust.delta_norm(clipped, ref) <= bound * (1 + 1e-4) + 1e-6
    if norm <= bound:  # within the bound: untouched, bit for bit
        assert np.array_equal(clipped["w"], np.array(update, np.float32))


def test_the_adaptive_bound_follows_the_fleet_within_floor_and_ceiling() -> None:
    cfg = RobustConfig(clip="clip", clip_quantile=0.5, clip_floor=0.1, clip_ceiling=5.0, clip_window=4)
    assert robust.adaptive_bound([], cfg) == 5.0  # no history: the ceiling
    assert robust.adaptive_bound([1.0, 2.0, 3.0], cfg) == 2.0
    assert robust.adaptive_bound([1.0, 1.0, 1.0, 1e30], cfg) == 1.0  # a minority cannot raise the median
    assert robust.adaptive_bound([1e30] * 4, cfg) == 5.0  # nor can a majority pass the ceiling
    assert robust.adaptive_bound([1e-9] * 4, cfg) == 0.1
    assert robust.adaptive_bound([100.0, 1.0, 1.0, 1.0, 1.0], cfg) == 1.0  # only the last clip_window count


def test_server_weights_cap_or_equalize_the_claimed_count() -> None:
    assert RobustConfig(max_examples=1000).weight(2**62) == 1000
    assert RobustConfig(max_examples=1000).weight(400) == 400
    assert RobustConfig(weighting="equal").weight(2**62) == 1
    assert RobustConfig(max_examples=1000).weight(2**62, cap=240) == 240
    assert RobustConfig(max_examples=100).weight(2**62, cap=240) == 100


def test_the_count_cap_follows_the_fleets_median_claim() -> None:
    cfg = RobustConfig(max_examples=10_000, count_factor=4.0, clip_window=5)
    assert robust.count_cap([], cfg) == 10_000  # no history yet: the configured bound
    honest = [393, 665, 646, 716, 657]  # the watch data's natural clients
    assert robust.count_cap(honest, cfg) == 4 * 657
    # Liars who claim the most the server accepts are a minority: the median, and so the cap, barely moves.
    assert robust.count_cap(honest + [10_000, 10_000], cfg) == 4 * 716
    assert robust.count_cap([1, 1, 1], cfg) == 4
    assert robust.count_cap(honest, RobustConfig(count_factor=0)) == 10_000
    assert robust.count_cap([9000] * 3, cfg) == 10_000  # never above max_examples


def test_out_of_range_names_the_tensor() -> None:
    ok = {"a": np.ones(3, np.float32)}
    assert robust.out_of_range(ok, 10.0) is None
    assert "b" in (robust.out_of_range({**ok, "b": np.array([1e30], np.float32)}, 1e4) or "")
    assert "NaN" in (robust.out_of_range({"a": np.array([np.nan], np.float32)}, 1e4) or "")


@pytest.mark.parametrize("rule", ["trimmed-mean", "median"])
def test_stacked_updates_survive_their_durable_form(rule: str) -> None:
    acc = StackedUpdates(rule, 0.2)
    rows = np.random.default_rng(0).normal(size=(7, 2, 3)).astype(np.float32)
    for r in rows:
        acc.add({"w": r}, 1.0)
    again = StackedUpdates.from_arrays(acc.to_arrays())
    assert again.count == 7 and again.rule == rule
    np.testing.assert_array_equal(again.result()["w"], acc.result()["w"])
    want = np.median(rows, axis=0) if rule == "median" else robust.trimmed_mean(rows, 0.2)
    np.testing.assert_allclose(acc.result()["w"], want, rtol=1e-6)


@pytest.mark.parametrize("bad", [dict(rule="mode"), dict(trim_fraction=0.5), dict(count_factor=0.5),
                                 dict(clip="maybe"),
                                 dict(noise_multiplier=1.0), dict(noise_multiplier=1.0, clip="clip"),
                                 dict(clip_floor=2.0, clip_ceiling=1.0)])
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RobustConfig(**bad)  # type: ignore[arg-type]


def test_dp_noise_has_the_announced_scale_and_epsilon_comes_from_the_accountant() -> None:
    pytest.importorskip("dp_accounting")
    from edge_agent.aggregator import privacy
    from edge_agent.learning import dp

    params = {"w": np.zeros(20_000, np.float32), "kept": np.ones(3, np.float32)}
    noisy = dp.add_noise(params, {"w"}, 2.0, 0.5, 10, np.random.default_rng(0))
    assert abs(float(np.std(noisy["w"])) - 0.1) < 0.005  # 2.0 x 0.5 / 10
    assert noisy["kept"] is params["kept"]
    e10, e30 = privacy.epsilon(1.0, 1.0, 10, 1e-5), privacy.epsilon(1.0, 1.0, 30, 1e-5)
    assert 0 < e10 < e30  # the budget grows with rounds
    assert privacy.epsilon(4.0, 1.0, 30, 1e-5) < e30  # and shrinks with noise
    assert privacy.epsilon(1.0, 0.1, 30, 1e-5) < e30  # and with sampling


def test_the_aggregator_table_is_read_and_checked_from_toml() -> None:
    from edge_agent.config import AggregatorConfig, check_toml

    cfg, problems, _ = check_toml('state = "x"\n[aggregator]\nrule = "median"\nclip = "clip"\n', AggregatorConfig,
                                  "agg.toml")
    assert not problems and cfg is not None and cfg.aggregator == RobustConfig(rule="median", clip="clip")
    _, problems, _ = check_toml('state = "x"\n[aggregator]\nrule = "mode"\n', AggregatorConfig, "agg.toml")
    assert problems == ["agg.toml [aggregator]: rule 'mode': choose one of mean, trimmed-mean, median"]
