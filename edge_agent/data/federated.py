"""The federated view of a dataset: every window embedded once by the frozen backbone, then split into
clients (a partition regime), their later-in-time test windows, and the never-seen users.

What `edge-fl simulate`, the demo's agents (the bundled recordings) and the benchmarks train on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..backbone import EmbeddingCache, FrozenBackbone
from ..learning.features import EmbeddingStandardizer
from ..learning.strategies import ClientData
from .device_client import OFF, DataOptions, device_client_data
from .embedded_copies import Embed
from .partition import BACKBONE_SUBJECTS, CLIENT_SUBJECTS, NEW_USER_SUBJECTS, PartitionConfig, partition_clients
from .watch import WatchDataset
from .windows import WindowConfig, split_and_window


@dataclass(frozen=True)
class FederatedData:
    """Standardized embeddings per client plus the never-seen users, built once per (backbone, regime, seed)."""

    client_ids: tuple[str, ...]
    clients: tuple[ClientData, ...]
    new_user_x: np.ndarray
    new_user_y: np.ndarray
    num_classes: int
    embedding_dim: int
    class_names: tuple[str, ...]
    partition: PartitionConfig


@dataclass(frozen=True)
class Embedded:
    """All windows of the dataset embedded once; partitions are index views on it."""

    train: Any
    test: Any
    train_emb: np.ndarray
    test_emb: np.ndarray
    standardizer: EmbeddingStandardizer
    class_names: tuple[str, ...]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge-fl" / "embeddings"


def embed_dataset(dataset: WatchDataset, backbone: FrozenBackbone, window: WindowConfig = WindowConfig(),
                  cache: EmbeddingCache | None = None) -> Embedded:
    train, test = split_and_window(dataset, window)
    run = cache.embed if cache else (lambda b, x: b.embed(x))
    train_emb, test_emb = run(backbone, train.x), run(backbone, test.x)
    # Statistics from the backbone subjects only: clients and new users never inform them.
    reference = train_emb[np.isin(train.subject, BACKBONE_SUBJECTS)]
    return Embedded(train, test, train_emb, test_emb, EmbeddingStandardizer.fit(reference), dataset.class_names)


def federate(embedded: Embedded, partition: PartitionConfig, options: DataOptions = OFF,
             embed: Embed | None = None) -> FederatedData:
    """One client per client subject under the partition regime, and the new user. `options` (a device's
    `[data] augment_copies` / `per_user_standardization`): each client's data built as the agent on that subject
    builds it (`watch_client_data`): the same windows, statistics and copies, embedded by `embed`; client i
    draws its copies from device stream i, the rng_stream of the demo's agent i."""
    std = embedded.standardizer
    train, test = embedded.train, embedded.test
    splits = partition_clients(train, test, partition, CLIENT_SUBJECTS)
    if options.off:
        clients = tuple(ClientData(std(embedded.train_emb[s.train_idx]), train.y[s.train_idx],
                                   std(embedded.test_emb[s.test_idx]), test.y[s.test_idx]) for s in splits)
    else:
        clients = tuple(device_client_data(
            embedded.train_emb[s.train_idx], train.y[s.train_idx], embedded.test_emb[s.test_idx],
            test.y[s.test_idx], std, replace(options, device=device),
            period=embedded.train_emb[train.subject == s.subject],  # every training window of the subject
            train_windows=train.x[s.train_idx], embed=embed) for device, s in enumerate(splits))
    # A new user has no labels to train on; all of their windows are test windows.
    new_x = np.concatenate([embedded.train_emb[np.isin(train.subject, NEW_USER_SUBJECTS)],
                            embedded.test_emb[np.isin(test.subject, NEW_USER_SUBJECTS)]])
    new_y = np.concatenate([train.y[np.isin(train.subject, NEW_USER_SUBJECTS)],
                            test.y[np.isin(test.subject, NEW_USER_SUBJECTS)]])
    return FederatedData(tuple(s.client_id for s in splits), clients, std(new_x), new_y,
                         len(embedded.class_names), embedded.train_emb.shape[1], embedded.class_names, partition)


def holdout_validation(data: FederatedData, share: float = 0.25) -> FederatedData:
    """The same clients scored on VALIDATION windows: the last `share` of each client's training windows of
    each class (later in time, like the test windows) become its scoring set, and it trains on the rest. Its
    test windows are not in it at all: settings chosen on it (a robust rule's fraction, a learning rate) are
    chosen without looking at the test set. Windows next to the cut overlap in time, so validation scores run
    slightly optimistic; they rank settings, they are not reported as accuracy."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"validation share {share}: must be between 0 and 1")
    clients = []
    for cd in data.clients:
        train, val = [], []
        for label in np.unique(cd.y_train):
            idx = np.flatnonzero(cd.y_train == label)  # in time order within the client
            cut = len(idx) - round(share * len(idx)) if len(idx) > 1 else len(idx)
            train.append(idx[:cut])
            val.append(idx[cut:])
        tr, va = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
        clients.append(ClientData(cd.x_train[tr], cd.y_train[tr], cd.x_train[va], cd.y_train[va]))
    return FederatedData(data.client_ids, tuple(clients), data.new_user_x, data.new_user_y, data.num_classes,
                         data.embedding_dim, data.class_names, data.partition)
