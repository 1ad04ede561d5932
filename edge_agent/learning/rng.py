"""The fleet's random streams, one named function each.

Every random draw of a federation comes from `numpy.random.default_rng([seed, stream, ...])` with the
fleet's seed, so a simulation and a real fleet with the same seed draw the same numbers wherever they
run: the aggregator, each device (its `rng_stream`), or `edge-fl simulate`, which runs both.
"""

from __future__ import annotations

import numpy as np

_SERVER_INIT, _CLIENT_INIT, _SELECTION, _CLIENT_ROUND, _PERSONALIZE = range(5)


def server_init(seed: int) -> np.random.Generator:
    """The initial global head."""
    return np.random.default_rng([seed, _SERVER_INIT])


def client_init(seed: int, device: int) -> np.random.Generator:
    """A device's initial personal state."""
    return np.random.default_rng([seed, _CLIENT_INIT, device])


def selection(seed: int, round_no: int) -> np.random.Generator:
    """Which devices round `round_no` takes when the fleet trains a fraction of them."""
    return np.random.default_rng([seed, _SELECTION, round_no])


def client_round(seed: int, round_no: int, device: int) -> np.random.Generator:
    """A device's local training in round `round_no`."""
    return np.random.default_rng([seed, _CLIENT_ROUND, round_no, device])


def personalize(seed: int, version: int, device: int) -> np.random.Generator:
    """A device's personalized head under global model `version` (fine-tuning strategies draw here)."""
    return np.random.default_rng([seed, _PERSONALIZE, version, device])
