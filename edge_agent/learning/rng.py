"""The fleet's random streams, one named function each.

Every random draw of a federation comes from `numpy.random.default_rng([seed, stream, ...])` with the
fleet's seed, so a simulation and a real fleet with the same seed draw the same numbers wherever they
run: the aggregator, each device (its `rng_stream`), or `edge-fl simulate`, which runs both.
"""

from __future__ import annotations

import numpy as np

_SERVER_INIT, _CLIENT_INIT, _SELECTION, _CLIENT_ROUND, _PERSONALIZE, _AUGMENT = range(6)


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


def augment(seed: int, device: int, item: int = 0) -> np.random.Generator:
    """The perturbations of a device's augmented copies of its labelled windows (edge_agent/data/augment.py).

    A stream of its own: switching augmentation on or off, or changing how many copies, shifts no other draw.
    `item` tells apart what a device augments at different times: 0 for data built once (a dataset source),
    a number derived from a file's content for each file a file source takes in (the same file always gets the
    same copies, whatever arrived before it and however often the agent restarted)."""
    return np.random.default_rng([seed, _AUGMENT, device, item])
