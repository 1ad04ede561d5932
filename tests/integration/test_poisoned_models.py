"""Agents and aggregator protect themselves from a poisoned global model (issue 11), through a real Mosquitto.

What was seen: one update of finite but huge values made a global model every agent crashed on, and the
poisoned model, retained on the broker and kept in the aggregator's database, crashed every restart again.
Here an insider (a login that may publish anywhere; with signatures on, the fleet key itself) publishes
huge-valued models and tasks: agents refuse them with a log line, report the refusal in telemetry, keep
their last good state (a refused version never raises the rollback mark, so the genuine rounds go on), and
keep running; an agent process started on a broker that retains a poisoned model stays up and says why; an
aggregator started on a database that holds a poisoned model publishes a good one instead.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.aggregator.rounds import Phase, RoundState
from edge_agent.aggregator.service import AggregatorService
from edge_agent.aggregator.store import AggregatorStore
from edge_agent.broker import LocalBroker
from edge_agent.codec.envelope import decode_envelope
from edge_agent.codec.signing import Purpose, context, signer
from edge_agent.config import AggregatorConfig, BrokerConfig, FleetConfig
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.db import MEMORY
from edge_agent.demo import Fleet, write_agent_config
from edge_agent.fleet import GlobalModel, RoundTask, Signer, decode_global, encode_global, encode_task
from edge_agent.keys import load_private_key
from edge_agent.learning import rng
from edge_agent.learning.head import HeadConfig, init_params
from edge_agent.learning.strategies import make_strategy
from edge_agent.learning.training import TrainingConfig
from edge_agent.learning.validate import expected_shapes, head_problem
from edge_agent.memory_broker import MemoryBroker
from edge_agent.messaging import LinkFactory, Message
from edge_agent.protocol import Topics
from edge_agent.sim import FakeClock
from edge_agent.transport import MqttLink

from .mqtt_fleet import FLEET as OPS_FLEET
from .mqtt_fleet import RunningFleet, running_fleet
from .test_signing import FLEET as SIGNED_FLEET
from .test_signing import make_keys, signed_fleet

HUGE = 1e30


@pytest.fixture(scope="module")
def fed(embedded: Any) -> FederatedData:
    return federate(embedded, PartitionConfig())


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in list(caplog.records))


def _poisoned(model: GlobalModel, version: int, **train: Any) -> GlobalModel:
    """`model` as version `version` with every weight scaled by HUGE (finite in float32: 1e30 < 3.4e38)."""
    params = {k: (np.asarray(v, np.float32) * np.float32(HUGE)).astype(np.float32) for k, v in model.params.items()}
    return dataclasses.replace(model, version=version, params=params,
                               training=dataclasses.replace(model.training, **train))


def _insider_attack(fleet: RunningFleet, insider: MqttLink, topics: Topics, genuine: GlobalModel,
                    sign_model: Signer | None, sign_task: Signer | None) -> None:
    """Publish huge models and tasks far ahead (accepted, they would make every genuine round a rollback)."""
    bad = _poisoned(genuine, 1000)
    insider.publish(topics.model_current, encode_global(bad, sign_model), qos=1)
    insider.publish(topics.round_current, encode_task(RoundTask(1000, time.time() + 600, None, bad), sign_task),
                    qos=1)
    # An announced bound cannot let the values through: devices cap it
    loose = dataclasses.replace(_poisoned(genuine, 1001), max_abs=1e300)
    insider.publish(topics.model_current, encode_global(loose, sign_model), qos=1)
    fleet.wait_for("both agents to refuse the models and the task",
                   lambda: all(a.refusals["model"] >= 2 and a.refusals["task"] >= 1 for a in fleet.agents))


def _check_fleet_survived(fleet: RunningFleet, rounds: int, caplog: pytest.LogCaptureFixture) -> None:
    agg = fleet.aggregator
    fleet.wait_for("the last round", agg.done.is_set, timeout=60)
    assert [r["reported"] for r in agg.view.snapshot()["rounds"]] == [2] * rounds  # the genuine rounds went on
    assert all(t.is_alive() for t in fleet.threads)  # no service exited
    assert head_problem(agg.server.params, None) is None
    for a in fleet.agents:  # the log says why, once per message
        assert a.refusals["error"] == 0
    assert _logged(caplog, "beyond the bound") >= 6
    # The refusals reached the aggregator in telemetry (the first of each kind, per device)
    fleet.wait_for("the aggregator to hear of the refusals",
                   lambda: _logged(caplog, "refused model (round") >= 2 and _logged(caplog, "refused task (round") >= 2)


def test_agents_refuse_huge_models_and_tasks_and_keep_training(
        broker: LocalBroker, fed: FederatedData, tmp_path: Path, make_link: LinkFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    topics = Topics(OPS_FLEET)
    insider: MqttLink = make_link("aggregator", "insider")
    rounds = 3
    with running_fleet(broker, fed, tmp_path, rounds=rounds) as fleet:
        fleet.wait_for("round 2 to open", lambda: fleet.aggregator.rounds_opened() >= 2)
        _insider_attack(fleet, insider, topics, fleet.aggregator.model(), None, None)
        _check_fleet_survived(fleet, rounds, caplog)

        # A sane model whose training diverges (an absurd learning rate): caught, rolled back, never committed
        agg = fleet.aggregator
        wild = dataclasses.replace(agg.model(), training=dataclasses.replace(agg.model().training, lr=1e30))
        before = agg.counters.rejected
        insider.publish(topics.round_current, encode_task(RoundTask(rounds + 1, time.time() + 600, None, wild)), qos=1)
        fleet.wait_for("both agents to roll back the diverged training",
                       lambda: all(a.refusals["training"] == 1 for a in fleet.agents))
        assert _logged(caplog, "refused the result of training (round") == 2  # the agents, once each
        assert all(a.refusals["error"] == 0 for a in fleet.agents)
        assert agg.counters.rejected == before  # nothing was uploaded for that round
        assert all(t.is_alive() for t in fleet.threads)


def test_signed_but_poisoned_models_are_refused_too(
        broker: LocalBroker, fed: FederatedData, tmp_path: Path, make_link: LinkFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    """The fleet key is the insider: a valid signature does not make a poisoned model usable."""
    caplog.set_level(logging.INFO)
    keys = make_keys(tmp_path, ["dev-0", "dev-1"])
    fleet_key = load_private_key(keys.fleet)
    topics = Topics(SIGNED_FLEET)
    insider: MqttLink = make_link("aggregator", "insider")
    with signed_fleet(broker, fed, keys, tmp_path, start_agents=2) as (fleet, _, _start_rest):
        fleet.wait_for("round 2 to open", lambda: fleet.aggregator.rounds_opened() >= 2)
        _insider_attack(fleet, insider, topics, fleet.aggregator.model(),
                        signer(fleet_key, context(Purpose.MODEL, SIGNED_FLEET)),
                        signer(fleet_key, context(Purpose.TASK, SIGNED_FLEET)))
        assert _logged(caplog, "not signed by the fleet key") == 0  # refused for its values, not its signature
        _check_fleet_survived(fleet, 3, caplog)


def _wait_for_log(fleet: Fleet, name: str, text: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    path = fleet.workdir / f"{name}.log"
    end = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{fleet.tail(name)}"
        assert time.monotonic() < end, f"{name} never logged {text!r}:\n{fleet.tail(name)}"
        time.sleep(0.1)  # polling a log file; the condition, not the sleep, decides


def test_an_agent_restarted_on_a_retained_poisoned_model_stays_up(broker: LocalBroker, tmp_path: Path,
                                                                   make_link: LinkFactory) -> None:
    """What systemd does after a crash: start the agent again. Retained poison must not make that a loop."""
    fleet_name = "crashloop"
    topics = Topics(fleet_name)
    head = HeadConfig(in_dim=16, num_classes=7, adapter_dim=32)
    genuine = GlobalModel(5, TrainingConfig(strategy="fedavg"), head, init_params(head, np.random.default_rng(0)))
    bad = _poisoned(genuine, 6)
    insider: MqttLink = make_link("aggregator", "insider")
    insider.publish(topics.model_current, encode_global(bad), qos=1, retain=True)
    insider.publish(topics.round_current, encode_task(RoundTask(6, time.time() + 600, None, bad)), qos=1, retain=True)
    config = write_agent_config(tmp_path, broker.host, broker.port, "device", broker.users["device"],
                                fleet=fleet_name, subject=4, rng_stream=0, partition=PartitionConfig())
    fleet = Fleet(tmp_path)
    try:
        for attempt in range(2):  # the first start, and a restart on the same state and the same retained poison
            proc = fleet.spawn("agent", "agent", "--config", str(config)) if attempt == 0 else fleet.restart("agent")
            log_path = tmp_path / "agent.log"
            seen = log_path.read_text(errors="replace").count("refused a task") if log_path.exists() else 0
            end = time.monotonic() + 60
            while log_path.read_text(errors="replace").count("refused a task") <= seen:
                assert proc.poll() is None, f"the agent exited with {proc.returncode}:\n{fleet.tail('agent')}"
                assert time.monotonic() < end, f"the agent never refused the task:\n{fleet.tail('agent')}"
                time.sleep(0.1)
            _wait_for_log(fleet, "agent", "refused a model", proc)
            assert proc.poll() is None
            text = log_path.read_text(errors="replace")
            assert "beyond the bound" in text and "Traceback" not in text
        proc.terminate()
        assert proc.wait(timeout=20) == 0, fleet.tail("agent")
    finally:
        fleet.stop()


def test_an_aggregator_restarted_on_a_poisoned_database_publishes_a_good_model(
        broker: LocalBroker, fed: FederatedData, tmp_path: Path, make_link: LinkFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    """A database from before this fix: round 1 made a 1e30 global model (version 1), round 2 trains from it."""
    caplog.set_level(logging.INFO)
    train = TrainingConfig(strategy="fedavg", rounds=4, seed=0)
    head = HeadConfig(fed.embedding_dim, fed.num_classes, train.adapter_dim)
    good = make_strategy("fedavg", head, train.strategy_config()).init_server(rng.server_init(0)).params
    now = time.time()
    store = AggregatorStore(tmp_path / "aggregator.db")
    store.check_fingerprint({"strategy": "fedavg", "head": asdict(head), "seed": 0, "fleet": OPS_FLEET})
    store.save_global(0, good)
    selected = ("dev-0", "dev-1")
    store.open_round(RoundState(1, 0, selected, now, now + 60))
    store.close_round(RoundState(1, 0, selected, now, now + 60, phase=Phase.CLOSED), [], True, 1,
                      {k: v * np.float32(HUGE) for k, v in good.items()}, now)
    store.open_round(RoundState(2, 1, selected, now, now + 60))
    store.close()

    observer = make_link("aggregator", "observer")
    topics = Topics(OPS_FLEET)
    observer.subscribe(topics.model_current, qos=1)
    observer.subscribe(topics.round_current, qos=1)
    with running_fleet(broker, fed, tmp_path, rounds=4) as fleet:
        agg = fleet.aggregator
        fleet.wait_for("the last round", agg.done.is_set, timeout=60)
        rounds = agg.view.snapshot()["rounds"]
        assert agg.server.version == 4  # 1 (poisoned, never published), 2 (recovered), 3 and 4 (rounds 3, 4)
        assert [r["reported"] for r in rounds][-2:] == [2, 2]
        assert all(a.refusals.total() == 0 for a in fleet.agents)  # nothing bad ever reached them
    assert _logged(caplog, "the stored global model version 1") == 1
    assert _logged(caplog, "round 2 trained from the refused version 1: closed as failed") == 1
    shapes = expected_shapes(head, make_strategy("fedavg", head).shared_keys)
    published = 0
    while not observer.inbox.empty():
        item = observer.inbox.get_nowait()
        if isinstance(item, Message) and item.payload:
            model = decode_global(decode_envelope(item.payload))
            assert head_problem(model.params, shapes) is None, f"published a bad model: version {model.version}"
            assert model.version != 1
            published += 1
    assert published >= 3


def test_the_aggregator_never_publishes_a_model_that_fails_the_checks(fed: FederatedData) -> None:
    """An aggregation that yields huge values (accepted before ingest checked magnitudes, or a strategy bug)."""
    clock = FakeClock()
    memory = MemoryBroker(clock=clock)
    agg = AggregatorService(
        AggregatorConfig(state=MEMORY, fleet_name="guard", embedding_dim=fed.embedding_dim,
                         num_classes=fed.num_classes, broker=BrokerConfig(host="memory"),
                         fleet=FleetConfig(expected_clients=1, min_clients=1, deadline_s=60),
                         train=TrainingConfig(strategy="fedavg", rounds=2, seed=0)),
        link_factory=memory.link_factory, clock=clock)
    topics = Topics("guard")
    observer = memory.link_factory("observer", clean_start=True)
    observer.connect()
    for topic in (topics.model_current, topics.status):
        observer.subscribe(topic, qos=1)
    agg.start()
    agg.online.add("dev-0")
    agg.maybe_open()
    assert agg.state is not None and agg.state.round == 1
    huge = {k: np.full(v.shape, HUGE, np.float32) for k, v in agg.server.params.items()}
    agg.acc.add(huge, 1.0)
    agg.state = dataclasses.replace(agg.state, accepted={"dev-0": "u-1"})
    agg.maybe_close()
    assert agg.server.version == 0 and agg.store.latest_global() is not None
    assert agg.store.latest_global()[0] == 0  # type: ignore[index]  # the bad version was never stored
    statuses: list[dict[str, Any]] = []
    import json
    while not observer.inbox.empty():
        item = observer.inbox.get_nowait()
        if not isinstance(item, Message) or not item.payload:
            continue
        if item.topic == topics.status:
            statuses.append(json.loads(item.payload))
        else:
            assert head_problem(decode_global(decode_envelope(item.payload)).params, None) is None
    assert statuses[-1]["succeeded"] is False and "beyond the bound" in statuses[-1]["refused"]
    assert agg.state.round == 2 and agg.state.model_version == 0  # the next round trains from the last good one
    agg.shutdown()
