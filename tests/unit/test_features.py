"""Per-user embedding statistics, shrunk towards the population's: hand-worked blends and real embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_agent.learning.features import (
    DEFAULT_PRIOR_WINDOWS,
    EmbeddingStandardizer,
    fit_user_standardizer,
    user_weights,
)

UNIT = EmbeddingStandardizer(np.zeros(2, np.float32), np.ones(2, np.float32))


def user_windows(embedded, subject: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The raw embeddings of one client subject's training windows, in arrival order (no labels)."""
    rows: np.ndarray = embedded.train_emb[embedded.train.subject == subject]
    return rows


@pytest.mark.parametrize(("n", "prior", "weights"), [
    (0, 64.0, (0.0, 0.0)),
    (1, 64.0, (1 / 65, 0.0)),  # one window: a mean, but no spread
    (64, 64.0, (0.5, 63 / 127)),
    (10, 0.0, (1.0, 1.0)),
    (1, 0.0, (1.0, 0.0)),
    (1000, math.inf, (0.0, 0.0)),
])
def test_user_weights_count_the_population_as_prior_windows(n: int, prior: float,
                                                             weights: tuple[float, float]) -> None:
    assert user_weights(n, prior) == pytest.approx(weights)


def test_user_weights_refuse_negative_counts_and_priors() -> None:
    with pytest.raises(ValueError, match="n_windows must be >= 0"):
        user_weights(-1)
    for prior in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="prior_windows must be >= 0"):
            user_weights(5, prior)


def test_a_hand_worked_blend() -> None:
    # user mean (2, 2), variance (ddof 1) (2, 0); prior 2 -> weights 2/4 on the mean, 1/3 on the variance
    user = np.array([[1.0, 2.0], [3.0, 2.0]], np.float32)
    std = fit_user_standardizer(user, UNIT, prior_windows=2.0)
    np.testing.assert_allclose(std.mean, [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(std.std, np.sqrt([1 / 3 * 2 + 2 / 3, 2 / 3]), rtol=1e-6)
    assert std.mean.dtype == std.std.dtype == np.float32


def test_no_windows_or_an_infinite_prior_give_the_population_itself(embedded) -> None:  # type: ignore[no-untyped-def]
    population = embedded.standardizer
    assert fit_user_standardizer(np.zeros((0, 64), np.float32), population) is population
    assert fit_user_standardizer(user_windows(embedded, 4), population, prior_windows=math.inf) is population


def test_without_a_prior_a_user_is_standardized_by_its_own_windows(embedded) -> None:  # type: ignore[no-untyped-def]
    own = user_windows(embedded, 5)
    z = fit_user_standardizer(own, embedded.standardizer, prior_windows=0.0)(own)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0, ddof=1), 1.0, atol=1e-4)


def test_as_many_windows_as_the_prior_meet_the_population_halfway(embedded) -> None:  # type: ignore[no-untyped-def]
    population = embedded.standardizer
    own = user_windows(embedded, 6)[: int(DEFAULT_PRIOR_WINDOWS)]
    std = fit_user_standardizer(own, population)
    halfway = (own.astype(np.float64).mean(axis=0) + population.mean) / 2
    np.testing.assert_allclose(std.mean, halfway, rtol=1e-5, atol=1e-6)
    # the spread lies between the user's and the population's, unit by unit
    user_std = own.astype(np.float64).std(axis=0, ddof=1)
    low, high = np.minimum(user_std, population.std), np.maximum(user_std, population.std)
    assert np.all((std.std >= low * (1 - 1e-5)) & (std.std <= high * (1 + 1e-5)))


def test_the_user_counts_for_more_the_more_windows_it_has(embedded) -> None:  # type: ignore[no-untyped-def]
    population = embedded.standardizer
    own = user_windows(embedded, 7)
    target = own.astype(np.float64).mean(axis=0)
    distances = [float(np.linalg.norm(fit_user_standardizer(np.tile(own, (k, 1)), population).mean - target))
                 for k in (1, 2, 4)]  # the same windows repeated: same user statistics, more of them
    assert distances[0] > distances[1] > distances[2] > 0


def test_a_unit_constant_for_the_user_is_floored(embedded) -> None:  # type: ignore[no-untyped-def]
    own = user_windows(embedded, 8).copy()
    own[:, 0] = 0.25  # this unit never moves for this user
    std = fit_user_standardizer(own, embedded.standardizer, prior_windows=0.0, floor_fraction=0.1)
    assert std.std[0] == pytest.approx(0.1 * float(np.median(std.std)), rel=1e-5)
    assert np.isfinite(std(own)).all()


@pytest.mark.parametrize(("rows", "settings", "complaint"), [
    (np.zeros((5, 63), np.float32), {}, r"must be \(n, 64\) to match the population statistics, got shape \(5, 63\)"),
    (np.zeros(64, np.float32), {}, r"must be \(n, 64\)"),
    (np.full((5, 64), np.nan, np.float32), {}, "hold NaN or infinite values"),
    (np.zeros((5, 64), np.float32), {"prior_windows": -3.0}, "prior_windows must be >= 0"),
    (np.zeros((5, 64), np.float32), {"floor_fraction": 1.0}, r"floor_fraction must be in \[0, 1\)"),
])
def test_bad_input_is_refused(embedded, rows: np.ndarray, settings: dict,  # type: ignore[no-untyped-def,type-arg]
                              complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        fit_user_standardizer(rows, embedded.standardizer, **settings)


def test_the_reference_standardizer_is_unchanged() -> None:
    reference = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]], np.float32)
    std = EmbeddingStandardizer.fit(reference)
    np.testing.assert_allclose(std.mean, [2.0, 1.0])
    # the second unit is constant: floored at 10% of the median spread (median of 1.633 and 0 = 0.816)
    np.testing.assert_allclose(std.std, [np.sqrt(8 / 3), 0.1 * np.sqrt(8 / 3) / 2], rtol=1e-6)
