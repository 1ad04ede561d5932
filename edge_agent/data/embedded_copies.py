"""Augmented copies of a device's labelled windows, embedded by its frozen backbone: what an agent adds to its
training data with `[data] augment_copies` (edge_agent/agent/data_options.py).

The copies are made and embedded a bounded chunk of windows at a time, so the raw copies a device holds at once
stay about `COPIES_PER_EMBED` windows (1.2 MB of 100 x 6 float32), whatever the number of labelled windows;
only their embeddings are kept. The chunks draw from one generator in order, so the same generator state gives
the same copies (but not the copies one `augment_windows` call over every window would draw).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from .augment import AugmentConfig, ChannelGroup, augment_windows, channel_groups_from_names

log = logging.getLogger("edge_fl.agent")

COPIES_PER_EMBED = 512  # raw copies made and embedded at a time

Embed = Callable[[np.ndarray], np.ndarray]


def device_augment_config(copies: int, channel_names: Sequence[str] | None,
                          where: str) -> tuple[AugmentConfig, tuple[ChannelGroup, ...]]:
    """`copies` copies of each labelled window with AugmentConfig's other defaults, and the channels' xyz triplets.

    Windows whose channels hold no xyz triplet (`channel_groups_from_names`) are shifted and scaled only: a
    rotation needs the three axes of one sensor, and a card that names its channels otherwise is still a valid
    card (logged once, naming `where`)."""
    groups = channel_groups_from_names(channel_names or ())
    config = AugmentConfig(copies=copies)
    if not groups and config.max_rotation_deg > 0:
        log.info("%s: no channel names ending in x, y, z (%s): the augmented copies are shifted in time and scaled, "
                 "not rotated", where, ", ".join(channel_names or ()) or "no channel names")
        config = AugmentConfig(copies=copies, max_rotation_deg=0.0)
    return config, groups


def embedded_copies(x: np.ndarray, y: np.ndarray, config: AugmentConfig, rng: np.random.Generator,
                    channel_groups: Sequence[ChannelGroup], embed: Embed) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (float32 (n * copies, dim), unstandardized) and labels of `config.copies` copies of each of the
    windows `x` (n, time, channels) labelled `y`, window-major as `augment_windows` orders them: the copies of
    window i are rows i * copies .. (i + 1) * copies - 1."""
    n, copies = len(x), config.copies
    per_chunk = max(1, COPIES_PER_EMBED // max(copies, 1))
    embedded: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for lo in range(0, n, per_chunk):
        x_aug, y_aug = augment_windows(x[lo: lo + per_chunk], y[lo: lo + per_chunk], config, rng, channel_groups)
        embedded.append(np.asarray(embed(x_aug), np.float32))
        labels.append(y_aug)
        del x_aug  # the raw copies go before the next chunk's are made
    if not embedded:  # no window: no copy, of the embedding's width
        return np.asarray(embed(np.zeros((0, *np.shape(x)[1:]), np.float32)), np.float32), np.asarray(y)[:0].copy()
    return np.concatenate(embedded), np.concatenate(labels)
