"""An agent whose data comes from an attached (emulated) microcontroller: it collects the MCU's
labelled windows, trains when a round selects it, uploads through the real broker, and pushes its new
personalized int8 head back to the MCU, which then infers with it."""

from __future__ import annotations

import json
import queue
import sqlite3
import time
from pathlib import Path

import pytest

from edge_agent.broker import LocalBroker
from edge_agent.learning.training import TrainingConfig
from edge_agent.demo import Fleet, _toml, write_aggregator_config
from edge_agent.transport import Message, MqttLink
from firmware_bridge.emulator import EmulatedMcu

pytestmark = pytest.mark.fleet
FLEET = "bridge"


def test_agent_trains_on_mcu_windows_and_pushes_its_head_back(broker: LocalBroker, tmp_path: Path) -> None:
    emu = EmulatedMcu.on_pty(subject=6, speedup=20)  # 40 windows/s instead of 2
    emu2 = EmulatedMcu.on_pty(subject=6, speedup=20, labelled=False)  # a second MCU on the same agent
    fleet = Fleet(tmp_path)
    monitor = MqttLink("monitor", broker.host, broker.port, username="aggregator",
                       password=broker.users["aggregator"], clean_start=True)
    try:
        monitor.connect(timeout=10)
        monitor.subscribe(f"edgefl/{FLEET}/status")
        agg = write_aggregator_config(tmp_path, broker.host, broker.port, "aggregator", broker.users["aggregator"],
                                      fleet=FLEET, clients=1, train=TrainingConfig(strategy="ditto", rounds=2, seed=0),
                                      deadline_s=60)
        agent_cfg = tmp_path / "mcu-agent.toml"
        agent_cfg.write_text(_toml(
            {"broker": {"host": broker.host, "port": broker.port, "username": "device",
                        "password": broker.users["device"]},
             "data": {"source": "serial", "port": emu.port_url, "more_ports": [emu2.port_url], "min_windows": 40}},
            {"device_id": "pi-with-mcu", "state_dir": str(tmp_path / "state"), "fleet": FLEET}))
        fleet.spawn("aggregator", "aggregator", "--config", str(agg), "--exit-when-done")
        fleet.spawn("agent", "agent", "--config", str(agent_cfg))
        statuses: dict[int, dict] = {}
        end = time.monotonic() + 90
        while len(statuses) < 2 and time.monotonic() < end:
            fleet.check()
            try:
                msg = monitor.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(msg, Message) and msg.payload:
                doc = json.loads(msg.payload)
                statuses[doc["round"]] = doc
        assert set(statuses) == {1, 2}, f"rounds closed: {sorted(statuses)}\n{fleet.tail('agent', 40)}"
        assert all(s["reporting"] == 1 and s["rejected"] == 0 for s in statuses.values()), statuses
        # The MCU runs the head the agent pushed after its last round, and answers with it.
        end = time.monotonic() + 30
        while (emu.head_id is None or emu2.head_id is None) and time.monotonic() < end:
            time.sleep(0.1)  # the emulator exposes no event for a commit; bounded poll of its state
        assert emu.head_id is not None and emu2.head_id is not None, fleet.tail("agent", 40)
        log = (tmp_path / "agent.log").read_text()
        assert f"pushed head {emu.head_id} " in log and f"pushed head {emu2.head_id} " in log
        # The user's data stayed on the device: in its own store, as embeddings (not raw windows), never in what
        # it uploaded.
        db = sqlite3.connect(tmp_path / "state" / "agent.db")
        assert db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0] >= 40
        assert db.execute("SELECT COUNT(*) FROM windows").fetchone()[0] == 0
        db.close()
    finally:
        fleet.stop()
        monitor.close()
        emu.stop()
        emu2.stop()
