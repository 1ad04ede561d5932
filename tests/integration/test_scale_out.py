"""Aggregator workers sharing one fleet: real worker processes on a private PostgreSQL, a real Mosquitto handing
each update to one of them (an MQTT v5 shared subscription), and real SIGKILLs.

The round's global head is checked against the weighted mean worked out here from the updates published, the
same check a single aggregator passes (test_group_commit.py): an update lost, or counted twice, by any worker
changes it. Which worker counted what is read from the store: both must have taken part.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.broker import LocalBroker
from edge_agent.codec.downlink import apply_delta, model_digest
from edge_agent.codec.envelope import Envelope, decode_envelope, encode_envelope
from edge_agent.codec.tensor_pack import unpack_tensors
from edge_agent.demo import Fleet, write_aggregator_config
from edge_agent.fleet import decode_global, decode_task
from edge_agent.learning.training import TrainingConfig
from edge_agent.messaging import Message
from edge_agent.status import read_database
from edge_agent.transport import MqttLink

from .test_group_commit import _devices, _expected_mean, _update

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.fleet
FLEET = "shared"
PRE = f"edgefl/{FLEET}"
N = 80  # several batches per worker


class Workers:
    """Aggregator worker processes of one fleet on one PostgreSQL database, and a link publishing for N devices."""

    def __init__(self, broker: LocalBroker, workdir: Path, dsn: str, n: int = N,
                 train: TrainingConfig = TrainingConfig(strategy="fedavg", rounds=1, seed=0)) -> None:
        self.workdir, self.dsn, self.fleet, self.devices = workdir, dsn, Fleet(workdir), _devices(n)
        self.config = write_aggregator_config(workdir, broker.host, broker.port, "aggregator",
                                              broker.users["aggregator"], fleet=FLEET, clients=n, min_clients=n,
                                              train=train, deadline_s=300)
        self.link = MqttLink("publisher", broker.host, broker.port, username="device",
                             password=broker.users["device"], clean_start=True)
        self.link.connect(timeout=10)
        self.link.subscribe(f"{PRE}/round/current")
        self.link.subscribe(f"{PRE}/status")
        self.base: dict[str, np.ndarray] = {}  # with a downlink codec: the model of round 1's task

    def start(self, name: str, crash_at: str | None = None) -> None:
        env = {"EDGEFL_STATE": self.dsn, "EDGEFL_WORKER": name, **({"EDGEFL_CRASH_AT": crash_at} if crash_at else {})}
        self.fleet.spawn(name, "aggregator", "--config", str(self.config), "--exit-when-done", env=env)

    def wait_log(self, name: str, text: str, timeout: float = 30.0) -> None:
        """Until `name`'s log says `text` (polled: the log is the process's own account of the event)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in (self.workdir / f"{name}.log").read_text(errors="replace"):
                return
            if self.fleet.procs[name].poll() is not None:
                break
            time.sleep(0.05)
        code = self.fleet.procs[name].poll()
        raise AssertionError(f"{name} never logged {text!r} (exit code {code}):\n{self.fleet.tail(name, 40)}")

    def wait(self, topic: str, pred, timeout: float = 90.0) -> bytes:  # type: ignore[no-untyped-def]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                msg = self.link.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(msg, Message) and msg.topic == topic and msg.payload and pred(msg.payload):
                return msg.payload
        logs = "\n".join(f"--- {n}\n{self.fleet.tail(n, 30)}" for n in self.fleet.procs)
        raise AssertionError(f"nothing matching on {topic} within {timeout} s; worker logs:\n{logs}")

    def announce_devices(self) -> None:
        for d in self.devices:
            self.link.publish(f"{PRE}/presence/{d}", b"online", retain=True)

    def publish_updates(self) -> list[Envelope]:
        task = decode_envelope(self.wait(f"{PRE}/round/current", lambda p: decode_envelope(p).round == 1))
        params = dict(decode_task(task).model.params)
        if not params:  # a downlink codec: the task names the model, model/current holds it
            self.link.subscribe(f"{PRE}/model/current")  # its retained message comes now
            params = dict(decode_global(decode_envelope(self.wait(
                f"{PRE}/model/current", lambda p: decode_envelope(p).model_version == task.model_version))).params)
            self.base = params
        updates = [_update(d, i, 1, task.model_version, params) for i, d in enumerate(self.devices)]
        for u in updates:
            self.link.publish(f"{PRE}/update/{u.device_id}/1", encode_envelope(u))
        return updates

    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.wait(f"{PRE}/status", lambda p: json.loads(p)["round"] == 1))

    def counted_by_worker(self) -> dict[str, int]:
        with psycopg.connect(self.dsn) as db:
            return dict(db.execute("SELECT worker, COUNT(*) FROM accepted WHERE round=1 GROUP BY worker").fetchall())

    def global_head(self) -> tuple[int, dict[str, np.ndarray]]:
        with psycopg.connect(self.dsn) as db:
            version, blob = db.execute("SELECT version, blob FROM globals ORDER BY version DESC LIMIT 1").fetchone()
        return version, unpack_tensors(bytes(blob))

    def assert_counted_once(self, updates: list[Envelope], status: dict) -> None:  # type: ignore[type-arg]
        assert status["reporting"] == len(updates) and status["succeeded"], status
        version, params = self.global_head()
        assert version == 1
        for k, want in _expected_mean(updates).items():
            np.testing.assert_allclose(params[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
        assert sum(self.counted_by_worker().values()) == len(updates)

    def exited_cleanly(self) -> None:
        for name, proc in self.fleet.procs.items():
            assert proc.wait(timeout=20) == 0, f"{name}:\n{self.fleet.tail(name, 40)}"

    def close(self) -> None:
        self.fleet.stop()
        self.link.close()


@pytest.fixture
def workers(broker: LocalBroker, tmp_path: Path, pg_dsn: str) -> Iterator[Workers]:
    w = Workers(broker, tmp_path, pg_dsn)
    yield w
    w.close()


def test_two_workers_share_the_updates_and_the_round_equals_one_aggregators(workers: Workers) -> None:
    workers.announce_devices()
    workers.start("w1")
    workers.wait_log("w1", "now coordinates")
    workers.start("w2")
    workers.wait_log("w2", "aggregator up")
    updates = workers.publish_updates()
    status = workers.status()
    workers.assert_counted_once(updates, status)
    shares = workers.counted_by_worker()
    assert set(shares) == {"w1", "w2"}, shares  # the broker handed updates to both
    workers.exited_cleanly()  # the follower too sees the last round closed and stops
    history = read_database(workers.dsn, 10)  # what `edge-fl status --state postgresql://...` shows
    assert [(h["round"], h["reported"], h["succeeded"]) for h in history] == [(1, N, True)]
    logs = {n: (workers.workdir / f"{n}.log").read_text() for n in ("w1", "w2")}
    assert "round 1 closed" in logs["w1"] and "round 1 closed" not in logs["w2"]  # one coordinator closed it


def test_with_a_downlink_codec_a_new_coordinator_publishes_the_change_the_dead_one_committed(
        broker: LocalBroker, tmp_path: Path, pg_dsn: str) -> None:
    train = TrainingConfig(strategy="fedavg", rounds=1, seed=0, downlink_codec="int8")
    workers = Workers(broker, tmp_path, pg_dsn, train=train)
    try:
        workers.announce_devices()
        workers.start("w1", crash_at="aggregator.after_close@1")  # closes round 1, dies before publishing
        workers.wait_log("w1", "now coordinates")
        workers.start("w2")
        workers.wait_log("w2", "aggregator up")
        updates = workers.publish_updates()
        assert workers.fleet.procs["w1"].wait(timeout=60) == -9, workers.fleet.tail("w1")
        workers.wait_log("w2", "now coordinates")
        # The change to version 1 was committed with the round's close by w1; w2, which never computed it,
        # publishes it from the store: applied to version 0 it gives exactly the stored version 1.
        workers.link.subscribe(f"{PRE}/model/delta/+")  # retained: here at once, or as soon as w2 publishes it
        frame = workers.wait(f"{PRE}/model/delta/1", lambda p: True)
        version, params = apply_delta(workers.base, 0, frame)
        stored_version, stored = workers.global_head()
        assert version == stored_version == 1 and model_digest(params) == model_digest(stored)
        for k, want in _expected_mean(updates).items():  # the mean, within int8's rounding of the change
            np.testing.assert_allclose(stored[k], want, atol=float(np.max(np.abs(want - workers.base[k]))) / 100)
        assert "round 1 closed" not in (workers.workdir / "w2.log").read_text()  # w2 did not close it again
        assert workers.fleet.procs["w2"].wait(timeout=20) == 0, workers.fleet.tail("w2", 40)
    finally:
        workers.close()


def test_a_worker_killed_before_its_commit_loses_nothing(workers: Workers) -> None:
    workers.announce_devices()
    workers.start("w1")
    workers.wait_log("w1", "now coordinates")
    workers.start("w2", crash_at="aggregator.before_commit@1")
    workers.wait_log("w2", "aggregator up")
    updates = workers.publish_updates()
    assert workers.fleet.procs["w2"].wait(timeout=60) == -9, workers.fleet.tail("w2")
    # What w2 had received waits, unacknowledged, in its broker session: the round cannot complete without it.
    workers.fleet.restart("w2")
    status = workers.status()
    workers.assert_counted_once(updates, status)
    assert status["rejected"] == 0
    workers.exited_cleanly()


def test_the_coordinator_killed_after_a_commit_is_replaced_and_nothing_is_counted_twice(workers: Workers) -> None:
    workers.announce_devices()
    workers.start("w1", crash_at="aggregator.after_commit@1")  # counted, but its batch never acknowledged
    workers.wait_log("w1", "now coordinates")
    workers.start("w2")
    workers.wait_log("w2", "aggregator up")
    updates = workers.publish_updates()
    assert workers.fleet.procs["w1"].wait(timeout=60) == -9, workers.fleet.tail("w1")
    workers.wait_log("w2", "now coordinates")  # PostgreSQL freed the dead coordinator's lock
    workers.fleet.restart("w1")  # its session's unacknowledged batch comes back to it: duplicates now
    status = workers.status()
    workers.assert_counted_once(updates, status)
    workers.exited_cleanly()
