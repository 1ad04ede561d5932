"""Standardize embeddings with statistics from the backbone subjects, never from client data; or, on a device,
with its own user's statistics shrunk towards those (`fit_user_standardizer`).

An embedding unit that is nearly constant on the reference data would get a tiny standard deviation
and be blown up into huge values on a stranger's data; the int8 head's per-row activation scale would
then be set by that one unit and every other unit would round to zero. The floor prevents it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EmbeddingStandardizer:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, reference: np.ndarray, floor_fraction: float = 0.1) -> EmbeddingStandardizer:
        """`floor_fraction` of the median unit spread is the smallest std any unit may have."""
        mean = reference.mean(axis=0)
        std = reference.std(axis=0)
        floor = max(float(np.median(std)) * floor_fraction, 1e-6)
        return cls(mean.astype(np.float32), np.maximum(std, floor).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z: np.ndarray = ((x - self.mean) / self.std).astype(np.float32)
        return z


# --- per-user statistics ------------------------------------------------------------------------------
# A device can standardize with its own user's statistics: the windows it has embedded, labelled or not
# (labels are never read), say where this user's embeddings sit and how far they spread. With few windows
# those statistics are noisy, and biased towards whatever the user did first (a handful of windows may all
# come from one activity), so they are blended with the population's as if the population had contributed
# `prior_windows` windows of its own: weight n / (n + prior) on the user's mean, (n - 1) / (n - 1 + prior)
# on the user's variance (n - 1 degrees of freedom: one window says nothing about spread).

DEFAULT_PRIOR_WINDOWS = 64.0  # see `fit_user_standardizer`


def user_weights(n_windows: int, prior_windows: float = DEFAULT_PRIOR_WINDOWS) -> tuple[float, float]:
    """(weight of the user's mean, weight of the user's variance) for n of the user's windows; the population's
    weights are one minus these. prior_windows = 0: the user's own statistics as soon as they exist (the mean
    from 1 window, the variance from 2); math.inf: always the population's."""
    if n_windows < 0:
        raise ValueError(f"n_windows must be >= 0, got {n_windows}")
    if not prior_windows >= 0:  # also refuses NaN
        raise ValueError(f"prior_windows must be >= 0 (math.inf = population statistics only), got {prior_windows}")
    if math.isinf(prior_windows):
        return 0.0, 0.0
    mean_w = n_windows / (n_windows + prior_windows) if n_windows > 0 else 0.0
    dof = n_windows - 1
    var_w = dof / (dof + prior_windows) if dof > 0 else 0.0
    return mean_w, var_w


def fit_user_standardizer(user_embeddings: np.ndarray, population: EmbeddingStandardizer, *,
                          prior_windows: float = DEFAULT_PRIOR_WINDOWS,
                          floor_fraction: float = 0.1) -> EmbeddingStandardizer:
    """Standardize with this user's statistics, shrunk towards the population's when the user has few windows.

    user_embeddings: (n, dim) embeddings of the user's own windows, unlabelled (no labels are taken, so none
    can leak in); n = 0 gives `population` itself. population: the reference statistics (the backbone sidecar's,
    `FrozenBackbone.embedding_standardizer()`, or `EmbeddingStandardizer.fit` on reference embeddings).

    mean = a * user mean + (1 - a) * population mean, var = b * user var (ddof 1) + (1 - b) * population std^2,
    (a, b) = `user_weights(n, prior_windows)`; then the same floor as `EmbeddingStandardizer.fit`
    (`floor_fraction` of the median std).

    The default prior, 64 windows (half a minute of 2 s windows at a 0.5 s stride), gives the user's statistics
    half the say at 64 windows. Fewer come from one or two bouts of one activity (and overlapping windows of a
    bout are far from independent), so their mean is that activity's, not the user's. Measured with a head
    trained on 1-5 labelled windows per class (watch clients 4-9 and HAPT users 16-25, 5 draws each): the first
    16 windows a user recorded, unshrunk (prior 0), cost 3-8 points on the watch and 7-15 on HAPT against the
    population statistics; with prior 64 they cost at most 0.3. All of a user's windows (250-700) with prior 64
    gave -0.3 to +0.7 points on the watch and -0.3 to -0.4 on HAPT, as without shrinkage.
    """
    x = np.asarray(user_embeddings)
    dim = population.mean.shape[0]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"user embeddings must be (n, {dim}) to match the population statistics, got shape "
                         f"{x.shape}")
    if not 0.0 <= floor_fraction < 1.0:
        raise ValueError(f"floor_fraction must be in [0, 1), got {floor_fraction}")
    mean_w, var_w = user_weights(x.shape[0], prior_windows)
    if mean_w == 0.0 and var_w == 0.0:
        return population
    x64 = x.astype(np.float64)
    if not np.isfinite(x64).all():
        raise ValueError("user embeddings hold NaN or infinite values: embed the windows again, or drop those rows")
    pop_mean = population.mean.astype(np.float64)
    pop_var = population.std.astype(np.float64) ** 2
    user_mean = x64.mean(axis=0)
    user_var = x64.var(axis=0, ddof=1) if x.shape[0] > 1 else pop_var
    mean = mean_w * user_mean + (1.0 - mean_w) * pop_mean
    std = np.sqrt(var_w * user_var + (1.0 - var_w) * pop_var)
    floor = max(float(np.median(std)) * floor_fraction, 1e-6)
    return EmbeddingStandardizer(mean.astype(np.float32), np.maximum(std, floor).astype(np.float32))
