"""One device's ClientData with its data options applied (`[data] augment_copies`, `[data] per_user_standardization`;
resolved per source by edge_agent/agent/data_options.py), as edge_agent/evaluation/protocol.py `federate_phase`
applies them in the benchmarks:

- per-user standardization: statistics of the user's whole training period, unlabelled (no label is read, so
  in few-shot regimes every training-period window counts, labelled or not), shrunk towards the population's
  (`fit_user_standardizer`); the training and the test windows are standardized with them;
- augmentation: copies of the client's labelled TRAINING windows (after the partition; never of a test window),
  embedded by the same backbone and standardized like the originals, after them in the training set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..learning import rng
from ..learning.features import EmbeddingStandardizer, fit_user_standardizer
from ..learning.strategies import ClientData
from .augment import AugmentConfig, ChannelGroup
from .embedded_copies import Embed, embedded_copies


@dataclass(frozen=True)
class DataOptions:
    """What a device does with its labelled windows before training; `augment` None: no copies."""

    augment: AugmentConfig | None = None
    channel_groups: tuple[ChannelGroup, ...] = ()  # the windows' xyz triplets, rotated alike in a copy
    per_user_standardization: bool = False
    seed: int = 0  # [data] seed
    device: int = 0  # the agent's rng_stream

    @property
    def off(self) -> bool:
        return self.augment is None and not self.per_user_standardization

    def rng(self, item: int = 0) -> np.random.Generator:
        """The copies' own stream (`rng.augment`): drawing from it shifts no other draw of the device."""
        return rng.augment(self.seed, self.device, item)


OFF = DataOptions()


def device_client_data(labelled: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray,
                       population: EmbeddingStandardizer, options: DataOptions, *, period: np.ndarray | None = None,
                       train_windows: np.ndarray | None = None, embed: Embed | None = None) -> ClientData:
    """The ClientData of a client's labelled training windows and test windows, given as unstandardized
    embeddings (`labelled`, `test`), under `options`.

    period: the unstandardized embeddings of the user's whole training period (per-user standardization);
    train_windows: the raw windows of `labelled`, in its order, and `embed` the backbone that embedded them
    (augmentation)."""
    own = population
    if options.per_user_standardization:
        if period is None:
            raise ValueError("per-user standardization needs the embeddings of the user's training period")
        own = fit_user_standardizer(period, population)
    x_train, y = own(labelled), y_train
    if options.augment is not None:
        if train_windows is None or embed is None:
            raise ValueError("augmentation needs the labelled raw windows and the backbone that embeds them")
        copies, y_copies = embedded_copies(train_windows, y_train, options.augment, options.rng(),
                                           options.channel_groups, embed)
        x_train, y = np.concatenate([x_train, own(copies)]), np.concatenate([y, y_copies])
    return ClientData(x_train, y, own(test), y_test)
