"""A real agent in a fleet whose global model goes down as deltas (codec/downlink.py), driven message by message on
the in-memory broker: the test publishes what an aggregator would (whole model, deltas, tasks) with the same pure
functions, so each case (a new device, a device behind, a missing or damaged change, a restart) is exact."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent.service import DELTA_WAIT_S, AgentService
from edge_agent.agent.sources import FixedSource
from edge_agent.codec.compression import CodecSpec
from edge_agent.codec.downlink import compress_version, model_digest
from edge_agent.config import AgentConfig, BrokerConfig
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.db import MEMORY
from edge_agent.fleet import GlobalModel, RoundTask, encode_global, encode_task
from edge_agent.learning import rng
from edge_agent.learning.head import HeadConfig
from edge_agent.learning.strategies import make_strategy
from edge_agent.learning.training import TrainingConfig
from edge_agent.memory_broker import MemoryBroker, MemoryLink
from edge_agent.messaging import Message
from edge_agent.protocol import Topics
from edge_agent.sim import FakeClock

FLEET = "down"
TRAIN = TrainingConfig(strategy="fedavg", rounds=20, seed=0, downlink_codec="int8")


class Timer:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Aggregator:
    """What the aggregator publishes, version by version: the whole model, its changes, the tasks."""

    def __init__(self, broker: MemoryBroker, fed: FederatedData, clock: FakeClock) -> None:
        self.link = broker.link_factory("edge-fl-aggregator-" + FLEET)
        self.link.connect()
        self.topics, self.clock = Topics(FLEET), clock
        self.head = HeadConfig(fed.embedding_dim, fed.num_classes, TRAIN.adapter_dim)
        strategy = make_strategy(TRAIN.strategy, self.head, TRAIN.strategy_config())
        params = strategy.init_server(rng.server_init(0)).params
        self.models = {0: {k: np.asarray(v, np.float32) for k, v in params.items()}}
        self.frames: dict[int, bytes] = {}
        self.moves = np.random.default_rng(7)

    @property
    def version(self) -> int:
        return max(self.models)

    def model(self, version: int | None = None) -> GlobalModel:
        v = self.version if version is None else version
        return GlobalModel(v, TRAIN, self.head, self.models[v])

    def new_version(self, *, publish: bool = True) -> bytes:
        v = self.version
        target = {k: t + self.moves.normal(0, 0.05, t.shape).astype(np.float32) for k, t in self.models[v].items()}
        step = compress_version(self.models[v], target, {}, CodecSpec.parse(TRAIN.downlink_codec), version=v + 1)
        assert step is not None
        self.models[v + 1], self.frames[v + 1] = step.params, step.frame
        self.link.publish(self.topics.model_current, encode_global(self.model()), retain=True)
        if publish:
            self.link.publish(self.topics.model_delta(v + 1), step.frame, retain=True)
        return step.frame

    def task(self, round_no: int, *, keep: int = 8, digest: str | None = None) -> None:
        model = self.model()
        task = RoundTask(round_no, self.clock() + 600, None, model.with_params({}), model_digest=digest or
                         model_digest(model.params), downlink_keep=keep)
        self.link.publish(self.topics.round_current, encode_task(task), retain=True)


@pytest.fixture(scope="module")
def fed(embedded: Any) -> FederatedData:
    return federate(embedded, PartitionConfig())


@pytest.fixture
def world(fed: FederatedData) -> Iterator[tuple[MemoryBroker, Aggregator, FakeClock]]:
    clock = FakeClock()
    broker = MemoryBroker(clock=clock)
    yield broker, Aggregator(broker, fed, clock), clock


def _agent(broker: MemoryBroker, fed: FederatedData, clock: FakeClock, timer: Timer,
           state_dir: str = MEMORY) -> AgentService:
    cfg = AgentConfig(device_id="dev-0", state_dir=state_dir, fleet=FLEET, broker=BrokerConfig(host="memory"))
    agent = AgentService(cfg, FixedSource(fed.clients[0], "dev-0"), link_factory=broker.link_factory, clock=clock,
                         timer=timer)
    agent.start()
    return agent


def _pump(agent: AgentService) -> list[str]:
    """Hand the agent what arrived, then let it idle once; the topics it got."""
    topics = []
    while True:
        try:
            msg = agent.link.inbox.get_nowait()
        except queue.Empty:
            break
        if isinstance(msg, Message):
            topics.append(msg.topic)
        agent.handle(msg)
    agent.idle()
    return topics


def _holds(agent: AgentService, agg: Aggregator, version: int) -> bool:
    return (agent.held is not None and agent.held.version == version
            and model_digest(agent.held.params) == model_digest(agg.models[version]))


def test_a_new_device_reads_the_whole_model_once_then_only_the_changes(
        world: tuple[MemoryBroker, Aggregator, FakeClock], fed: FederatedData) -> None:
    broker, agg, clock = world
    agg.new_version()
    agg.new_version()
    agent = _agent(broker, fed, clock, Timer())
    got = _pump(agent)
    assert Topics(FLEET).model_current in got and _holds(agent, agg, 2)
    assert not agent.whole_models
    delivered: list[str] = []
    assert isinstance(agent.link, MemoryLink)
    agent.link.on_delivery = lambda m: delivered.append(m.topic)
    for round_no in (3, 4):
        agg.new_version()
        agg.task(round_no)
        _pump(agent)
        assert _holds(agent, agg, agg.version)
        assert agent.store.trained(round_no)
    # after the start, model/current (published every version) never reached the device again
    assert Topics(FLEET).model_current not in delivered
    assert Topics(FLEET).model_delta(4) in delivered


def test_a_device_further_behind_than_the_kept_changes_resyncs_at_once(
        world: tuple[MemoryBroker, Aggregator, FakeClock], fed: FederatedData, tmp_path: Path) -> None:
    broker, agg, clock = world
    agg.new_version()
    agent = _agent(broker, fed, clock, Timer(), str(tmp_path))
    _pump(agent)
    assert _holds(agent, agg, 1)
    agent.shutdown()
    broker.restart(lose_queued=True)  # what the device missed while away is gone, as after a broker crash
    agg.link.reconnect()
    for _ in range(4):
        agg.new_version(publish=False)
    agg.task(1, keep=2)
    agent = _agent(broker, fed, clock, Timer(), str(tmp_path))
    assert agent.held is not None and agent.held.version == 1  # kept across the restart
    assert not agent.whole_models
    _pump(agent)
    _pump(agent)
    assert _holds(agent, agg, 5) and agent.store.trained(1)


def test_a_missing_change_is_waited_for_then_the_whole_model_is_read(
        world: tuple[MemoryBroker, Aggregator, FakeClock], fed: FederatedData, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl.agent")
    broker, agg, clock = world
    agg.new_version()
    timer = Timer()
    agent = _agent(broker, fed, clock, timer)
    _pump(agent)
    agg.new_version(publish=False)  # a version without its change (a recovered model goes down whole)
    agg.new_version()
    agg.task(1)
    _pump(agent)
    assert _holds(agent, agg, 1) and not agent.store.trained(1)  # version 3 cannot be built without 2
    timer.now += DELTA_WAIT_S / 2
    _pump(agent)
    assert not agent.whole_models
    timer.now += DELTA_WAIT_S
    _pump(agent)
    _pump(agent)
    assert _holds(agent, agg, 3) and agent.store.trained(1)
    assert any("did not arrive within" in r.getMessage() for r in caplog.records)


def test_a_damaged_change_or_a_digest_that_differs_is_refused_and_the_device_resyncs(
        world: tuple[MemoryBroker, Aggregator, FakeClock], fed: FederatedData, caplog: pytest.LogCaptureFixture) -> None:
    broker, agg, clock = world
    agg.new_version()
    agent = _agent(broker, fed, clock, Timer())
    _pump(agent)
    frame = bytearray(agg.new_version(publish=False))
    frame[60] ^= 0x01
    agg.link.publish(Topics(FLEET).model_delta(2), bytes(frame), retain=True)
    _pump(agent)
    assert agent.refusals["model"] == 1 and any("corrupted" in r.getMessage() for r in caplog.records)
    _pump(agent)
    assert _holds(agent, agg, 2)  # from model/current
    agg.new_version()
    agg.task(1, digest="0" * 32)  # the aggregator holds another model than the changes built
    _pump(agent)
    _pump(agent)
    assert not agent.store.trained(1)
    assert any("is not the aggregator's" in r.getMessage() for r in caplog.records)
    # the whole model it read again does not match either: the task is refused, not fetched for every second
    assert agent.refusals["task"] == 1 and not agent.whole_models
    delivered: list[str] = []
    assert isinstance(agent.link, MemoryLink)
    agent.link.on_delivery = lambda m: delivered.append(m.topic)
    for _ in range(3):
        _pump(agent)
    assert delivered == [] and agent.refusals["task"] == 1
