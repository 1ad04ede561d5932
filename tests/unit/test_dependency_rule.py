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


# --- the layer rules, over every import statement (module level or inside functions) -----------------

PACKAGES = ("edge_agent", "firmware_bridge")
# Pure: numpy and the standard library's computing modules in, numbers or bytes out. No port, socket,
# file, database, thread, clock or interpreter.
PURE = ("edge_agent.learning", "edge_agent.codec", "edge_agent.aggregator.rounds", "edge_agent.protocol",
        "edge_agent.fleet", "firmware_bridge.framing", "firmware_bridge.messages", "firmware_bridge.head_blob",
        "firmware_bridge.error_replies", "firmware_bridge.emulator.staging")
# importlib: codec.digest picks the builtin sha256 module by name. cryptography: codec.signing's Ed25519 sign and
# verify, pure functions of bytes and keys (key files and the device registry are edge_agent.keys, outside the core).
PURE_MAY_IMPORT_EXTERNAL = {"__future__", "abc", "binascii", "collections", "cryptography", "dataclasses", "enum",
                            "functools", "hashlib", "importlib", "itertools", "json", "math", "numpy", "re", "struct",
                            "typing", "uuid",
                            "zlib"}
SERVICES = ("edge_agent.agent", "edge_agent.aggregator")
SIMULATOR_AND_TOOLS = ("edge_agent.sim", "edge_agent.demo", "edge_agent.cli", "edge_agent.report")


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _import_graph() -> dict[str, set[str]]:
    """module -> every module it imports (absolute names), read from the source with ast."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            module = ".".join(parts)
            here = parts if is_pkg else parts[:-1]  # the package relative imports start from
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = here[:len(here) - node.level + 1] if node.level else []
                    target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                    found.add(target)
                    # `from . import rounds` imports a module, not a name
                    found.update(f"{target}.{a.name}" for a in node.names)
            graph[module] = found
    return graph


def test_the_layer_rules_hold_for_every_module() -> None:
    graph = _import_graph()
    ours = set(graph)
    assert {"edge_agent.sim", "edge_agent.agent.service", "firmware_bridge.link",
            "edge_agent.learning.head"} <= ours  # the walk really saw the packages
    problems = []
    for module, imports in sorted(graph.items()):
        internal = {m for m in imports if m in ours}
        external = {m.split(".")[0] for m in imports if m.split(".")[0] not in PACKAGES}
        if _in(module, PURE):
            bad = sorted(m for m in internal if not _in(m, PURE) and m not in PACKAGES)
            bad += sorted(external - PURE_MAY_IMPORT_EXTERNAL)
            if bad:
                problems.append(f"{module} is pure but imports {bad}")
        if module.startswith("firmware_bridge."):
            bad = sorted(m for m in internal if m.startswith("edge_agent.")
                         and (_in(m, SERVICES) or _in(m, SIMULATOR_AND_TOOLS)
                              or _in(m, ("edge_agent.transport", "edge_agent.memory_broker"))))
            if bad:
                problems.append(f"{module}: the serial bridge may use edge-fl's core, not {bad}")
        if _in(module, SERVICES):
            bad = sorted(m for m in internal if _in(m, SIMULATOR_AND_TOOLS))
            if bad:
                problems.append(f"{module} is a service but imports the simulator or a tool: {bad}")
        if _in(module, ("edge_agent.learning", "edge_agent.codec")):
            bad = sorted(m for m in internal if not _in(m, ("edge_agent.learning", "edge_agent.codec")))
            if bad:
                problems.append(f"{module} is the learning/codec core but imports {bad}")
    assert not problems, "\n".join(problems)
