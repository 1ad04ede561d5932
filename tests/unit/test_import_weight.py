"""What a device agent's process loads before it has any data: a guard on its memory, without timing anything.

A device agent must fit in about 50 MB (bench/device_footprint.py measures the real process). Most of that
is Python, numpy, paho (with OpenSSL) and SQLite, which it needs; one careless import of something it does
not need (matplotlib, prometheus-client, TensorFlow, the simulator, the aggregator's web page) would cost
more than the whole margin, and nothing would fail. These tests import the agent's entry path in a fresh
interpreter, as `edge-fl agent` does before it reads its config, and name what must not be there. Memory
numbers themselves belong to the benchmark, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# `edge-fl agent`: the command-line module with its parser built, the agent service, its sources and config.
AGENT_ENTRY = ("from edge_agent.cli import build_parser; build_parser(); "
               "import edge_agent.agent.service, edge_agent.agent.sources, edge_agent.config")

# Never on the agent's path: not a device dependency, or only another command's (aggregator, simulate, demo,
# status, plots), or a heavy optional runtime a device agent never uses.
NEVER = (
    "matplotlib", "prometheus_client", "tensorflow", "keras", "torch", "jax", "scipy", "sklearn", "pandas",
    "seglearn", "tflite_micro", "http.server", "edge_agent.sim", "edge_agent.memory_broker", "edge_agent.demo",
    "edge_agent.report", "edge_agent.aggregator", "edge_agent.status", "edge_agent.broker",
    "edge_agent.data.federated",
)
# Loaded only once a config asks for them: the TFLite interpreter when a data source needs the backbone,
# pyserial and firmware_bridge when microcontrollers are attached, numpy.random when the first round trains.
ON_DEMAND = ("ai_edge_litert", "tflite_runtime", "serial", "firmware_bridge", "numpy.random")

PROBE = """
import json, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args else None)
{code}
print(json.dumps({{"modules": sorted(sys.modules), "opened": opened}}))
"""


def loaded_by(code: str) -> tuple[set[str], list[str]]:
    """Modules in sys.modules, and files opened, after running `code` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    return set(doc["modules"]), doc["opened"]


def present(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if n in modules or any(m.startswith(n + ".") for m in modules))


@pytest.fixture(scope="module")
def agent_entry() -> tuple[set[str], list[str]]:
    return loaded_by(AGENT_ENTRY)


def test_the_agent_entry_path_imports_nothing_a_device_does_not_need(agent_entry: tuple[set[str], list[str]]) -> None:
    modules, _ = agent_entry
    assert present(modules, NEVER) == []
    assert present(modules, ON_DEMAND) == []
    # What it does need is there: the test would pass vacuously if the import had silently done nothing.
    assert {"numpy", "paho.mqtt.client", "sqlite3", "edge_agent.agent.service"} <= modules


def test_importing_the_agent_reads_no_dataset_and_no_model(agent_entry: tuple[set[str], list[str]]) -> None:
    _, opened = agent_entry
    heavy = [p for p in opened if p.endswith((".npy", ".npz", ".tflite", ".pkl", ".db"))]
    assert heavy == []
    assert any(p.endswith(".py") for p in opened), "the audit hook saw no file at all: the check above proves nothing"


def test_the_learning_core_and_codecs_load_no_transport_storage_or_runtime() -> None:
    modules, opened = loaded_by("import edge_agent.learning.strategies, edge_agent.learning.training, "
                                "edge_agent.codec.envelope, edge_agent.codec.chunking, edge_agent.fleet")
    assert present(modules, ("paho", "ssl", "sqlite3", "serial", "socket", *NEVER, *ON_DEMAND)) == []
    assert "edge_agent.codec.envelope" in modules
    assert not [p for p in opened if p.endswith((".npy", ".npz", ".tflite"))]


def test_building_the_backbone_is_what_loads_the_interpreter() -> None:
    """The reverse check: the guard above is only meaningful if the interpreter does show up when used."""
    modules, opened = loaded_by("from edge_agent.backbone import FrozenBackbone; FrozenBackbone()")
    assert present(modules, ("ai_edge_litert", "tflite_runtime")) != []
    assert any(p.endswith(".tflite") for p in opened)
