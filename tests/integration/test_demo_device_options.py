"""`edge-fl demo --augment-copies N --per-user-standardization`: every agent the demo starts gets the keys in its
[data] table, trains on its labelled windows and N copies of each, and the results say what the devices did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig, load_toml, read_toml

from .test_demo import DemoProcess, _processes_mentioning

pytestmark = pytest.mark.fleet
DEVICES = ("subject-04", "subject-05")


def test_every_agent_of_the_demo_gets_the_device_options_and_the_results_record_them(tmp_path: Path) -> None:
    out, workdir = tmp_path / "demo.json", tmp_path / "work"
    args = ["--agents", "2", "--rounds", "2", "--strategy", "ditto", "--regime", "few-shot", "--shots", "3",
            "--per-user-standardization", "--augment-copies", "2", "--workdir", str(workdir), "--out", str(out)]
    code, stdout, stderr = DemoProcess(args, tmp_path).finish(timeout=170)
    assert code == 0, stdout + stderr
    assert "(ditto, few-shot, 2 rounds, seed 0, 2 augmented copies, per-user standardization); logs in" in stdout
    for device in DEVICES:
        data = load_toml(workdir / f"{device}.toml", AgentConfig).data  # as the agent read it
        assert (data.augment_copies, data.per_user_standardization) == (2, True), device
        # 3 labelled windows of each of the 7 exercises, and 2 copies of each: what the agent trained on.
        assert "round 1: trained on 63 windows" in (workdir / f"{device}.log").read_text(), device
    doc = json.loads(out.read_text())
    assert doc["data_options"] == {"augment_copies": 2, "per_user_standardization": True}
    assert [r["clients_reporting"] for r in doc["rounds"]] == [2, 2]
    assert _processes_mentioning(str(workdir)) == []


def test_without_the_flags_the_agents_configs_and_the_results_are_as_before(tmp_path: Path) -> None:
    out, workdir = tmp_path / "demo.json", tmp_path / "work"
    args = ["--agents", "1", "--rounds", "1", "--workdir", str(workdir), "--out", str(out)]
    code, stdout, stderr = DemoProcess(args, tmp_path).finish(timeout=170)
    assert code == 0, stdout + stderr
    data = read_toml(workdir / "subject-04.toml")["data"]
    assert not {"augment_copies", "per_user_standardization"} & set(data), data  # the agent's defaults
    doc = json.loads(out.read_text())
    assert "data_options" not in doc and not {"augment_copies", "per_user_standardization"} & set(doc["config"])
