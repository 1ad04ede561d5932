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
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    bad = [m for m in loaded for f in FORBIDDEN if m == f or m.startswith(f + ".")]
    assert not bad, f"the pure core pulled in {bad}"
    assert "edge_agent.learning.head" in loaded  # the probe really imported the core


def test_device_install_does_not_need_tensorflow_for_the_simulation() -> None:
    code = (
        "import sys, edge_agent.sim, edge_agent.cli\n"
        "print(int(any(m.split('.')[0] in {'tensorflow', 'torch', 'sklearn', 'scipy', 'seglearn'} for m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"
