"""The distributed system with real processes and a real broker: an aggregator process, one agent
process per federated subject on the real recordings, crashes by real SIGKILL.

The strongest check is arithmetic: the aggregator's final global head must equal, to float rounding,
the one `edge-fl simulate` computes with the same strategy, seed and rounds. An update lost or
counted twice anywhere changes that weighted mean.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.broker import LocalBroker
from edge_agent.codec.tensor_pack import unpack_tensors
from edge_agent.data.partition import CLIENT_SUBJECTS, PartitionConfig
from edge_agent.demo import Fleet, write_agent_config, write_aggregator_config
from edge_agent.learning.training import TrainingConfig
from edge_agent.data.federated import federate
from edge_agent.sim import run_simulation
from edge_agent.transport import Message, MqttLink

pytestmark = pytest.mark.fleet
FLEET = "test"
CLIENTS = [f"subject-{s:02d}" for s in CLIENT_SUBJECTS]


class Run:
    """An aggregator and agents started against one broker, watched through a monitor link."""

    def __init__(self, broker: LocalBroker, workdir: Path, *, strategy: str = "fedavg", rounds: int = 3,
                 seed: int = 0, deadline_s: float = 60.0, codec: str = "") -> None:
        self.broker, self.workdir = broker, workdir
        self.fleet = Fleet(workdir)
        self.rounds, self.strategy, self.seed, self.codec = rounds, strategy, seed, codec
        self.monitor = MqttLink("monitor", broker.host, broker.port, username="aggregator",
                                password=broker.users["aggregator"], clean_start=True,
                                reconnect_min_s=0.1, reconnect_max_s=0.5)
        self.monitor.connect(timeout=10)
        self.monitor.subscribe(f"edgefl/{FLEET}/status", qos=1)
        b = (broker.host, broker.port)
        self.agg_config = write_aggregator_config(workdir, *b, "aggregator", broker.users["aggregator"], fleet=FLEET,
                                                  clients=len(CLIENTS),
                                                  train=TrainingConfig(strategy=strategy, rounds=rounds, seed=seed,
                                                                       codec=codec),
                                                  deadline_s=deadline_s)
        self.agent_configs = {
            cid: write_agent_config(workdir, *b, "device", broker.users["device"], fleet=FLEET, subject=s,
                                    rng_stream=i, partition=PartitionConfig("natural", seed=seed))
            for i, (cid, s) in enumerate(zip(CLIENTS, CLIENT_SUBJECTS))}

    def start_aggregator(self, crash_at: str | None = None) -> subprocess.Popen[bytes]:
        env = {"EDGEFL_CRASH_AT": crash_at} if crash_at else None
        return self.fleet.spawn("aggregator", "aggregator", "--config", str(self.agg_config), "--exit-when-done",
                                env=env)

    def start_agent(self, cid: str, crash_at: str | None = None) -> subprocess.Popen[bytes]:
        env = {"EDGEFL_CRASH_AT": crash_at} if crash_at else None
        return self.fleet.spawn(cid, "agent", "--config", str(self.agent_configs[cid]), env=env)

    def start_all(self, crash: dict[str, str] | None = None) -> None:
        crash = crash or {}
        self.start_aggregator(crash.get("aggregator"))
        for cid in CLIENTS:
            self.start_agent(cid, crash.get(cid))

    def wait_status(self, round_no: int, timeout: float = 90.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                msg = self.monitor.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(msg, Message) and msg.payload:
                doc = json.loads(msg.payload)
                if doc["round"] >= round_no:
                    return doc
        raise AssertionError(f"round {round_no} did not close within {timeout} s; aggregator log:\n"
                             f"{self.fleet.tail('aggregator', 60)}")

    def final_global(self) -> tuple[int, dict[str, np.ndarray]]:
        db = sqlite3.connect(self.workdir / "aggregator.db")
        version, blob = db.execute("SELECT version, blob FROM globals ORDER BY version DESC LIMIT 1").fetchone()
        return version, unpack_tensors(blob)

    def accepted_per_round(self) -> dict[int, int]:
        db = sqlite3.connect(self.workdir / "aggregator.db")
        return dict(db.execute("SELECT round, COUNT(*) FROM accepted GROUP BY round").fetchall())

    def close(self) -> None:
        self.fleet.stop()
        self.monitor.close()


@pytest.fixture
def run(broker: LocalBroker, tmp_path: Path) -> Iterator[Run]:
    r = Run(broker, tmp_path)
    yield r
    r.close()


@pytest.fixture(scope="module")
def natural(embedded):  # type: ignore[no-untyped-def]
    return federate(embedded, PartitionConfig("natural", seed=0))


def simulated_global(data, strategy: str, rounds: int, seed: int, codec: str = "") -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    servers = []
    run_simulation(data, TrainingConfig(strategy=strategy, rounds=rounds, seed=seed, codec=codec),
                   watch_server=servers.append)
    return servers[-1].params


def assert_same_global(run: Run, natural) -> None:  # type: ignore[no-untyped-def]
    version, params = run.final_global()
    assert version == run.rounds
    want = simulated_global(natural, run.strategy, run.rounds, run.seed, run.codec)
    assert set(params) == set(want)
    for k in want:
        np.testing.assert_allclose(params[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert run.accepted_per_round() == {r: len(CLIENTS) for r in range(1, run.rounds + 1)}


def test_rounds_over_the_broker_compute_what_the_simulation_computes(run: Run, natural) -> None:  # type: ignore[no-untyped-def]
    run.start_all()
    status = run.wait_status(run.rounds)
    assert status["reporting"] == len(CLIENTS) and status["rejected"] == 0 and status["last"]
    assert run.fleet.procs["aggregator"].wait(timeout=10) == 0  # --exit-when-done
    assert_same_global(run, natural)


@pytest.mark.parametrize("who, point", [
    ("subject-05", "agent.after_commit"),   # trained and queued, never sent
    ("subject-05", "agent.after_puback"),   # delivered, but the outbox row survived the crash
    ("aggregator", "aggregator.before_commit"),  # received, not counted, no PUBACK: the broker redelivers
    ("aggregator", "aggregator.after_commit"),   # counted, no PUBACK: the redelivery must not count again
])
def test_sigkill_and_restart_lose_nothing_and_count_nothing_twice(run: Run, natural, who: str, point: str) -> None:  # type: ignore[no-untyped-def]
    run.start_all(crash={who: f"{point}@2"})
    proc = run.fleet.procs[who]
    assert proc.wait(timeout=90) == -9, f"{who} was expected to die by SIGKILL at {point}"
    run.fleet.restart(who)
    status = run.wait_status(run.rounds)
    assert status["last"]
    assert_same_global(run, natural)
    log = (run.workdir / f"{who}.log").read_text()
    if who == "aggregator":
        assert "resuming round 2" in log
    if point in ("agent.after_puback", "aggregator.after_commit"):
        agg_log = (run.workdir / "aggregator.log").read_text()
        assert "ignored a redelivery" in agg_log or "late or early" in agg_log


@pytest.fixture
def compressed(broker: LocalBroker, tmp_path: Path) -> Iterator[Run]:
    # sign1+rot: lossy (one bit a value), seeded (the rotation), with error feedback carried from round to round
    r = Run(broker, tmp_path, codec="sign1+rot")
    yield r
    r.close()


def test_compressed_updates_over_the_broker_compute_what_the_simulation_computes(compressed: Run, natural) -> None:  # type: ignore[no-untyped-def]
    compressed.start_all()
    status = compressed.wait_status(compressed.rounds)
    assert status["reporting"] == len(CLIENTS) and status["rejected"] == 0 and status["last"]
    assert_same_global(compressed, natural)  # the seeds, the residuals and the frames agree across processes


def test_a_compressing_agent_killed_after_its_commit_keeps_its_update_and_residual_together(
        compressed: Run, natural) -> None:  # type: ignore[no-untyped-def]
    compressed.start_all(crash={"subject-05": "agent.after_commit@2"})
    assert compressed.fleet.procs["subject-05"].wait(timeout=90) == -9
    compressed.fleet.restart("subject-05")  # sends round 2's frame from its outbox, then trains round 3 from the
    status = compressed.wait_status(compressed.rounds)  # residual committed with it: the simulation's numbers
    assert status["last"]
    assert_same_global(compressed, natural)


def test_broker_restart_mid_run(run: Run, natural) -> None:  # type: ignore[no-untyped-def]
    run.start_all()
    run.wait_status(1)
    run.broker.kill()  # a crash, not a clean stop
    run.broker.restart()  # same port; persistence keeps sessions and retained messages
    status = run.wait_status(run.rounds, timeout=120)
    assert status["last"]
    assert_same_global(run, natural)
