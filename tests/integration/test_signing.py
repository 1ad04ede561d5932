"""Signed updates, tasks and models between the real services through a real Mosquitto.

An insider at the broker level (a login that may publish anywhere, as the dev broker allows) forges updates,
round tasks and global models and replays old ones; the signed fleet refuses each with its reason and ends
with exactly the global model of an unsigned run with the same seeds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent.service import AgentService
from edge_agent.agent.sources import FixedSource
from edge_agent.aggregator.metrics import Metrics
from edge_agent.aggregator.service import AggregatorService
from edge_agent.broker import LocalBroker
from edge_agent.codec.envelope import AGGREGATOR_ID, Envelope, Kind, decode_envelope, encode_envelope
from edge_agent.codec.signing import Purpose, context, signer
from edge_agent.config import (
    AgentConfig,
    AgentSigningConfig,
    AggregatorConfig,
    AggregatorSigningConfig,
    BrokerConfig,
    FleetConfig,
)
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.db import MEMORY
from edge_agent.fleet import RoundTask, decode_global, encode_task
from edge_agent.keys import load_private_key, new_private_key, public_pem, register, revoke, write_private_key
from edge_agent.learning.training import TrainingConfig
from edge_agent.messaging import LinkFactory, Message
from edge_agent.protocol import Topics
from edge_agent.transport import MqttLink

from .mqtt_fleet import RunningFleet, _serve, running_fleet

ROUNDS = 3
FLEET = "signed"  # not mqtt_fleet's: the unsigned run's retained messages stay out of this fleet's topics
TOPICS = Topics(FLEET)


@pytest.fixture(scope="module")
def fed(embedded: Any) -> FederatedData:
    return federate(embedded, PartitionConfig())


class RecordingMetrics(Metrics):
    """The aggregator's rejection reasons, as the Prometheus counter would count them."""

    def __init__(self) -> None:
        self.rejected: list[str] = []

    def update_rejected(self, reason: str) -> None:
        self.rejected.append(reason)


@dataclass
class Keys:
    root: Path
    fleet: Path
    devices: dict[str, Path] = field(default_factory=dict)

    @property
    def registry(self) -> Path:
        return self.root / "devices"

    def fleet_pub(self) -> Path:
        return Path(f"{self.fleet}.pub")


def make_keys(root: Path, devices: list[str]) -> Keys:
    keys = Keys(root, root / "fleet.key")
    fleet_key = new_private_key()
    write_private_key(fleet_key, keys.fleet)
    keys.fleet_pub().write_bytes(public_pem(fleet_key.public_key()))
    keys.registry.mkdir()
    for d in devices:
        key = new_private_key()
        keys.devices[d] = root / f"{d}.key"
        write_private_key(key, keys.devices[d])
        register(keys.registry, d, public_pem(key.public_key()))
    return keys


@contextmanager
def signed_fleet(broker: LocalBroker, fed: FederatedData, keys: Keys, tmp_path: Path, *,
                 start_agents: int) -> Iterator[tuple[RunningFleet, RecordingMetrics, Any]]:
    """A signed aggregator and `start_agents` of 2 signed agents; the third value starts the rest."""
    def broker_cfg(user: str) -> BrokerConfig:
        return BrokerConfig(host=broker.host, port=broker.port, username=user, password=broker.users[user])

    recorder = RecordingMetrics()
    agg_cfg = AggregatorConfig(
        state=str(tmp_path / "aggregator.db"), fleet_name=FLEET, embedding_dim=fed.embedding_dim,
        num_classes=fed.num_classes, broker=broker_cfg("aggregator"),
        fleet=FleetConfig(expected_clients=2, min_clients=2, deadline_s=60),
        train=TrainingConfig(strategy="fedavg", rounds=ROUNDS, seed=0),
        signing=AggregatorSigningConfig(key=str(keys.fleet), registry=str(keys.registry)))

    def aggregator() -> AggregatorService:
        service = AggregatorService(agg_cfg)
        service.metrics = recorder
        return service

    def agent(i: int) -> AgentService:
        cfg = AgentConfig(device_id=f"dev-{i}", state_dir=MEMORY, fleet=FLEET, rng_stream=i,
                          broker=broker_cfg("device"),
                          signing=AgentSigningConfig(key=str(keys.devices[f"dev-{i}"]),
                                                     fleet_keys=[str(keys.fleet_pub())]))
        return AgentService(cfg, FixedSource(fed.clients[i], f"dev-{i}"))

    stop = threading.Event()
    threads: list[threading.Thread] = []
    aggregators: list[AggregatorService] = []
    agents: list[AgentService] = []

    def start(build: Any, started: list[Any]) -> None:
        ready, before = threading.Event(), len(started)
        threads.append(threading.Thread(target=_serve, args=(build, started, ready, stop), daemon=True))
        threads[-1].start()
        ready.wait(30)
        assert len(started) > before, "a service did not start: see the log above"

    def start_rest() -> None:
        for i in range(len(agents), 2):
            start(lambda i=i: agent(i), agents)

    try:
        start(aggregator, aggregators)
        for i in range(start_agents):
            start(lambda i=i: agent(i), agents)
        yield RunningFleet(aggregators[0], agents, tmp_path / "aggregator.db", stop, threads), recorder, start_rest
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


class Observer:
    """Everything an MQTT link subscribed to the fleet's task, model and update topics received, in order."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.seen: list[tuple[str, bytes]] = []
        for topic in (TOPICS.round_current, TOPICS.model_current, TOPICS.update_filter):
            link.subscribe(topic, qos=1)

    def first(self, match: Callable[[str, bytes], bool], what: str, timeout: float = 10.0) -> bytes:
        """The first message seen that `match`es, waiting for it (on the link's inbox) up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for topic, payload in self.seen:
                if match(topic, payload):
                    return payload
            try:
                item = self.link.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the observer saw no {what} in {timeout} s") from None
            if isinstance(item, Message) and item.payload:
                self.seen.append((item.topic, bytes(item.payload)))


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in list(caplog.records))


def _update(device: str, round_no: int, fed: FederatedData) -> Envelope:
    """A plausible update (right shapes) that no honest device sent."""
    w = np.zeros((fed.num_classes, fed.embedding_dim), np.float32)
    return Envelope(kind=Kind.UPDATE, device_id=device, round=round_no, model_version=0, strategy="fedavg",
                    update_id=f"forged-{device}-{round_no}", num_examples=1000,
                    tensors={"W": w, "b": np.zeros(fed.num_classes, np.float32)})


def test_signed_fleet_refuses_forgeries_and_replays_and_equals_an_unsigned_run(
        broker: LocalBroker, fed: FederatedData, tmp_path: Path, make_link: LinkFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running_fleet(broker, fed, tmp_path / "unsigned", rounds=ROUNDS) as plain:
        plain.wait_for("the unsigned fleet's last round", plain.aggregator.done.is_set)
        unsigned_params = {k: v.copy() for k, v in plain.aggregator.server.params.items()}

    keys = make_keys(tmp_path, ["dev-0", "dev-1"])
    insider: MqttLink = make_link("aggregator", "insider")  # a login that may publish anything on the dev broker
    observer = Observer(make_link("aggregator", "observer"))
    with signed_fleet(broker, fed, keys, tmp_path, start_agents=1) as (fleet, rejected, start_rest):
        agg = fleet.aggregator
        # dev-1 looks online (presence is not signed: the broker's ACL guards it), so round 1 waits for its update
        insider.publish(TOPICS.presence("dev-1"), b"online", qos=1, retain=True)
        fleet.wait_for("round 1 to open", lambda: agg.state is not None)
        stranger = new_private_key()  # a valid Ed25519 key nobody enrolled
        dev0 = load_private_key(keys.devices["dev-0"])
        dev1 = load_private_key(keys.devices["dev-1"])
        ctx = context(Purpose.UPDATE, FLEET)
        tampered = bytearray(encode_envelope(_update("dev-1", 1, fed), sign=signer(dev1, ctx)))
        tampered[100] ^= 0x01
        forgeries = {
            "unsigned": encode_envelope(_update("dev-1", 1, fed)),
            "wrong_key": encode_envelope(_update("dev-1", 1, fed), sign=signer(dev0, ctx)),  # dev-0 signing as dev-1
            "unknown_device": encode_envelope(_update("dev-9", 1, fed), sign=signer(stranger, ctx)),
            "tampered": bytes(tampered),
        }
        for reason, payload in forgeries.items():
            device = "dev-9" if reason == "unknown_device" else "dev-1"
            insider.publish(TOPICS.update(device, 1), payload, qos=1)
        fleet.wait_for("the four forgeries to be refused", lambda: len(rejected.rejected) == 4)
        assert sorted(rejected.rejected) == sorted(forgeries)
        assert agg.state is not None and dict(agg.state.accepted).keys() <= {"dev-0"}  # no forgery counted
        for text in ("unsigned, and this fleet requires signatures", "forged: not signed by the key enrolled for",
                     "device 'dev-9' is not enrolled", "tampered: changed after it was signed"):
            assert _logged(caplog, text) == 1, text

        start_rest()  # the real dev-1 now trains round 1
        # A forged task (another key; round 99 would block every real round as a rollback) and an unsigned model
        genuine_model = observer.first(lambda t, p: t == TOPICS.model_current, "global model")
        model = decode_global(decode_envelope(genuine_model))
        forged_task = encode_task(RoundTask(99, 4e9, None, model),
                                  signer(stranger, context(Purpose.TASK, FLEET)))
        forged_model = encode_envelope(Envelope(
            kind=Kind.GLOBAL, device_id=AGGREGATOR_ID, round=99, model_version=99, strategy="fedavg", update_id="f",
            num_examples=0, tensors=dict(model.params), codec=model.codec,
            meta=dict(decode_envelope(genuine_model).meta)))
        fleet.wait_for("dev-1 to train round 1", lambda: agg.rounds_opened() >= 2)
        insider.publish(TOPICS.round_current, forged_task, qos=1)
        insider.publish(TOPICS.model_current, forged_model, qos=1)
        fleet.wait_for("the last round", agg.done.is_set)
        fleet.wait_for("both agents to refuse the forged task and model",
                       lambda: _logged(caplog, "refused a round task") == 2 and _logged(caplog, "refused a global "
                                                                                                 "model") == 2)
        assert _logged(caplog, "not signed by the fleet key") == 2 and _logged(caplog, ": unsigned (") == 2

        # Replays of genuine, correctly signed messages: an old task and an old model (rollback), an old update
        old_task = observer.first(lambda t, p: t == TOPICS.round_current and decode_envelope(p).meta["round"] == 1,
                                  "round 1 task")
        old_model = observer.first(lambda t, p: t == TOPICS.model_current and decode_envelope(p).model_version == 1,
                                   "model version 1")
        insider.publish(TOPICS.round_current, old_task, qos=1)
        insider.publish(TOPICS.model_current, old_model, qos=1)
        fleet.wait_for("both agents to refuse both rollbacks", lambda: _logged(caplog, "refused a rollback") == 4)
        old_update = observer.first(lambda t, p: t == TOPICS.update("dev-0", 1), "dev-0's round 1 update")
        before = len(rejected.rejected)
        insider.publish(TOPICS.update("dev-0", 1), old_update, qos=1)
        fleet.wait_for("the replayed update to be refused", lambda: len(rejected.rejected) == before + 1)
        assert rejected.rejected[-1] == "wrong_round"  # signed, intact, and too late: round 1 is closed

        # Revocation: the same genuine update, once dev-0 is revoked, is refused as from an unknown device
        revoke(keys.registry, "dev-0")
        fleet.wait_for("the registry to drop dev-0", lambda: agg.registry is not None and len(agg.registry) == 1)
        insider.publish(TOPICS.update("dev-0", 1), old_update, qos=1)
        fleet.wait_for("the revoked device's update to be refused", lambda: len(rejected.rejected) == before + 2)
        assert rejected.rejected[-1] == "unknown_device"

        rounds = agg.view.snapshot()["rounds"]
        assert [r["reported"] for r in rounds] == [2] * ROUNDS  # every round: both honest updates, nothing else
        signed_params = agg.server.params
    assert signed_params.keys() == unsigned_params.keys()
    for k in unsigned_params:
        np.testing.assert_array_equal(signed_params[k], unsigned_params[k], err_msg=k)
