"""In-process federation: the same strategies and codecs as the MQTT path, without a broker.

Every tensor that crosses the (simulated) network goes through `pack_tensors`/`unpack_tensors`, so the
bytes counted and the int8 rounding are the ones a real deployment sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .backbone import EmbeddingCache, FrozenBackbone
from .codec.tensor_pack import pack_tensors, unpack_tensors
from .data.partition import BACKBONE_SUBJECTS, CLIENT_SUBJECTS, NEW_USER_SUBJECTS, PartitionConfig, partition_clients
from .data.watch import WatchDataset
from .data.windows import WindowConfig, split_and_window
from .learning.features import EmbeddingStandardizer
from .learning.head import HeadConfig, quantize_head
from .learning.metrics import accuracy, summarize
from .learning.strategies import (
    ClientData,
    ClientUpdate,
    ServerState,
    check_client_data,
    make_strategy,
)
from .learning.training import TrainingConfig


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


def federate(embedded: Embedded, partition: PartitionConfig) -> FederatedData:
    std = embedded.standardizer
    splits = partition_clients(embedded.train, embedded.test, partition, CLIENT_SUBJECTS)
    clients = tuple(
        ClientData(std(embedded.train_emb[s.train_idx]), embedded.train.y[s.train_idx],
                   std(embedded.test_emb[s.test_idx]), embedded.test.y[s.test_idx])
        for s in splits
    )
    # A new user has no labels to train on; all of their windows are test windows.
    new_x = np.concatenate([embedded.train_emb[np.isin(embedded.train.subject, NEW_USER_SUBJECTS)],
                            embedded.test_emb[np.isin(embedded.test.subject, NEW_USER_SUBJECTS)]])
    new_y = np.concatenate([embedded.train.y[np.isin(embedded.train.subject, NEW_USER_SUBJECTS)],
                            embedded.test.y[np.isin(embedded.test.subject, NEW_USER_SUBJECTS)]])
    return FederatedData(tuple(s.client_id for s in splits), clients, std(new_x), new_y,
                         len(embedded.class_names), embedded.train_emb.shape[1], embedded.class_names, partition)


Uplink = Callable[[str, int, bytes], None]  # (client id, round, payload) for tests that watch the wire


@dataclass
class _Wire:
    int8: bool
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    watchers: list[Uplink] = field(default_factory=list)

    def up(self, client_id: str, rnd: int, update: ClientUpdate) -> ClientUpdate:
        payload = pack_tensors(update.tensors, int8=self.int8)
        self.uplink_bytes += len(payload)
        for w in self.watchers:
            w(client_id, rnd, payload)
        return ClientUpdate(unpack_tensors(payload), update.num_examples, update.allowed)

    def down(self, params: dict[str, np.ndarray], receivers: int) -> dict[str, np.ndarray]:
        if not params:
            return {}
        payload = pack_tensors(params, int8=self.int8)
        self.downlink_bytes += len(payload) * receivers
        return unpack_tensors(payload)


def run_simulation(data: FederatedData, config: TrainingConfig, *,
                   progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                   watch_uplink: Uplink | None = None,
                   watch_server: Callable[[ServerState], None] | None = None) -> dict[str, Any]:
    """Run `config.rounds` rounds; returns the results document (per-round per-client accuracy + summary)."""
    for cid, cd in zip(data.client_ids, data.clients, strict=True):
        check_client_data(cid, cd, num_classes=data.num_classes, dim=data.embedding_dim)
    head = HeadConfig(data.embedding_dim, data.num_classes, config.adapter_dim)
    strategy = make_strategy(config.strategy, head, config.strategy_config())
    wire = _Wire(config.int8_updates, watchers=[watch_uplink] if watch_uplink else [])
    server = strategy.init_server(np.random.default_rng([config.seed, 0]))
    states = [strategy.init_client(np.random.default_rng([config.seed, 1, i])) for i in range(len(data.clients))]
    sampler = np.random.default_rng([config.seed, 2])
    n_clients = len(data.clients)
    per_round = max(1, round(config.fraction * n_clients))
    rounds: list[dict[str, Any]] = []
    for rnd in range(1, config.rounds + 1):
        up0, down0 = wire.uplink_bytes, wire.downlink_bytes
        chosen = sorted(sampler.choice(n_clients, size=per_round, replace=False).tolist())
        broadcast = replace(server, params=wire.down(server.params, len(chosen)))
        updates = []
        for i in chosen:
            states[i], update = strategy.client_round(broadcast, states[i], data.clients[i],
                                                      np.random.default_rng([config.seed, 3, rnd, i]))
            if update is not None:
                updates.append(wire.up(data.client_ids[i], rnd, update))
        server = strategy.aggregate(server, updates)
        if watch_server:
            watch_server(server)
        # Every device runs the int8 twin of its personalized head: that is what we score.
        view = replace(server, params=wire.down(server.params, 0))
        client_acc = {}
        for i, cd in enumerate(data.clients):
            personal = strategy.personalized(view, states[i], cd, np.random.default_rng([config.seed, 4, rnd, i]))
            client_acc[data.client_ids[i]] = accuracy(quantize_head(personal).predict(cd.x_test), cd.y_test)
        new_head = strategy.new_user_head(view)
        new_acc = accuracy(quantize_head(new_head).predict(data.new_user_x), data.new_user_y) if new_head else None
        record = {"round": rnd, "client_acc": client_acc, **summarize(list(client_acc.values())),
                  "new_user_acc": new_acc, "clients_reporting": len(updates),
                  "uplink_bytes": wire.uplink_bytes - up0, "downlink_bytes": wire.downlink_bytes - down0}
        rounds.append(record)
        if progress:
            progress(rnd, config.rounds, record)
    last = rounds[-1]
    summary = {k: last[k] for k in ("mean_acc", "p10_acc", "worst_acc", "new_user_acc")}
    summary["uplink_bytes_per_client_round"] = wire.uplink_bytes / (config.rounds * per_round)
    summary["downlink_bytes_per_client_round"] = wire.downlink_bytes / (config.rounds * per_round)
    return {
        "config": asdict(config),
        "partition": asdict(data.partition),
        "clients": [{"id": cid, "n_train": int(cd.y_train.size), "n_test": int(cd.y_test.size)}
                    for cid, cd in zip(data.client_ids, data.clients, strict=True)],
        "shared_tensors": sorted(strategy.shared_keys),
        "rounds": rounds,
        "summary": summary,
    }
