"""A real aggregator process fed by two light-weight devices that this test drives message by message:
malformed, oversized, spoofed, duplicated and late updates are each rejected with a clear log line, and
the aggregator keeps serving the honest ones."""

from __future__ import annotations

import json
import queue
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edge_agent.broker import LocalBroker
from edge_agent.codec.envelope import Kind, Envelope, decode_envelope, encode_envelope
from edge_agent.data.partition import PartitionConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.demo import Fleet, write_aggregator_config
from edge_agent.fleet import decode_task
from edge_agent.learning.strategies import ServerState
from edge_agent.data.federated import federate
from edge_agent.transport import Message, MqttLink

pytestmark = pytest.mark.fleet
FLEET = "ingest"


def _wait(link: MqttLink, topic: str, pred, timeout: float = 30.0) -> Message:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            msg = link.inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        if isinstance(msg, Message) and msg.topic == topic and msg.payload and pred(msg):
            return msg
    raise AssertionError(f"nothing matching on {topic} within {timeout} s")


def test_bad_updates_are_rejected_and_the_round_still_completes(broker: LocalBroker, tmp_path: Path, embedded) -> None:  # type: ignore[no-untyped-def]
    data = federate(embedded, PartitionConfig("natural", seed=0))
    cfg = write_aggregator_config(tmp_path, broker.host, broker.port, "aggregator", broker.users["aggregator"],
                                  fleet=FLEET, clients=2, train=TrainingConfig(strategy="fedavg", rounds=2, seed=0), deadline_s=60,
                                  max_update_bytes=6000)
    fleet = Fleet(tmp_path)
    fleet.spawn("aggregator", "aggregator", "--config", str(cfg), "--exit-when-done")
    pre = f"edgefl/{FLEET}"
    devs = {}
    try:
        for name in ("dev-a", "dev-b"):
            link = MqttLink(name, broker.host, broker.port, username="device", password=broker.users["device"],
                            clean_start=True, will=(f"{pre}/presence/{name}", b"offline", True))
            link.connect(timeout=10)
            link.subscribe(f"{pre}/round/current")
            link.subscribe(f"{pre}/status")
            link.publish(f"{pre}/presence/{name}", b"online", retain=True)
            devs[name] = link
        a, b = devs["dev-a"], devs["dev-b"]

        def task(link: MqttLink, round_no: int) -> Envelope:
            msg = _wait(link, f"{pre}/round/current", lambda m: decode_envelope(m.payload).round == round_no)
            return decode_envelope(msg.payload)

        def update(env: Envelope, device: str, idx: int) -> Envelope:
            strategy = decode_task(env).model.strategy()
            server = ServerState(env.model_version, dict(env.tensors))
            state = strategy.init_client(np.random.default_rng(idx))
            _, u = strategy.client_round(server, state, data.clients[idx], np.random.default_rng(idx))
            return Envelope(kind=Kind.UPDATE, device_id=device, round=env.round, model_version=env.model_version,
                            strategy=strategy.name, update_id=uuid.uuid4().hex, num_examples=u.num_examples,
                            tensors=u.tensors)

        t1a, t1b = task(a, 1), task(b, 1)
        good_a = encode_envelope(update(t1a, "dev-a", 0))
        assert len(good_a) < 6000
        topic_a = f"{pre}/update/dev-a/1"
        a.publish(topic_a, b"this is not an envelope")                          # malformed
        a.publish(topic_a, np.random.default_rng(0).bytes(7000))               # oversized for the aggregator
        a.publish(topic_a, encode_envelope(update(t1b, "dev-b", 1)))            # dev-b's update on dev-a's topic
        a.publish(topic_a, good_a)
        a.publish(topic_a, good_a)                                              # the same update twice
        b.publish(f"{pre}/update/dev-b/1", encode_envelope(update(t1b, "dev-b", 1)))
        s1 = json.loads(_wait(a, f"{pre}/status", lambda m: json.loads(m.payload)["round"] == 1).payload)
        assert (s1["reporting"], s1["rejected"], s1["duplicates"]) == (2, 3, 1), s1
        t2a, t2b = task(a, 2), task(b, 2)
        a.publish(topic_a, good_a)                                              # late: round 1 is closed
        a.publish(f"{pre}/update/dev-a/2", encode_envelope(update(t2a, "dev-a", 0)))
        b.publish(f"{pre}/update/dev-b/2", encode_envelope(update(t2b, "dev-b", 1)))
        s2 = json.loads(_wait(a, f"{pre}/status", lambda m: json.loads(m.payload)["round"] == 2).payload)
        assert (s2["reporting"], s2["rejected"], s2["last"]) == (2, 1, True), s2
        assert fleet.procs["aggregator"].wait(timeout=10) == 0
        log = (tmp_path / "aggregator.log").read_text()
        for line in ("rejected a malformed update on edgefl/ingest/update/dev-a/1 (device dev-a)",
                     "rejected an oversized update on edgefl/ingest/update/dev-a/1: 7000 bytes, the limit is 6000",
                     "an update must be kind UPDATE from the device named in its topic",
                     "ignored a redelivery",
                     "late or early, round 1 is closed"):
            assert line in log, f"{line!r} not in the aggregator log:\n{log}"
    finally:
        for link in devs.values():
            link.close()
        fleet.stop()
