"""The real aggregator and agent services in one process: real data, the in-memory broker, a fake clock.

What the subprocess tests (test_fleet.py, test_aggregator_ingest.py, test_agent_bridge.py) prove over
MQTT, at the level of the services and in milliseconds: chunked uploads, failed rounds, an agent whose
broker goes away, task deadlines, a head the MCU refuses, and bad data on a device. The memory broker is
synchronous (a publish is in every subscriber's inbox when it returns) and time is the fake clock, so
nothing here sleeps or waits: each test drives the services message by message, the way `simulate` does.
"""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent.service import AgentService
from edge_agent.agent.sources import DataSource, FixedSource
from edge_agent.aggregator.service import AggregatorService
from edge_agent.codec.chunking import MAGIC as CHUNK_MAGIC
from edge_agent.codec.chunking import Reassembler, parse_chunk
from edge_agent.codec.envelope import decode_envelope
from edge_agent.config import AgentConfig, AggregatorConfig, BrokerConfig, DataConfig, FleetConfig
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.db import MEMORY
from edge_agent.fleet import decode_global, decode_task
from edge_agent.learning.strategies import ClientData
from edge_agent.learning.training import TrainingConfig
from edge_agent.memory_broker import MemoryBroker, MemoryLink
from edge_agent.messaging import ConnectError, Message
from edge_agent.protocol import Topics
from edge_agent.sim import FakeClock

FLEET = "inproc"
AGG_ID = "edge-fl-aggregator-" + FLEET  # the aggregator's MQTT client id
MEMORY_BROKER = BrokerConfig(host="memory")


@pytest.fixture(scope="module")
def fed(embedded: Any) -> FederatedData:
    """The six real clients (subjects 4..9) of the natural partition."""
    return federate(embedded, PartitionConfig())


class InProcessFleet:
    """An aggregator and agents on one MemoryBroker under a FakeClock, driven by the test.

    `pump()` delivers messages until the fleet is quiet, the way `run_simulation` does (services in a
    fixed order, the aggregator's `tick()` after each pass), and then lets every agent run its `idle()`
    once, as `AgentService.run` does after a quiet second. Agents in `paused` are not driven: their
    messages wait in their inbox (a hung or busy device). An observer link records every task, model,
    update (chunk) and status on the wire.
    """

    def __init__(self, fed: FederatedData, *, strategy: str = "fedavg", rounds: int = 1, min_clients: int = 1,
                 expected_clients: int = 1, deadline_s: float = 60.0) -> None:
        self.fed = fed
        self.clock = FakeClock()
        self.broker = MemoryBroker(clock=self.clock)
        self.topics = Topics(FLEET)
        self.aggregator = AggregatorService(
            AggregatorConfig(state=MEMORY, fleet_name=FLEET, embedding_dim=fed.embedding_dim,
                             num_classes=fed.num_classes, broker=MEMORY_BROKER,
                             fleet=FleetConfig(expected_clients=expected_clients, min_clients=min_clients,
                                               deadline_s=deadline_s),
                             train=TrainingConfig(strategy=strategy, rounds=rounds, seed=0)),
            link_factory=self.broker.link_factory, clock=self.clock)
        self.agents: dict[str, AgentService] = {}
        self.paused: set[str] = set()
        self.wire: list[Message] = []
        self.observer: MemoryLink = self.broker.link_factory("observer", clean_start=True)
        self.observer.connect()
        t = self.topics
        for topic in (t.round_current, t.model_current, t.status, t.update_filter, t.telemetry_filter):
            self.observer.subscribe(topic, qos=1)

    # --- building ------------------------------------------------------------------------------
    def add_agent(self, device_id: str, source: DataSource | None = None, *, client: int | None = None,
                  max_payload_bytes: int | None = None, state_dir: str = MEMORY,
                  data: DataConfig | None = None) -> AgentService:
        """An agent for `device_id`; its data is `source`, or the real client number `client` of `fed`."""
        if source is None and client is not None:
            source = FixedSource(self.fed.clients[client], device_id)
        broker = MEMORY_BROKER if max_payload_bytes is None else BrokerConfig(host="memory",
                                                                              max_payload_bytes=max_payload_bytes)
        cfg = AgentConfig(device_id=device_id, state_dir=state_dir, fleet=FLEET, rng_stream=len(self.agents),
                          broker=broker, data=data or DataConfig())
        agent = AgentService(cfg, source, link_factory=self.broker.link_factory, clock=self.clock)
        self.agents[device_id] = agent
        return agent

    def start(self) -> None:
        self.aggregator.start()
        for agent in self.agents.values():
            agent.start()

    def close(self) -> None:
        if not self.broker.running:
            self.broker.start()
        for agent in self.agents.values():
            agent.shutdown()
        self.aggregator.shutdown()

    # --- driving -------------------------------------------------------------------------------
    def drain(self, service: AggregatorService | AgentService) -> bool:
        """Hand every message waiting in one service's inbox to it; True if there was any."""
        moved = False
        while True:
            try:
                msg = service.link.inbox.get_nowait()
            except queue.Empty:
                return moved
            service.handle(msg)
            moved = True

    def live(self) -> list[AgentService]:
        return [a for name, a in self.agents.items() if name not in self.paused]

    def pump(self) -> None:
        """Deliver until nothing moves (see the class docstring)."""
        for _ in range(1000):
            moved = False
            services: list[AggregatorService | AgentService] = [self.aggregator, *self.live()]
            for service in services:
                moved = self.drain(service) or moved
            opened = self.aggregator.rounds_opened()
            self.aggregator.tick()
            if moved or self.aggregator.rounds_opened() != opened:
                continue
            for agent in self.live():  # quiet: what AgentService.run does after a second without messages
                agent.idle()
            if all(s.link.inbox.empty() for s in services):
                self._observe()
                return
        raise AssertionError("the in-process fleet did not settle in 1000 passes")

    def to_deadline(self, after_s: float = 1.0) -> float:
        """Move the fake clock `after_s` past the open round's deadline; returns the deadline."""
        assert self.aggregator.state is not None
        deadline = self.aggregator.state.deadline
        self.clock.now = deadline + after_s
        return deadline

    def reconnect(self, *services: AggregatorService | AgentService) -> None:
        for service in services:
            assert isinstance(service.link, MemoryLink)
            service.link.reconnect()  # what paho's backoff thread does for MqttLink

    # --- what an operator sees -----------------------------------------------------------------
    def _observe(self) -> None:
        while True:
            try:
                msg = self.observer.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, Message):
                self.wire.append(msg)

    def statuses(self) -> dict[int, dict[str, Any]]:
        self._observe()
        docs = [json.loads(m.payload) for m in self.wire if m.topic == self.topics.status and m.payload]
        return {int(d["round"]): d for d in docs}

    def uploads(self, device_id: str) -> list[bytes]:
        """Every update message (whole or chunk) `device_id` put on the wire, in order."""
        self._observe()
        return [m.payload for m in self.wire if self.topics.device_of(m.topic, "update") == device_id]

    def telemetry(self, device_id: str) -> list[dict[str, Any]]:
        self._observe()
        return [json.loads(m.payload) for m in self.wire if self.topics.device_of(m.topic, "telemetry") == device_id]

    def accepted(self) -> dict[str, str]:
        """Device -> update id counted in the current (or last) round."""
        assert self.aggregator.state is not None
        return dict(self.aggregator.state.accepted)


@pytest.fixture
def make_fleet(fed: FederatedData) -> Iterator[Callable[..., InProcessFleet]]:
    fleets: list[InProcessFleet] = []

    def make(**kwargs: Any) -> InProcessFleet:
        fleet = InProcessFleet(fed, **kwargs)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


def _reassemble(chunks: Sequence[bytes]) -> bytes:
    """Put an update's chunks back together the way an independent receiver would."""
    r = Reassembler(max_message_bytes=1 << 20)
    whole = [m for m in (r.feed(c, 0.0) for c in chunks) if m is not None]
    assert len(whole) == 1, f"{len(chunks)} chunks made {len(whole)} messages"
    return whole[0]


def _messages(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


def _cut_after(monkeypatch: pytest.MonkeyPatch, agent: AgentService, n: int) -> None:
    """The agent's network connection breaks (once) after it published `n` update messages: the next
    publish of the upload raises NotConnected, as MqttLink's does when the connection is lost."""
    real = agent.link.publish
    sent = 0

    def publish(topic: str, payload: bytes, **kwargs: Any) -> int:
        nonlocal sent
        if agent.topics.device_of(topic, "update") is not None:
            if sent == n:
                assert isinstance(agent.link, MemoryLink)
                agent.link.drop()
            sent += 1
        return real(topic, payload, **kwargs)

    monkeypatch.setattr(agent.link, "publish", publish)


# --- 1. chunked updates ---------------------------------------------------------------------------

def test_a_chunked_update_is_reassembled_and_counted_once(make_fleet: Callable[..., InProcessFleet]) -> None:
    fleet = make_fleet(expected_clients=2)
    fleet.add_agent("dev-chunked", client=0, max_payload_bytes=1024)
    fleet.add_agent("dev-whole", client=1)
    fleet.start()
    fleet.pump()

    chunks = fleet.uploads("dev-chunked")
    assert len(chunks) >= 3 and all(c[:4] == CHUNK_MAGIC and len(c) <= 1024 for c in chunks), [len(c) for c in chunks]
    headers = [parse_chunk(c)[0] for c in chunks]
    assert [h.index for h in headers] == list(range(len(chunks)))
    assert len({h.message_id for h in headers}) == 1
    [whole] = fleet.uploads("dev-whole")
    assert whole[:4] != CHUNK_MAGIC  # an update under the limit goes as one message
    status = fleet.statuses()[1]
    assert status["succeeded"] and status["reporting"] == 2 and status["model_version"] == 1
    assert status["rejected"] == 0 and status["duplicates"] == 0
    assert status["bytes_in"] == sum(map(len, chunks)) + len(whole)
    # What the aggregator counted is exactly what each device sent.
    assert fleet.accepted() == {"dev-chunked": decode_envelope(_reassemble(chunks)).update_id,
                                "dev-whole": decode_envelope(whole).update_id}
    # Every chunk was acknowledged (the last one once its message was counted): nothing held, nothing in flight.
    assert fleet.aggregator.reassembler.pending == 0
    assert fleet.broker.pending(AGG_ID) == 0


@pytest.mark.parametrize("gap_s", [0.0, 61.0], ids=["resent-at-once", "resent-after-the-partial-expired"])
def test_an_upload_cut_off_mid_message_is_resent_whole_and_counted_once(
        make_fleet: Callable[..., InProcessFleet], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        gap_s: float) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl")
    fleet = make_fleet(expected_clients=2, deadline_s=600.0)
    agent = fleet.add_agent("dev-chunked", client=0, max_payload_bytes=1024)
    fleet.add_agent("dev-whole", client=1)
    _cut_after(monkeypatch, agent, 2)
    fleet.start()
    fleet.pump()

    # Two chunks got out, then the connection broke: the update stays in the outbox, unsent.
    assert len(fleet.uploads("dev-chunked")) == 2
    [item] = agent.store.outbox()
    assert any(f"update {item.update_id} for round 1 not delivered yet" in m and "stays in the outbox" in m
               for m in _messages(caplog, "edge_fl.agent", logging.WARNING))
    assert set(fleet.accepted()) == {"dev-whole"}
    assert fleet.aggregator.reassembler.pending == 1
    assert fleet.broker.pending(AGG_ID) == 0  # chunks are acknowledged at once: flow control is never held
    if gap_s:
        fleet.clock.now += gap_s  # past fleet.chunk_timeout_s: the partial message is given up
        fleet.pump()
        assert fleet.aggregator.reassembler.pending == 0
        assert fleet.aggregator.reassembler.dropped_total["expired"] == 1

    fleet.reconnect(agent)
    fleet.pump()
    chunks = fleet.uploads("dev-chunked")
    resent = chunks[2:]
    assert len(resent) >= 3 and resent[:2] == chunks[:2]  # the same message id: the first chunks arrive twice
    status = fleet.statuses()[1]
    assert status["succeeded"] and status["reporting"] == 2
    assert status["duplicates"] == 0 and status["rejected"] == 0
    assert fleet.accepted()["dev-chunked"] == item.update_id == decode_envelope(_reassemble(resent)).update_id
    assert fleet.broker.pending(AGG_ID) == 0


# --- 2. a failed round ------------------------------------------------------------------------------

def test_a_round_short_of_min_clients_fails_at_its_deadline_and_the_next_one_opens(
        make_fleet: Callable[..., InProcessFleet], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl")
    fleet = make_fleet(expected_clients=3, min_clients=3, rounds=2)
    for i, name in enumerate(("dev-a", "dev-b", "dev-c")):
        fleet.add_agent(name, client=i)
    fleet.start()
    straggler = fleet.agents["dev-c"]
    fleet.drain(straggler)  # it announces itself...
    fleet.paused.add("dev-c")  # ...then does nothing more: its round task waits in its inbox
    fleet.pump()
    assert fleet.aggregator.state is not None and fleet.aggregator.state.selected == ("dev-a", "dev-b", "dev-c")
    assert isinstance(straggler.link, MemoryLink)
    straggler.link.drop()  # and it loses its network before it trained (its will says "offline")
    fleet.pump()
    assert set(fleet.accepted()) == {"dev-a", "dev-b"}
    assert fleet.statuses() == {}  # 2 of 3: the round waits for its deadline

    fleet.to_deadline()
    fleet.pump()
    status = fleet.statuses()[1]
    assert status["succeeded"] is False and status["model_version"] == 0
    assert (status["reporting"], status["selected"], status["failed"]) == (2, 3, 1)
    assert fleet.aggregator.server.version == 0
    warnings = _messages(caplog, "edge_fl.aggregator", logging.WARNING)
    assert "round 1: dev-c sent no update (no update before the deadline)" in warnings
    assert any(m.startswith("round 1 failed: 2 update(s), at least 3 needed; the global head stays at version 0")
               for m in warnings)
    models = {decode_global(decode_envelope(m.payload)).version for m in fleet.wire
              if m.topic == fleet.topics.model_current}
    assert models == {0}  # a failed round publishes no new model
    assert fleet.aggregator.rounds_opened() == 1  # round 2 waits until the fleet is back (expected_clients)

    fleet.reconnect(straggler)
    fleet.paused.clear()
    fleet.pump()
    tasks = {t.round: t for t in (decode_task(decode_envelope(m.payload)) for m in fleet.wire
                                  if m.topic == fleet.topics.round_current and m.payload)}
    assert sorted(tasks) == [1, 2] and tasks[2].model.version == 0  # round 2 trains from the version that stayed
    assert not straggler.store.trained(1) and straggler.store.trained(2)  # its stale round-1 task was not trained
    status = fleet.statuses()[2]
    assert status["succeeded"] and status["reporting"] == 3 and status["model_version"] == 1


# --- 3. the broker goes away while an update waits in the outbox ------------------------------------

def test_an_update_trained_while_the_broker_is_down_waits_in_the_outbox_and_is_counted_once(
        make_fleet: Callable[..., InProcessFleet], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl")
    fleet = make_fleet(expected_clients=2, deadline_s=600.0)
    a = fleet.add_agent("dev-a", client=0)
    b = fleet.add_agent("dev-b", client=1)
    fleet.start()
    fleet.drain(b)
    fleet.paused.add("dev-b")
    fleet.pump()
    assert set(fleet.accepted()) == {"dev-a"}

    fleet.broker.stop()  # a clean stop: every link loses its connection, sessions survive
    fleet.paused.clear()
    fleet.pump()  # dev-b handles the task it got before: it trains, and cannot upload
    [item] = b.store.outbox()
    assert item.round == 1 and b.store.trained(1)
    assert any(f"update {item.update_id} ({len(item.payload)} B) queued" in m
               for m in _messages(caplog, "edge_fl.agent", logging.INFO))
    with pytest.raises(ConnectError):
        fleet.reconnect(b)  # paho keeps retrying while the broker is down
    assert b.store.outbox() == [item]

    fleet.broker.start()
    fleet.reconnect(fleet.aggregator, a, b)
    fleet.observer.reconnect()
    fleet.pump()
    copies = fleet.uploads("dev-b")
    assert copies and set(copies) == {item.payload}  # the very bytes trained offline, sent once they could be
    status = fleet.statuses()[1]
    assert status["succeeded"] and status["reporting"] == 2 and status["rejected"] == 0
    # The devices send what they sent before again when they (and the aggregator) reconnect: every copy
    # beyond the first of each update is counted as a duplicate, none as a second update.
    assert status["duplicates"] == len(fleet.uploads("dev-a")) + len(copies) - 2 > 0
    assert fleet.accepted()["dev-b"] == item.update_id


@pytest.mark.parametrize("first", ["aggregator", "devices", "devices-and-a-monitor"])
def test_an_update_a_crashed_broker_lost_is_made_up_by_the_agents_resend(
        make_fleet: Callable[..., InProcessFleet], caplog: pytest.LogCaptureFixture, first: str) -> None:
    """`first`: who reconnects first after the crash. When the devices do, their resend on reconnection
    reaches a broker where the aggregator is not subscribed yet: the PUBACK says 0x10 (no subscriber), or
    0x00 when some monitor subscribed to the updates came back first. Either way the aggregator has not
    got it, and the agent must send it again once the aggregator is back (it republishes the round's task)."""
    caplog.set_level(logging.INFO, logger="edge_fl")
    fleet = make_fleet(expected_clients=2, deadline_s=600.0)
    a = fleet.add_agent("dev-a", client=0)
    b = fleet.add_agent("dev-b", client=1)
    fleet.start()
    fleet.drain(b)
    fleet.paused.add("dev-b")
    fleet.pump()
    counted_a = fleet.accepted()["dev-a"]

    assert fleet.broker.disconnect(AGG_ID)  # the aggregator's connection drops...
    fleet.paused.clear()
    fleet.pump()  # ...while dev-b uploads: the broker queues the update for it and acknowledges it
    [item] = b.store.outbox(include_sent=True)
    assert b.store.outbox() == []  # marked sent: the broker has it
    assert fleet.broker.pending(AGG_ID) == 1
    fleet.broker.restart(lose_queued=True)  # a crash before any autosave: sessions, queues, retained: gone
    assert fleet.broker.pending(AGG_ID) == 0 and fleet.broker.retained_messages() == {}

    if first == "aggregator":
        fleet.reconnect(fleet.aggregator, a, b)
        fleet.observer.reconnect()
        fleet.pump()
    else:
        if first == "devices-and-a-monitor":
            fleet.observer.reconnect()
        fleet.reconnect(a, b)
        fleet.pump()
        resends = [m for m in _messages(caplog, "edge_fl.agent", logging.INFO) + _messages(
            caplog, "edge_fl.agent", logging.WARNING) if item.update_id in m]
        assert resends and ("0x00" in resends[-1] if first == "devices-and-a-monitor"
                            else "not subscribed" in resends[-1]), resends
        fleet.reconnect(fleet.aggregator)
        fleet.observer.reconnect()
        fleet.pump()
    status = fleet.statuses()[1]
    assert status["succeeded"] and status["reporting"] == 2 and status["rejected"] == 0
    assert fleet.accepted() == {"dev-a": counted_a, "dev-b": item.update_id}
    assert fleet.aggregator.server.version == 1


# --- 4. task deadlines ----------------------------------------------------------------------------

def test_an_agent_does_not_train_for_a_task_whose_deadline_passed(
        make_fleet: Callable[..., InProcessFleet], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl")
    fleet = make_fleet(expected_clients=2)
    fleet.add_agent("dev-a", client=0)
    late = fleet.add_agent("dev-late", client=1)
    fleet.start()
    fleet.drain(late)
    fleet.paused.add("dev-late")
    fleet.pump()  # dev-a reports; dev-late's task waits in its inbox
    assert set(fleet.accepted()) == {"dev-a"}

    fleet.to_deadline(after_s=5.0)
    fleet.drain(late)  # the device gets to its task 5 s after the deadline (before the aggregator closes)
    assert "round 1: its deadline passed 5 s ago (by this device's clock); not training" in _messages(
        caplog, "edge_fl.agent", logging.WARNING)
    assert not late.store.trained(1) and late.store.outbox(include_sent=True) == []
    assert late.waiting is None
    fleet.paused.clear()
    fleet.pump()
    assert fleet.uploads("dev-late") == []
    status = fleet.statuses()[1]
    assert status["succeeded"] and (status["reporting"], status["failed"]) == (1, 1)


def test_a_retained_task_expires_from_the_broker_at_its_deadline(make_fleet: Callable[..., InProcessFleet],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl")
    fleet = make_fleet()
    early = fleet.add_agent("dev-early", client=0)
    fleet.start()
    fleet.drain(early)
    fleet.paused.add("dev-early")  # selected, but it never reports: the round stays open
    fleet.pump()
    assert fleet.aggregator.state is not None
    deadline = fleet.aggregator.state.deadline
    topic = fleet.topics.round_current

    fleet.clock.now = deadline - 1.0
    assert decode_task(decode_envelope(fleet.broker.retained_messages()[topic].payload)).round == 1
    fleet.clock.now = deadline + 0.5  # the aggregator has not closed the round yet: only the broker acts
    assert topic not in fleet.broker.retained_messages()

    newcomer = fleet.add_agent("dev-newcomer", client=1)
    newcomer.start()
    assert topic not in [m.topic for m in list(newcomer.link.inbox.queue) if isinstance(m, Message)]
    fleet.drain(newcomer)  # it subscribed to the task topic and found nothing to train
    assert not newcomer.store.trained(1) and newcomer.store.outbox(include_sent=True) == []
    assert not any("round 1" in m for m in _messages(caplog, "edge_fl.agent", logging.WARNING))
    assert newcomer.waiting is None


def _wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Bounded poll of a condition a background thread changes (the serial link's counters)."""
    import time

    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


# --- 5. a head the attached MCU refuses -------------------------------------------------------------

def _labelled_windows(subject: int, per_label: int) -> list[tuple[int, np.ndarray]]:
    """`per_label` windows of each activity of `subject`, as the MCU sends them (int16 and a scale)."""
    from firmware_bridge.emulator.stream import subject_windows
    from firmware_bridge.messages import SensorWindow, choose_scale, window_to_int16

    x, y = subject_windows(subject)
    scale = choose_scale(x)
    picked = np.concatenate([np.flatnonzero(y == label)[:per_label] for label in np.unique(y)])
    return [(int(y[i]), SensorWindow(n, window_to_int16(x[i], scale), scale, int(y[i])).to_float())
            for n, i in enumerate(np.sort(picked))]


@pytest.fixture
def emu() -> Iterator[Any]:
    """An emulated MCU on a pty, streaming subject 6's windows unlabelled (the collector keeps none of them).

    Requested before `make_fleet`, so it stops after the agent closed its serial link."""
    from firmware_bridge.emulator import EmulatedMcu

    mcu = EmulatedMcu.on_pty(subject=6, labelled=False)
    yield mcu
    mcu.stop()


def test_a_head_the_mcu_refuses_is_logged_and_the_agent_keeps_training_and_uploading(
        emu: Any, make_fleet: Callable[..., InProcessFleet], caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    """The agent's data source is the real BridgeSource (opened from `[data] source = "serial"`), attached
    to an emulated MCU on a pty; the MCU's windows are put in the agent's store up front, as its collector
    would, so that no test waits for the sensor stream (the emulator streams unlabelled windows, which the
    collector does not keep). The head pushes are real: synchronous over the pty, ACK by ACK."""
    caplog.set_level(logging.INFO, logger="edge_fl")
    fleet = make_fleet(rounds=2)
    windows = _labelled_windows(6, per_label=6)
    agent = fleet.add_agent("pi-with-mcu", state_dir=str(tmp_path),
                            data=DataConfig(source="serial", port=emu.port_url, min_windows=len(windows)))
    for n, (label, x) in enumerate(windows):
        agent.store.add_window(n, label, x)
    assert agent.source.runs_heads
    fleet.start()

    # Round 1: trained on the MCU's windows, uploaded, and the new head committed on the MCU.
    fleet.drain(agent)  # it announces itself
    fleet.drain(fleet.aggregator)
    fleet.aggregator.tick()  # round 1 opens
    fleet.drain(agent)  # it trains, pushes its new head to the MCU, uploads
    first = emu.head_id
    assert first is not None and emu.stats.heads_committed == 1
    assert any(f"pushed head {first} " in m for m in _messages(caplog, "edge_fl.agent.bridge",
                                                                        logging.INFO))
    fleet.paused.add("pi-with-mcu")
    fleet.pump()  # round 1 closes, round 2 opens
    assert fleet.statuses()[1]["reporting"] == 1

    # The MCU now refuses every head (a firmware built for another backbone): the commit is refused.
    emu.head_rx.embedding_dim += 1
    fleet.paused.clear()
    fleet.pump()
    refusals = [m for m in _messages(caplog, "edge_fl.agent.bridge", logging.WARNING)
                if m.startswith(f"head not pushed to the MCU on {emu.port_url}")]
    assert refusals and "HEAD_COMMIT refused" in refusals[0] and "keeps its previous head" in refusals[0]
    assert emu.head_id == first and emu.stats.heads_committed == 1 and emu.stats.commits_refused == 1
    # A refused head is not pushed again on the same connection: the collector goes on reading windows
    # (each one a turn of its loop, which is where a re-push would happen) without another attempt.
    link = agent.source.links[0]
    seen = link.stats.windows
    _wait_until(lambda: link.stats.windows >= seen + 3, 20.0, "three more windows from the MCU")
    assert emu.stats.commits_refused == 1 and emu.stats.heads_committed == 1
    # ...and the round was trained and uploaded all the same.
    status = fleet.statuses()[2]
    assert status["succeeded"] and status["reporting"] == 1 and status["model_version"] == 2
    assert len(fleet.uploads("pi-with-mcu")) == 2
    assert agent.store.trained(2)


# --- 6. bad data on a device ----------------------------------------------------------------------

def test_a_device_with_a_nan_feature_neither_trains_nor_uploads_and_the_round_completes_without_it(
        make_fleet: Callable[..., InProcessFleet], fed: FederatedData, caplog: pytest.LogCaptureFixture) -> None:
    """fedavg-ft: a strategy whose evaluation fine-tunes on the device's data, so scoring counts as training."""
    caplog.set_level(logging.INFO, logger="edge_fl")
    good = fed.clients[2]
    x_train = good.x_train.copy()
    x_train[7, 3] = np.nan  # one reading of one window
    bad = ClientData(x_train, good.y_train, good.x_test, good.y_test)
    fleet = make_fleet(strategy="fedavg-ft", expected_clients=3, rounds=1)
    fleet.add_agent("dev-a", client=0)
    fleet.add_agent("dev-b", client=1)
    poisoned = fleet.add_agent("dev-nan", FixedSource(bad, "dev-nan"))
    fleet.start()
    fleet.pump()

    errors = _messages(caplog, "edge_fl.agent", logging.ERROR)
    assert any(m.startswith("round 1: not training: client 'dev-nan': 1 train example(s) with NaN or infinite "
                            "features (first at index 7)") for m in errors), errors
    assert not poisoned.store.trained(1) and poisoned.store.outbox(include_sent=True) == []
    assert fleet.uploads("dev-nan") == []
    assert fleet.telemetry("dev-nan") == []  # no score computed from a head fitted on NaN
    assert set(fleet.accepted()) == {"dev-a", "dev-b"} and fleet.statuses() == {}  # waiting for dev-nan

    fleet.to_deadline()
    fleet.pump()
    status = fleet.statuses()[1]
    assert status["succeeded"] and status["model_version"] == 1
    assert (status["reporting"], status["failed"], status["rejected"]) == (2, 1, 0)
    assert "round 1: dev-nan sent no update (no update before the deadline)" in _messages(
        caplog, "edge_fl.aggregator", logging.WARNING)
    assert all(np.isfinite(v).all() for v in fleet.aggregator.server.params.values())
    assert {t["device"] for t in fleet.telemetry("dev-a") + fleet.telemetry("dev-b")} == {"dev-a", "dev-b"}
