"""The aggregator's status page, /api/status and /metrics, served by a real aggregator that ran real rounds
through a real Mosquitto, and the page rendered by its own JavaScript in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edge_agent.broker import LocalBroker
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import PartitionConfig

from .mqtt_fleet import FLEET, RunningFleet, running_fleet

pytest.importorskip("prometheus_client")


@pytest.fixture(scope="module")
def fed(embedded: Any) -> FederatedData:
    return federate(embedded, PartitionConfig())


@pytest.fixture
def fleet(broker: LocalBroker, fed: FederatedData, tmp_path: Path) -> Any:
    with running_fleet(broker, fed, tmp_path, rounds=3, http="127.0.0.1:0") as f:
        f.wait_for("the last round", f.aggregator.done.is_set)
        f.wait_for("every device's accuracy for every round", f.all_rounds_have_accuracy)
        yield f


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers["Content-Type"], r.read()


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/setup --dev installs it")
        pytest.skip("chromium is not installed (scripts/setup --dev installs it)")
    return exe


def test_the_status_page_renders_rounds_devices_and_the_accuracy_chart_in_chromium(
        fleet: RunningFleet, tmp_path: Path) -> None:
    assert fleet.aggregator.http is not None
    url = fleet.aggregator.http.url + "/"
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90)
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'data-rendered="1"' in dom, f"the page's script did not render:\n{dom[:3000]}\n{result.stderr[-2000:]}"
    assert f'<span id="fleet">{FLEET}</span>' in dom
    snapshot = fleet.aggregator.view.snapshot()
    # The rounds table: one row per round, newest first, with what the aggregator counted.
    rows = re.findall(r'<tr data-round="(\d+)">(.*?)</tr>', dom)
    assert [int(r) for r, _ in rows] == [3, 2, 1]
    for (_, row), want in zip(rows, reversed(snapshot["rounds"]), strict=True):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert cells[1] == "succeeded" and cells[2] == "2 / 2" and cells[3] == "0"
        assert cells[4] == str(want["bytes_in"]) and int(want["bytes_in"]) > 0
        assert cells[6] == f"{100 * want['personal_acc']:.1f}"
    # The chart: one point per round at the accuracy the devices reported.
    points = re.findall(r'<circle [^>]*data-round="(\d+)" data-acc="([\d.]+)"', dom)
    assert [int(r) for r, _ in points] == [1, 2, 3]
    assert [a for _, a in points] == [f"{100 * r['personal_acc']:.1f}" for r in snapshot["rounds"]]
    assert '<polyline points="' in dom
    # The devices, both online.
    devices = re.findall(r'<tr data-device="(dev-\d)"[^>]*><td>dev-\d</td><td>(\w+)</td>', dom)
    assert sorted(devices) == [("dev-0", "online"), ("dev-1", "online")]


def test_api_status_and_prometheus_metrics_say_what_happened(fleet: RunningFleet) -> None:
    assert fleet.aggregator.http is not None
    base = fleet.aggregator.http.url
    code, ctype, body = _get(base + "/api/status")
    doc = json.loads(body)
    assert code == 200 and ctype == "application/json"
    assert doc["fleet"] == FLEET and doc["online"] == 2 and doc["model_version"] == 3
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3] and all(r["succeeded"] for r in doc["rounds"])
    assert all(0.0 <= r["personal_acc"] <= 1.0 for r in doc["rounds"])

    code, ctype, body = _get(base + "/metrics")
    text = body.decode()
    assert code == 200 and ctype.startswith("text/plain")

    def value(sample: str) -> float:
        m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        assert m, f"{sample} missing from /metrics"
        return float(m.group(1))

    assert value("edgefl_rounds_opened_total") == 3 and value("edgefl_rounds_closed_total") == 3
    assert value("edgefl_rounds_failed_total") == 0
    assert value("edgefl_updates_accepted_total") == 6
    assert value('edgefl_updates_rejected_total{reason="not_selected"}') == 0
    assert value("edgefl_update_bytes_received_total") == sum(r["bytes_in"] for r in doc["rounds"])
    assert value("edgefl_round_duration_seconds_count") == 3
    assert value("edgefl_devices_online") == 2 and value("edgefl_current_round") == 3
    assert value("edgefl_global_model_version") == 3

    with pytest.raises(urllib.error.HTTPError) as err:  # read-only
        urllib.request.urlopen(urllib.request.Request(base + "/api/status", data=b"{}", method="POST"), timeout=10)
    assert err.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/nothing-here", timeout=10)
    assert err.value.code == 404
