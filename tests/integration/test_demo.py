"""`edge-fl demo` end to end: a private broker, the aggregator and six agent processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.data.partition import PartitionConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.data.federated import federate
from edge_agent.sim import run_simulation

from ..conftest import ROOT

pytestmark = pytest.mark.fleet


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.mark.parametrize("fraction, rounds", [(1.0, 6), (0.5, 4)])
def test_demo_matches_simulate_and_leaves_nothing_behind(tmp_path: Path, embedded, fraction: float,  # type: ignore[no-untyped-def]
                                                         rounds: int) -> None:
    out, workdir = tmp_path / "demo.json", tmp_path / "work"
    p = subprocess.run([sys.executable, "-m", "edge_agent.cli", "demo", "--strategy", "ditto", "--rounds", str(rounds),
                        "--seed", "1", "--fraction", str(fraction), "--local-epochs", "2", "--workdir", str(workdir),
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=170)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reporting" in p.stdout and f"   {rounds} " in p.stdout  # the live table reached the last round
    demo = json.loads(out.read_text())
    sim = run_simulation(federate(embedded, PartitionConfig("natural", seed=1)),
                         TrainingConfig(strategy="ditto", rounds=rounds, seed=1, fraction=fraction, local_epochs=2))
    assert len(demo["rounds"]) == rounds
    # The same devices train in the same rounds (the aggregator's selection in both), and every device's
    # accuracy agrees; only the order in which the real aggregator sums updates can move a last float bit.
    assert [r["clients_reporting"] for r in demo["rounds"]] == [r["clients_reporting"] for r in sim["rounds"]]
    assert all(r["clients_reporting"] == round(6 * fraction) and r["rejected"] == 0 for r in demo["rounds"])
    for d_round, s_round in zip(demo["rounds"], sim["rounds"], strict=True):
        assert set(d_round["client_acc"]) == set(s_round["client_acc"])
        for cid, acc in s_round["client_acc"].items():
            assert abs(d_round["client_acc"][cid] - acc) <= 0.01, (d_round["round"], cid, d_round["client_acc"][cid], acc)
    assert abs(demo["summary"]["mean_acc"] - sim["summary"]["mean_acc"]) <= 0.01
    assert _processes_mentioning(str(workdir)) == []  # no agent, aggregator or broker left running


def test_demo_with_an_unreachable_broker_fails_with_one_clear_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "edge_agent.cli", "demo", "--rounds", "1", "--broker",
                        f"127.0.0.1:{port}", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 1
    assert p.stderr.startswith("edge-fl: error:") and f"127.0.0.1:{port}" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
