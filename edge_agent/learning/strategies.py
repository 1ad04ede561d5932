"""Federated strategies as pure code: the same objects run in `edge-fl simulate` and over MQTT.

A strategy decides three things: which head tensors leave the device (`shared_keys`), how a client
trains in a round, and how the server folds the uploads into the next global tensors. Everything a
strategy keeps in `ClientState.personal` stays on the device by construction: `client_round` returns
an update holding only shared tensors, and `ClientUpdate` refuses anything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .aggregate import Sum, WeightedMean
from .head import ADAPTER_KEYS, CLASSIFIER_KEYS, FitConfig, HeadConfig, Params, features, fit, init_params


@dataclass(frozen=True)
class ClientData:
    """One client's standardized embeddings. Only `x_train`/`y_train` are used for training."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class ClientDataError(ValueError):
    """A client's data cannot be trained on; the message names the client and what is wrong."""


def check_client_data(client_id: str, data: ClientData, *, num_classes: int, dim: int) -> None:
    """Refuse, before any training, data that would fail deep inside numpy or silently poison the fleet.

    One NaN feature makes one client's update NaN, and a NaN in a weighted mean makes the global head
    NaN for everyone: the MQTT path rejects such an update at the aggregator, and this check stops it
    at its source, in `simulate` and on a device.
    """
    where = f"client {client_id!r}"
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        if x.ndim != 2 or x.shape[1] != dim:
            raise ClientDataError(f"{where}: {split} features have shape {x.shape}, expected (n, {dim})")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ClientDataError(f"{where}: {x.shape[0]} {split} examples but labels of shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ClientDataError(f"{where}: {split} labels are {y.dtype}, expected integers")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            bad = np.flatnonzero((y < 0) | (y >= num_classes))
            raise ClientDataError(f"{where}: {bad.size} {split} label(s) outside 0..{num_classes - 1} "
                                  f"(first at index {bad[0]}: {y[bad[0]]})")
        finite = np.isfinite(x)
        if not finite.all():
            rows = np.flatnonzero(~finite.all(axis=1))
            raise ClientDataError(f"{where}: {rows.size} {split} example(s) with NaN or infinite features "
                                  f"(first at index {rows[0]}); clean or drop them before training")
    if data.y_train.size == 0:
        raise ClientDataError(f"{where}: no training examples")


@dataclass(frozen=True)
class StrategyConfig:
    fit: FitConfig = field(default_factory=lambda: FitConfig(epochs=1))
    finetune_epochs: int = 5  # fedavg-ft / ncm: local epochs on top of the global head before use
    fedrep_head_epochs: int = 5  # fedrep: classifier epochs (body frozen) before the body epoch(s)
    # ditto: pull of the personal head towards the global one (on the summed squared distance of ~2,300 weights)
    ditto_lambda: float = 0.005


@dataclass(frozen=True)
class ClientState:
    """What a device keeps between rounds. `personal` never leaves it."""

    personal: Params = field(default_factory=dict)
    rounds_done: int = 0


@dataclass(frozen=True)
class ClientUpdate:
    """What leaves the device in a round: shared tensors only, and the example count used as weight."""

    tensors: dict[str, np.ndarray]
    num_examples: int
    allowed: frozenset[str]

    def __post_init__(self) -> None:
        leaked = set(self.tensors) - self.allowed
        if leaked:
            raise ValueError(f"update would send tensors {sorted(leaked)} that the strategy keeps personal")


@dataclass(frozen=True)
class ClientFailure:
    """A client that did not report (dropped, timed out, rejected); an input to aggregation, not an exception."""

    client_id: str
    reason: str


@dataclass(frozen=True)
class ServerState:
    version: int  # the global model version these params are (0 = initial; +1 per successful round)
    params: Params  # the global (shared) tensors broadcast to clients
    reported: int = 0
    failed: int = 0


class Strategy(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, head: HeadConfig, config: StrategyConfig = StrategyConfig()) -> None:
        self.head = head
        self.config = config

    # --- which tensors leave the device -------------------------------------------------------
    @property
    @abstractmethod
    def shared_keys(self) -> frozenset[str]:
        """Every tensor name that may ever leave the device under this strategy."""

    @property
    def personal_keys(self) -> frozenset[str]:
        return frozenset(self.head.keys) - self.shared_keys

    # --- server -------------------------------------------------------------------------------
    def init_server(self, rng: np.random.Generator) -> ServerState:
        full = init_params(self.head, rng)
        return ServerState(0, {k: v for k, v in full.items() if k in self.shared_keys})

    # Aggregation streams: one update at a time into an accumulator whose state is a few arrays, so
    # memory does not grow with the number of clients and an aggregator can store it durably.
    def start_aggregation(self, server: ServerState) -> WeightedMean:
        return WeightedMean()

    def add_update(self, server: ServerState, acc: WeightedMean, update: ClientUpdate) -> None:
        acc.add(update.tensors, update.num_examples)

    def finish_aggregation(self, server: ServerState, acc: WeightedMean,
                           failures: Sequence[ClientFailure] = ()) -> ServerState:
        """Example-weighted mean of the shared tensors; with no update the global tensors stay as they are."""
        params = dict(server.params)
        if acc.count:
            params.update(acc.result())
        return ServerState(server.version + 1, params, acc.count, len(failures))

    def aggregate(self, server: ServerState, updates: Sequence[ClientUpdate],
                  failures: Sequence[ClientFailure] = ()) -> ServerState:
        acc = self.start_aggregation(server)
        for u in updates:
            self.add_update(server, acc, u)
        return self.finish_aggregation(server, acc, failures)

    def upload_shapes(self, server: ServerState) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor a client uploads in the round that trains from `server`."""
        return {k: shape for k, shape in self.head.shapes.items() if k in self.shared_keys}

    # --- client -------------------------------------------------------------------------------
    def init_client(self, rng: np.random.Generator) -> ClientState:
        full = init_params(self.head, rng)
        return ClientState({k: v for k, v in full.items() if k in self.personal_keys})

    @abstractmethod
    def client_round(self, server: ServerState, state: ClientState, data: ClientData,
                     rng: np.random.Generator) -> tuple[ClientState, ClientUpdate | None]:
        """Train for one round; return the new device state and what to upload (None: nothing)."""

    def personalized(self, server: ServerState, state: ClientState, data: ClientData,
                     rng: np.random.Generator) -> Params:
        """The head this client runs after the round (float master weights; the device runs its int8 twin)."""
        return {**server.params, **state.personal}

    def new_user_head(self, server: ServerState) -> Params | None:
        """The head a brand-new user with no labels gets, or None when the strategy has no global head."""
        return dict(server.params) if set(self.head.keys) <= set(server.params) else None

    # --- helpers ------------------------------------------------------------------------------
    def _update(self, params: Mapping[str, np.ndarray], data: ClientData) -> ClientUpdate:
        return ClientUpdate({k: params[k] for k in sorted(self.shared_keys & set(params))},
                            int(data.y_train.size), self.shared_keys)

    def _fit(self, params: Mapping[str, np.ndarray], data: ClientData, rng: np.random.Generator,
             epochs: int | None = None, *, trainable: Collection[str] | None = None,
             prox_center: Mapping[str, np.ndarray] | None = None, prox_lambda: float = 0.0) -> Params:
        cfg = self.config.fit if epochs is None else self.config.fit.with_epochs(epochs)
        return fit(params, data.x_train, data.y_train, cfg, rng, trainable=trainable, prox_center=prox_center,
                   prox_lambda=prox_lambda, num_classes=self.head.num_classes)


class LocalOnly(Strategy):
    name = "local"
    summary = "no federation: each device trains its own head on its own data"

    @property
    def shared_keys(self) -> frozenset[str]:
        return frozenset()

    def client_round(self, server: ServerState, state: ClientState, data: ClientData,
                     rng: np.random.Generator) -> tuple[ClientState, ClientUpdate | None]:
        return ClientState(self._fit(state.personal, data, rng), state.rounds_done + 1), None


class FedAvg(Strategy):
    name = "fedavg"
    summary = "one global head, every tensor averaged; devices run the global head as is"

    @property
    def shared_keys(self) -> frozenset[str]:
        return frozenset(self.head.keys)

    def client_round(self, server: ServerState, state: ClientState, data: ClientData,
                     rng: np.random.Generator) -> tuple[ClientState, ClientUpdate | None]:
        trained = self._fit(server.params, data, rng)
        return ClientState(state.personal, state.rounds_done + 1), self._update(trained, data)


class FedAvgFineTune(FedAvg):
    name = "fedavg-ft"
    summary = "FedAvg, then each device fine-tunes the global head on its own data before using it"

    def personalized(self, server: ServerState, state: ClientState, data: ClientData,
                     rng: np.random.Generator) -> Params:
        return self._fit(server.params, data, rng, epochs=self.config.finetune_epochs)


class FedPer(Strategy):
    name = "fedper"
    summary = "adapter shared and averaged, classifier personal; both trained together"
    SHARED: tuple[str, ...] = ADAPTER_KEYS

    @property
    def shared_keys(self) -> frozenset[str]:
        # A split of the head into shared and personal layers needs two layers to split.
        if not self.head.adapter_dim:
            raise ValueError(f"{self.name} needs a head with an adapter (adapter_dim > 0)")
        return frozenset(self.SHARED)

    def client_round(self, server: ServerState, state: ClientState, data: ClientData,
                     rng: np.random.Generator) -> tuple[ClientState, ClientUpdate | None]:
        trained = self._fit({**server.params, **state.personal}, data, rng)
        personal = {k: trained[k] for k in self.personal_keys}
        return ClientState(personal, state.rounds_done + 1), self._update(trained, data)


class FedRep(FedPer):
    name = "fedrep"
    summary = "adapter shared; each round trains the personal classifier first (adapter frozen), then the adapter"

    def client_round(self, server: ServerState, state: ClientState, data: ClientData,
                     rng: np.random.Generator) -> tuple[ClientState, ClientUpdate | None]:
        params = {**server.params, **state.personal}
        params = self._fit(params, data, rng, epochs=self.config.fedrep_head_epochs, trainable=CLASSIFIER_KEYS)
        params = self._fit(params, data, rng, trainable=ADAPTER_KEYS)
        personal = {k: params[k] for k in self.personal_keys}
        return ClientState(personal, state.rounds_done + 1), self._update(params, data)


class LGFedAvg(FedPer):
    name = "lg-fedavg"
    summary = "the reverse split: adapter personal (local representation), classifier shared"
    SHARED = CLASSIFIER_KEYS


class Ditto(FedAvg):
    name = "ditto"
    summary = "a global head trained as in FedAvg plus a personal head pulled towards it (lambda)"

    def init_client(self, rng: np.random.Generator) -> ClientState:
        return ClientState()  # the personal head starts from the first global head it receives

    def client_round(self, server: ServerState, state: ClientState, data: ClientData,
                     rng: np.random.Generator) -> tuple[ClientState, ClientUpdate | None]:
        trained = self._fit(server.params, data, rng)
        personal = state.personal or server.params
        personal = self._fit(personal, data, rng, prox_center=server.params, prox_lambda=self.config.ditto_lambda)
        return ClientState(personal, state.rounds_done + 1), self._update(trained, data)

    def personalized(self, server: ServerState, state: ClientState, data: ClientData,
                     rng: np.random.Generator) -> Params:
        return dict(state.personal or server.params)


class FedNCM(FedAvgFineTune):
    name = "ncm"
    summary = ("round 1 sets the classifier to the fleet's nearest class means (devices send per-class "
               "feature sums and counts), then FedAvg with local fine-tuning")
    STATS = ("ncm.class_sum", "ncm.class_count")

    @property
    def shared_keys(self) -> frozenset[str]:
        return frozenset(self.head.keys) | frozenset(self.STATS)

    def client_round(self, server: ServerState, state: ClientState, data: ClientData,
                     rng: np.random.Generator) -> tuple[ClientState, ClientUpdate | None]:
        if server.version > 0:
            return super().client_round(server, state, data, rng)
        h = features(server.params, data.x_train)
        onehot = np.eye(self.head.num_classes, dtype=np.float32)[data.y_train]
        stats = {"ncm.class_sum": (onehot.T @ h).astype(np.float32),
                 "ncm.class_count": onehot.sum(axis=0)}
        update = ClientUpdate(stats, int(data.y_train.size), self.shared_keys)
        return ClientState(state.personal, state.rounds_done + 1), update

    def upload_shapes(self, server: ServerState) -> dict[str, tuple[int, ...]]:
        if server.version > 0:
            return {k: v for k, v in super().upload_shapes(server).items() if k not in self.STATS}
        width = self.head.adapter_dim or self.head.in_dim
        return {"ncm.class_sum": (self.head.num_classes, width), "ncm.class_count": (self.head.num_classes,)}

    def start_aggregation(self, server: ServerState) -> WeightedMean:
        return Sum() if server.version == 0 else super().start_aggregation(server)

    def add_update(self, server: ServerState, acc: WeightedMean, update: ClientUpdate) -> None:
        if server.version == 0:
            acc.add(update.tensors, 1.0)  # class statistics add up; they are not averaged
        else:
            super().add_update(server, acc, update)

    def finish_aggregation(self, server: ServerState, acc: WeightedMean,
                           failures: Sequence[ClientFailure] = ()) -> ServerState:
        if server.version > 0 or not acc.count:
            return super().finish_aggregation(server, acc, failures)
        sums = acc.result()
        counts = sums["ncm.class_count"]
        params = dict(server.params)
        # -||h - mu_c||^2 = 2 h.mu_c - ||mu_c||^2 + const(h): a linear layer that is exactly nearest-class-mean.
        means = sums["ncm.class_sum"] / np.maximum(counts, 1.0)[:, None]
        w = 2.0 * means.T
        b = -np.sum(means**2, axis=1)
        b = np.where(counts > 0, b, b.min() - 1e3)  # a class nobody holds is never the nearest
        params["classifier.w"], params["classifier.b"] = w.astype(np.float32), b.astype(np.float32)
        return ServerState(server.version + 1, params, acc.count, len(failures))


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (LocalOnly, FedAvg, FedAvgFineTune, FedPer, FedRep, LGFedAvg, Ditto, FedNCM)
}


def make_strategy(name: str, head: HeadConfig, config: StrategyConfig = StrategyConfig()) -> Strategy:
    try:
        return STRATEGIES[name](head, config)
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
