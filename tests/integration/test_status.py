"""`edge-fl status` against a real Mosquitto and a real aggregator that ran real rounds."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from edge_agent.broker import LocalBroker
from edge_agent.cli import main
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.status import StatusQuery, run_status

from .mqtt_fleet import FLEET, RunningFleet, running_fleet


@pytest.fixture(scope="module")
def fed(embedded: Any) -> FederatedData:
    return federate(embedded, PartitionConfig())


@pytest.fixture
def fleet(broker: LocalBroker, fed: FederatedData, tmp_path: Path) -> Any:
    with running_fleet(broker, fed, tmp_path, rounds=2) as f:
        f.wait_for("the last round", f.aggregator.done.is_set)
        f.wait_for("every device's accuracy for every round", f.all_rounds_have_accuracy)
        yield f


def _password_file(broker: LocalBroker, tmp_path: Path) -> Path:
    path = tmp_path / "aggregator-password"
    path.write_text(broker.users["aggregator"] + "\n")
    return path


def test_status_json_reports_the_fleet_from_mqtt_and_the_state_database(
        fleet: RunningFleet, broker: LocalBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--broker", f"{broker.host}:{broker.port}", "--fleet", FLEET, "--username", "aggregator",
                 "--password-file", str(_password_file(broker, tmp_path)), "--state", str(fleet.state), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    assert doc["fleet"] == FLEET and doc["problems"] == []
    assert doc["model"] == {"version": 2, "strategy": "fedavg", "rounds": 2}
    assert doc["devices_online"] == 2 and doc["online"] == ["dev-0", "dev-1"]
    assert doc["finished"] is True and doc["current_round"] is None
    last = doc["last_round"]
    assert last["round"] == 2 and last["succeeded"] and last["reporting"] == 2 and last["rejected"] == 0
    history = doc["history"]
    assert [r["round"] for r in history] == [1, 2]
    snapshot = {r["round"]: r for r in fleet.aggregator.view.snapshot()["rounds"]}
    for r in history:
        assert r["succeeded"] and r["reported"] == 2 and r["selected"] == 2 and r["rejected"] == 0
        assert r["bytes_in"] == snapshot[r["round"]]["bytes_in"] > 0
        assert r["personal_acc"] == pytest.approx(snapshot[r["round"]]["personal_acc"])
        assert r["devices_reporting_acc"] == 2
    assert history[-1]["bytes_in"] == last["bytes_in"]


def test_status_text_and_watch(fleet: RunningFleet, broker: LocalBroker) -> None:
    out = io.StringIO()
    printed: list[int] = []

    def stop() -> bool:  # after the second print
        printed.append(out.getvalue().count("fleet ops"))
        return printed[-1] >= 2

    query = StatusQuery(FLEET, broker.host, broker.port, username="aggregator", password=broker.users["aggregator"],
                        state_db=str(fleet.state))
    assert run_status(query, out, watch_s=0.1, stop=stop) == 0
    text = out.getvalue()
    assert text.count("fleet ops") == 2
    assert "global model: version 2, strategy fedavg, 2 rounds planned" in text
    assert "devices: 2 online, 0 offline" in text and "current round: none, all rounds done" in text
    assert "last closed round 2: succeeded, 2/2 reported, 0 rejected" in text
    assert text.count("    2 ok              2/2        0") == 2, text


def test_status_exits_1_with_one_line_when_no_aggregator_published(
        broker: LocalBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--broker", f"{broker.host}:{broker.port}", "--fleet", "nobody", "--username",
                 "aggregator", "--password-file", str(_password_file(broker, tmp_path)), "--timeout", "3"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "holds nothing from an aggregator of fleet 'nobody'" in err


def test_status_exits_1_with_one_line_when_no_broker_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["status", "--broker", f"127.0.0.1:{port}", "--timeout", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and f"no MQTT broker answered at 127.0.0.1:{port}" in err
