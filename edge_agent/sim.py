"""In-process federation: the same strategies and codecs as the MQTT path, without a broker.

Every message crosses the (simulated) network in the bytes a real deployment sends (envelopes, compact update
frames), so the rounding of every codec is the real one, and the bytes counted are whole MQTT payloads, header
included: what a device pays for.
"""

from __future__ import annotations

import json
import queue
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .codec.envelope import decode_envelope, encode_envelope
from .data.federated import FederatedData
from .db import MEMORY
from .fleet import GlobalModel, decode_global
from .learning.head import HeadConfig, Int8Head, quantize_head
from .learning.metrics import accuracy, summarize
from .learning.robust import RobustConfig
from .learning.strategies import (
    ClientData,
    ClientDataError,
    ServerState,
    check_client_data,
    make_strategy,
)
from .learning.training import TrainingConfig
from .memory_broker import MemoryBroker, MemoryLink
from .messaging import Message
from .protocol import Topics

if TYPE_CHECKING:
    from .agent.service import AgentService
    from .agent.sources import DataSource

Uplink = Callable[[str, int, bytes], None]  # (device id, round, the update message as sent) for tests

SIM_FLEET = "sim"
SIM_EPOCH = 1.7e9  # the fake clock's start, in unix seconds: any fixed value keeps runs identical
SIM_DEADLINE_S = 60.0  # fake seconds; every simulated device reports at once, so no round waits for it


class FakeClock:
    """Time that moves only when the simulation says so: deadlines without waiting."""

    def __init__(self, start: float = SIM_EPOCH) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class _RoundRecord:
    round: int
    version: int = -1
    reporting: int = 0
    selected: int = 0
    uplink: int = 0
    downlink: int = 0
    closed: bool = False


class _Observer:
    """What an operator subscribed to the fleet's topics sees: tasks, updates, models, status, telemetry."""

    def __init__(self, link: MemoryLink, topics: Topics, watch_uplink: Uplink | None) -> None:
        self.link, self.topics, self.watch_uplink = link, topics, watch_uplink
        self.rounds: dict[int, _RoundRecord] = {}
        self.models: dict[int, GlobalModel] = {}
        self.personal_acc: dict[int, dict[str, float]] = {}  # version -> device -> accuracy

    def subscribe(self) -> None:
        t = self.topics
        for topic in (t.model_current, t.status, t.update_filter, t.telemetry_filter):
            self.link.subscribe(topic, qos=0)

    def record(self, round_no: int) -> _RoundRecord:
        return self.rounds.setdefault(round_no, _RoundRecord(round_no))

    def drain(self) -> None:
        while True:
            try:
                msg = self.link.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, Message) and msg.payload:
                self._see(msg)

    def _see(self, msg: Message) -> None:
        t = self.topics
        if msg.topic == t.status:
            doc = json.loads(msg.payload)
            rec = self.record(int(doc["round"]))
            rec.version, rec.reporting, rec.selected, rec.closed = (int(doc["model_version"]), int(doc["reporting"]),
                                                                    int(doc["selected"]), True)
        elif msg.topic == t.model_current:
            model = decode_global(decode_envelope(msg.payload))
            self.models[model.version] = model
        elif (device := t.device_of(msg.topic, "update")) is not None:
            round_no = int(msg.topic.rsplit("/", 1)[1])  # update/<device>/<round>: an envelope or a compact frame
            self.record(round_no).uplink += len(msg.payload)  # what the device pays for: header and all
            if self.watch_uplink is not None:
                self.watch_uplink(device, round_no, msg.payload)
        elif (device := t.device_of(msg.topic, "telemetry")) is not None:
            doc = json.loads(msg.payload)
            if "personal_acc" in doc:  # not a device's report that it refused a model or task
                self.personal_acc.setdefault(int(doc["version"]), {})[device] = float(doc["personal_acc"])


# --- malicious devices: for tests and bench/poisoning.py only ---------------------------------------------------
# Nothing in an agent's or aggregator's configuration reaches this: only a caller of run_simulation can make a
# simulated device lie, by rewriting the updates its (otherwise honest) agent publishes.

ATTACKS = ("scaled", "sign-flip", "huge", "random", "patient", "count")
HUGE = 1e30
HUGE_COUNT = 2**62


@dataclass(frozen=True)
class Attack:
    """Devices in `devices` replace each update they send: `kind` is one of ATTACKS.

    scaled: the honest change x10 (boosting); sign-flip: the honest change x-4; huge: every value 1e30;
    random: Gaussian values (std 1, like a broken sensor pipeline); patient: the honest change reversed and
    scaled to just within the round's announced norm bound (its own honest norm when none is announced),
    every round; count: the honest tensors, claiming 2^62 examples."""

    devices: frozenset[str]
    kind: str
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; choose one of {', '.join(ATTACKS)}")


def poison(kind: str, tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], num_examples: int,
           bound: float | None, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
    """The malicious version of an honest update (tensors, num_examples) against the global `reference`."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    ref = {k: np.asarray(reference.get(k, np.zeros_like(v)), np.float64) for k, v in t.items()}
    delta = {k: t[k] - ref[k] for k in t}
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))) or 1.0
    if kind == "huge":
        out = {k: np.full_like(v, HUGE) for k, v in t.items()}
    elif kind == "random":
        out = {k: rng.normal(0.0, 1.0, v.shape) for k, v in t.items()}
    elif kind == "count":
        return {k: np.asarray(v, np.float32) for k, v in tensors.items()}, HUGE_COUNT
    else:
        scale = {"scaled": 10.0, "sign-flip": -4.0}.get(kind, -(0.99 * bound if bound else norm) / norm)
        out = {k: ref[k] + scale * delta[k] for k in t}
    return {k: v.astype(np.float32) for k, v in out.items()}, num_examples


class _AttackerLink(MemoryLink):
    """A device's broker connection that rewrites the updates it publishes."""

    rewrite: Callable[[str, bytes], bytes]

    def publish(self, topic: str, payload: bytes, **kwargs: Any) -> int:
        return super().publish(topic, self.rewrite(topic, payload), **kwargs)


# --- data that changes over the run, and the heads devices score with: for tests and benchmarks ---------------

@dataclass(frozen=True)
class SimClient:
    """What a `sources` factory of run_simulation is given for one simulated device."""

    index: int  # the device's position among the clients (its rng stream)
    client_id: str
    data: ClientData  # the client's data in the FederatedData
    round_open: Callable[[], int]  # the round the aggregator has opened last (0 before the first)


SourceFactory = Callable[[SimClient], "DataSource"]
# (round, device id -> the int8 head that device scored its telemetry personal_acc with after that round)
HeadWatch = Callable[[int, Mapping[str, Int8Head]], None]


class StagedSource:
    """Data that grows by stages, as a device's does when new labelled windows arrive: `stages` are
    (first round, ClientData), the first from round 1; `client_data()` is the latest stage whose round has
    opened. What a device trains on in round r is what it holds when round r's task arrives."""

    runs_heads = False

    def __init__(self, stages: list[tuple[int, ClientData]], round_open: Callable[[], int], description: str) -> None:
        starts = [start for start, _ in stages]
        if not stages or starts[0] != 1 or starts != sorted(set(starts)):
            raise ValueError(f"{description}: stages must start at round 1 and at increasing rounds, got {starts}")
        self.stages, self.round_open, self.description = stages, round_open, description

    def client_data(self) -> ClientData | None:
        now = max(1, self.round_open())
        return [data for start, data in self.stages if start <= now][-1]

    def push(self, params: Mapping[str, np.ndarray]) -> object:
        return None

    def close(self) -> None:
        pass


def _watched_agent_class(heads: dict[int, dict[str, Int8Head]]) -> type[AgentService]:
    """AgentService that also keeps, per version it scores, the head it scored with (in `heads`)."""
    from .agent.service import AgentService

    class WatchedAgent(AgentService):
        def evaluate(self, model: GlobalModel, data: ClientData | None = None) -> None:
            scored_before = self.store.evaluated(model.version)
            super().evaluate(model, data)
            if not scored_before and self.store.evaluated(model.version):
                scored = data or self.data()
                assert scored is not None  # evaluated: it had data
                heads.setdefault(model.version, {})[self.cfg.device_id] = self.personal_head(model, scored)

    return WatchedAgent


def run_simulation(data: FederatedData, config: TrainingConfig, *,
                   progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                   watch_uplink: Uplink | None = None,
                   watch_server: Callable[[ServerState], None] | None = None,
                   robust: RobustConfig | None = None, attack: Attack | None = None,
                   sources: SourceFactory | None = None, watch_heads: HeadWatch | None = None) -> dict[str, Any]:
    """Run `config.rounds` rounds of a real fleet in one process; returns the results document.

    The aggregator and one agent per client are the real services (edge-fl aggregator / edge-fl agent),
    with in-memory stores, on an in-memory MQTT broker, under a fake clock; every decision (selection,
    deadlines, ingest, aggregation, personalization) is theirs. The results are what an operator reads
    off the broker: round status, the updates' sizes, each device's telemetry.

    `robust`: the aggregator's [aggregator] table (default: its defaults). `attack` (tests and benchmarks only)
    makes some devices malicious.

    `sources` (tests and benchmarks): each device's data source, made from its SimClient (default: its fixed
    data), e.g. a StagedSource whose data grows at a given round. `watch_heads` is called once per round, in order,
    with each device's personalized head after that round (the one its telemetry personal_acc scores), so that a
    caller can score windows of its own.
    """
    from .agent.service import AgentService
    from .agent.sources import FixedSource
    from .aggregator.service import AggregatorService
    from .config import AgentConfig, AggregatorConfig, BrokerConfig, FleetConfig

    for cid, cd in zip(data.client_ids, data.clients, strict=True):
        check_client_data(cid, cd, num_classes=data.num_classes, dim=data.embedding_dim)
        if cd.y_test.size == 0:
            raise ClientDataError(f"client {cid!r}: no test examples; a simulation scores every client")
    clock = FakeClock()
    broker = MemoryBroker(clock=clock)
    topics = Topics(SIM_FLEET)
    memory = BrokerConfig(host="memory")
    n_clients = len(data.clients)
    aggregator = AggregatorService(
        AggregatorConfig(state=MEMORY, fleet_name=SIM_FLEET, embedding_dim=data.embedding_dim,
                         num_classes=data.num_classes, broker=memory,
                         fleet=FleetConfig(expected_clients=n_clients, min_clients=1, deadline_s=SIM_DEADLINE_S),
                         train=config, aggregator=robust or RobustConfig()),
        link_factory=broker.link_factory, clock=clock)
    attack_rng = np.random.default_rng(attack.seed if attack else 0)

    def rewrite(topic: str, payload: bytes) -> bytes:
        if topics.device_of(topic, "update") is None or attack is None:
            return payload
        env = decode_envelope(payload)
        bound = aggregator.norm_bound if aggregator.robust.clip != "off" else None
        tensors, n = poison(attack.kind, env.tensors, aggregator.server.params, env.num_examples, bound, attack_rng)
        return encode_envelope(replace(env, tensors=tensors, num_examples=n))

    def link_factory(cid: str) -> Any:
        if attack is None or cid not in attack.devices:
            return broker.link_factory

        def attacker(client_id: str, host: str = "memory", port: int = 1883, **kwargs: Any) -> MemoryLink:
            for ignored in ("tls", "topic_aliases"):
                kwargs.pop(ignored, None)
            link = _AttackerLink(broker, client_id, host, port, **kwargs)
            link.rewrite = rewrite
            return link
        return attacker

    heads: dict[int, dict[str, Int8Head]] = {}  # version -> device -> the head it scored (watch_heads only)
    agent_class = AgentService if watch_heads is None else _watched_agent_class(heads)

    def source(i: int, cid: str, cd: ClientData) -> DataSource:
        return FixedSource(cd, cid) if sources is None else sources(SimClient(i, cid, cd, aggregator.rounds_opened))

    agents = [agent_class(AgentConfig(device_id=cid, state_dir=MEMORY, fleet=SIM_FLEET, rng_stream=i, broker=memory),
                          source(i, cid, cd), link_factory=link_factory(cid), clock=clock)
              for i, (cid, cd) in enumerate(zip(data.client_ids, data.clients, strict=True))]
    # What every device downloads (tasks, whole models or their changes, receipts), by the round open when the
    # broker delivered it; what came before round 1 (the retained model at connection) counts in round 1.
    downlink: Counter[int] = Counter()

    def count_downlink(msg: Message) -> None:
        downlink[max(1, aggregator.rounds_opened())] += len(msg.payload)

    for agent in agents:
        cast(MemoryLink, agent.link).on_delivery = count_downlink
    observer = _Observer(broker.link_factory("observer", "memory", 1883), topics, watch_uplink)
    observer.link.connect()
    observer.subscribe()
    aggregator.start()
    for agent in agents:
        agent.start()

    def pump() -> bool:
        """Deliver every pending message, services in a fixed order: the run is deterministic."""
        moved = False
        busy = True
        while busy:
            busy = False
            services: list[AggregatorService | AgentService] = [aggregator, *agents]
            for service in services:
                while True:
                    try:
                        msg = service.link.inbox.get_nowait()
                    except queue.Empty:
                        break
                    service.handle(msg)
                    observer.drain()
                    busy = moved = True
            # A tick that closes a round (its deadline passed) publishes a model even when it opens no new round
            # (the last one): that is movement too.
            before = (aggregator.rounds_opened(), aggregator.state and aggregator.state.phase)
            aggregator.tick()
            observer.drain()
            busy = busy or (aggregator.rounds_opened(), aggregator.state and aggregator.state.phase) != before
        return moved

    rounds: list[dict[str, Any]] = []
    # A dataset without held-out users (every user federates): new_user_acc is None, not the nan of an empty mean.
    has_new_users = data.new_user_y.size > 0

    def emit_complete() -> None:
        while len(rounds) < config.rounds:
            rec = observer.rounds.get(len(rounds) + 1)
            if rec is None or not rec.closed:
                return
            accs = observer.personal_acc.get(rec.version, {})
            if len(accs) < n_clients:
                return  # the devices have not all scored this version yet
            new_acc: float | None = None  # no new-user head (a personal-only strategy), or no new user to score
            if has_new_users:
                model = observer.models[rec.version]
                new_head = model.strategy().new_user_head(model.server())
                if new_head:
                    new_acc = accuracy(quantize_head(new_head).predict(data.new_user_x), data.new_user_y)
            client_acc = {cid: accs[cid] for cid in data.client_ids}
            record = {"round": rec.round, "client_acc": client_acc, **summarize(list(client_acc.values())),
                      "new_user_acc": new_acc, "clients_reporting": rec.reporting, "uplink_bytes": rec.uplink,
                      "downlink_bytes": downlink[rec.round]}
            rounds.append(record)
            if watch_heads is not None:
                watch_heads(rec.round, heads[rec.version])
                for older in [v for v in heads if v < rec.version]:
                    del heads[older]
            if progress:
                progress(rec.round, config.rounds, record)

    seen_versions = 0
    while True:
        moved = pump()
        if watch_server is not None and aggregator.server.version != seen_versions:
            seen_versions = aggregator.server.version
            watch_server(aggregator.server)
        emit_complete()
        if aggregator.done.is_set() and len(rounds) == config.rounds:
            break
        if not moved:  # quiet: only time can move the fleet on (a round waiting for its deadline)
            state = aggregator.state
            if state is None or aggregator.done.is_set() or clock.now > state.deadline:
                raise RuntimeError(f"the simulated fleet stalled at round {aggregator.rounds_opened()} "
                                   f"({len(rounds)} round(s) scored); this is a bug in edge-fl")
            clock.now = state.deadline + 1.0
    for agent in agents:
        agent.shutdown()
    aggregator.shutdown()
    summary = {k: rounds[-1][k] for k in ("mean_acc", "p10_acc", "worst_acc", "new_user_acc")}
    selected = max(1, round(config.fraction * n_clients))
    summary["uplink_bytes_per_client_round"] = sum(r["uplink_bytes"] for r in rounds) / (config.rounds * selected)
    # Every device downloads the task and the model, selected or not: per device and round.
    summary["downlink_bytes_per_client_round"] = sum(r["downlink_bytes"] for r in rounds) / (config.rounds * n_clients)
    strategy = make_strategy(config.strategy, HeadConfig(data.embedding_dim, data.num_classes, config.adapter_dim),
                             config.strategy_config())
    return {
        "config": asdict(config),
        "partition": asdict(data.partition),
        "clients": [{"id": cid, "n_train": int(cd.y_train.size), "n_test": int(cd.y_test.size)}
                    for cid, cd in zip(data.client_ids, data.clients, strict=True)],
        "shared_tensors": sorted(strategy.shared_keys),
        "rounds": rounds,
        "summary": summary,
    }
