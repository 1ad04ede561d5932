"""The learning core and codecs stay pure: no transport, no interpreter, no files, no threads."""

import json
import subprocess
import sys

FORBIDDEN = ["paho", "serial", "ai_edge_litert", "tflite_runtime", "tensorflow", "torch",
             "sqlite3", "edge_agent.backbone", "edge_agent.sim", "edge_agent.data", "edge_agent.cli",
             "edge_agent.state_io", "edge_agent.fsutil"]


def test_core_imports_nothing_impure() -> None:
    code = (
        "import sys, json\n"
        "import edge_agent.learning.head, edge_agent.learning.strategies, edge_agent.learning.quant\n"
        "import edge_agent.learning.features, edge_agent.learning.metrics, edge_agent.learning.aggregate\n"
        "import edge_agent.codec.tensor_pack\n"
        "import firmware_bridge.framing, firmware_bridge.messages, firmware_bridge.head_blob\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    bad = [m for m in loaded for f in FORBIDDEN if m == f or m.startswith(f + ".")]
    assert not bad, f"the pure core pulled in {bad}"
    assert "edge_agent.learning.head" in loaded  # the probe really imported the core
    assert "firmware_bridge.framing" in loaded


# The serial codecs may import only these: no port, thread, file or clock access (numpy itself loads
# threading, so sys.modules cannot tell; the modules' own import statements can).
PURE_BRIDGE_MODULES = ["framing", "messages", "head_blob", "error_replies"]
BRIDGE_ALLOWED_IMPORTS = {"__future__", "binascii", "collections.abc", "dataclasses", "enum", "math", "struct", "typing",
                          "zlib", "numpy", "edge_agent.learning.head", "firmware_bridge.framing",
                          "firmware_bridge.error_replies"}


def test_firmware_bridge_codecs_import_nothing_impure() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "firmware_bridge"
    for name in PURE_BRIDGE_MODULES:
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = ["firmware_bridge." + (node.module or "") if node.level else node.module or ""]
            else:
                continue
            bad = [m for m in mods if m not in BRIDGE_ALLOWED_IMPORTS]
            assert not bad, f"firmware_bridge/{name}.py imports {bad}"


def test_device_install_does_not_need_tensorflow_for_the_simulation() -> None:
    code = (
        "import sys, edge_agent.sim, edge_agent.cli\n"
        "print(int(any(m.split('.')[0] in {'tensorflow', 'torch', 'sklearn', 'scipy', 'seglearn'} for m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"


def test_messaging_and_the_memory_broker_do_not_import_paho() -> None:
    # transport.py is the one module that imports paho; the simulation's broker runs without it.
    code = (
        "import sys, json\n"
        "import edge_agent.messaging, edge_agent.memory_broker\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    bad = [m for m in loaded if m == "paho" or m.startswith("paho.") or m == "edge_agent.transport"]
    assert not bad, f"the paho-free link modules pulled in {bad}"
    assert "edge_agent.memory_broker" in loaded
