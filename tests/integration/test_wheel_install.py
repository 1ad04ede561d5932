"""`pip install edge-fl` gives a working product: the wheel, built from the source tree, installed into a
fresh venv outside it, with the recordings fetched the way the README tells users (`edge-fl data fetch`).

Every command runs from the installed `edge-fl` entry point with a working directory outside the source
tree and without it on sys.path, so a file found relative to the checkout, or a module left out of the
wheel, fails here. The venv is built once per module (about 20 s: the wheel, the venv, the
dependencies from pip's cache) and shared by the tests.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.broker import LocalBroker
from edge_agent.protocol import Topics
from edge_agent.transport import Message, MqttLink

pytestmark = pytest.mark.wheel
ROOT = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 600.0  # a cold pip cache downloads numpy and LiteRT


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path
    cwd: Path  # outside the source tree
    env: dict[str, str]

    @property
    def edge_fl(self) -> str:
        return str(self.venv / "bin" / "edge-fl")

    def run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.edge_fl, *args], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def python(self, code: str) -> str:
        done = subprocess.run([str(self.venv / "bin" / "python"), "-c", code], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout


def _checked(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _clean_checkout(into: Path) -> Path:
    """The files of a fresh clone as they are in the working tree (tracked and new, never ignored):
    what CI builds from, without the build/, egg-info or venvs a developer's tree may hold."""
    listed = _checked(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not in the checkout
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def _installed_env(base: Path) -> dict[str, str]:
    """The outer environment without anything that points into the source tree or its venv; a home, a
    cache and a data directory of its own, so nothing the developer's machine has fetched is found."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "EDGEFL_WATCH_DATASET", "XDG_DATA_HOME", "PYTHONHOME"}}
    outer_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != outer_bin)
    for name in ("home", "cache", "data"):
        (base / name).mkdir()
    env.update(HOME=str(base / "home"), XDG_CACHE_HOME=str(base / "cache"), EDGEFL_DATA_DIR=str(base / "data"),
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel-install")
    src = _clean_checkout(base / "src")
    _checked([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
              "-q", "-w", str(base / "dist"), str(src)])
    (wheel,) = (base / "dist").glob("edge_fl-*.whl")
    venv = base / "venv"
    # A venv as `python -m venv` makes it, with pip (`edge-fl data fetch` runs it), filled by this pip:
    # ensurepip and byte-compiling every dependency would double the time for nothing this test checks.
    _checked([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _checked([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-compile",
              "--disable-pip-version-check", "-q", "pip", str(wheel)])
    env = _installed_env(base)
    (base / "work").mkdir()
    result = Installed(venv=venv, wheel=wheel, cwd=base / "work", env=env)
    # The data as the README says; pip's own cache (outside the isolated home) spares a download per run.
    pip_cache = _checked([sys.executable, "-m", "pip", "cache", "dir"]).stdout.strip()
    fetch = subprocess.run([result.edge_fl, "data", "fetch"], cwd=result.cwd, env={**env, "PIP_CACHE_DIR": pip_cache},
                           capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    assert fetch.returncode == 0, fetch.stderr
    assert (base / "data" / "watch_dataset.npy").is_file(), fetch.stdout
    return result


def test_the_wheel_holds_every_module_the_model_the_configs_the_templates_and_the_license(
        installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for pkg in ("edge_agent", "firmware_bridge") for p in (ROOT / pkg).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules - names == set(), "modules left out of the wheel: add their package to pyproject.toml"
    for shipped in ("models/backbone_int8.tflite", "models/backbone_int8.json", "models/backbone_hapt_int8.tflite",
                    "models/backbone_hapt_int8.json", "broker_config/mosquitto-dev.conf",
                    "broker_config/mosquitto-prod.conf", "broker_config/acl.example",
                    *(str(p.relative_to(ROOT)) for p in (ROOT / "deploy").rglob("*") if p.is_file())):
        assert f"edge_agent/bundled/{shipped}" in names, f"{shipped} is not in the wheel"
    assert {"edge_agent/py.typed", "firmware_bridge/py.typed"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "scripts/")) for n in names)


def test_installed_files_resolve_inside_site_packages(installed: Installed) -> None:
    out = installed.python(
        "import json, edge_agent, edge_agent.backbone as b, edge_agent.broker as k, edge_agent.resources as r\n"
        "from edge_agent.data.watch import locate_watch_dataset\n"
        "print(json.dumps([edge_agent.__file__, str(b.DEFAULT_MODEL), str(b.DEFAULT_MODEL.with_suffix('.json')),\n"
        "    str(k.DEV_CONFIG), str(r.broker_config('acl.example')), str(r.deploy_file('agent.example.toml')),\n"
        "    str(r.deploy_file('termux/run')), str(locate_watch_dataset())]))")
    *package_files, dataset = (Path(p) for p in json.loads(out))
    site = installed.venv / "lib"
    for path in package_files:
        assert path.is_file(), path
        assert path.is_relative_to(site) and not path.is_relative_to(ROOT), path
    assert dataset == Path(installed.env["EDGEFL_DATA_DIR"]) / "watch_dataset.npy"
    located = installed.run("data", "path")
    assert located.returncode == 0 and located.stdout.strip() == str(dataset), located


def test_data_commands_say_what_is_wrong_in_one_line(installed: Installed, tmp_path: Path) -> None:
    empty = {**installed.env, "EDGEFL_DATA_DIR": str(tmp_path)}
    missing = subprocess.run([installed.edge_fl, "data", "path"], cwd=installed.cwd, env=empty,
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 1 and missing.stdout == "", missing
    assert "watch_dataset.npy not found" in missing.stderr and "edge-fl data fetch" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    not_the_wheel = tmp_path / "seglearn-1.2.5-py3-none-any.whl"
    not_the_wheel.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    refused = installed.run("data", "fetch", "--data-dir", str(tmp_path / "out"), "--wheel", str(not_the_wheel))
    assert refused.returncode == 1 and "not the pinned seglearn-1.2.5-py3-none-any.whl" in refused.stderr, refused
    assert not (tmp_path / "out" / "watch_dataset.npy").exists()
    usage = installed.run("data")
    assert usage.returncode == 2 and "fetch" in usage.stderr, usage


def test_version_and_a_small_simulation_from_the_entry_point(installed: Installed) -> None:
    from edge_agent import __version__

    version = installed.run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"edge-fl {__version__}", version
    sim = installed.run("simulate", "--strategy", "fedavg", "--rounds", "2", "--quiet")
    assert sim.returncode == 0, sim.stderr
    row = next(line.split() for line in sim.stdout.splitlines() if line.startswith("fedavg"))
    mean, p10, worst = (float(v) for v in row[1:4])
    # chance is 14.3 % (7 exercises); two FedAvg rounds on the real data reach about 80 %
    assert 50.0 < worst <= p10 <= mean <= 100.0, sim.stdout


def _write_secret(path: Path, secret: str) -> str:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def monitor(broker: LocalBroker) -> Iterator[MqttLink]:
    link = MqttLink("wheel-monitor", broker.host, broker.port, username="aggregator",
                    password=broker.users["aggregator"], clean_start=True, reconnect_min_s=0.1, reconnect_max_s=0.5)
    link.connect(timeout=10)
    yield link
    link.close()


def test_an_installed_aggregator_and_agent_complete_rounds_through_mosquitto(
        installed: Installed, broker: LocalBroker, monitor: MqttLink, tmp_path: Path) -> None:
    fleet, device, rounds = "wheel", "subject-04", 2
    topics = Topics(fleet)
    monitor.subscribe(topics.status, qos=1)
    monitor.subscribe(topics.telemetry(device), qos=1)
    aggregator_toml = tmp_path / "aggregator.toml"
    aggregator_toml.write_text(f"""
state = "{tmp_path / 'aggregator.db'}"
fleet_name = "{fleet}"
[broker]
host = "{broker.host}"
port = {broker.port}
username = "aggregator"
password_file = "{_write_secret(tmp_path / 'aggregator-password', broker.users['aggregator'])}"
[fleet]
expected_clients = 1
min_clients = 1
deadline_s = 60
[train]
strategy = "fedavg"
rounds = {rounds}
""")
    agent_toml = tmp_path / "agent.toml"  # no backbone key: the model the wheel ships
    agent_toml.write_text(f"""
device_id = "{device}"
state_dir = "{tmp_path / 'agent-state'}"
fleet = "{fleet}"
[broker]
host = "{broker.host}"
port = {broker.port}
username = "device"
password_file = "{_write_secret(tmp_path / 'device-password', broker.users['device'])}"
[data]
subject = 4
""")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ("aggregator", "agent")}

    def log_tail() -> str:
        return "\n".join(f"--- {n} ---\n{p.read_text(errors='replace')[-3000:]}" for n, p in logs.items() if p.exists())

    def spawn(name: str, *args: str) -> None:
        with open(logs[name], "wb") as log:
            procs[name] = subprocess.Popen([installed.edge_fl, *args], cwd=installed.cwd, env=installed.env,
                                           stdout=log, stderr=subprocess.STDOUT)

    try:
        spawn("aggregator", "aggregator", "--config", str(aggregator_toml), "--exit-when-done")
        spawn("agent", "agent", "--config", str(agent_toml))
        status: dict[str, object] = {}
        evaluation: dict[str, object] = {}
        deadline = time.monotonic() + 60.0
        while not (status.get("last") and evaluation.get("version") == rounds):
            for name, proc in procs.items():
                assert proc.poll() in (None, 0), f"{name} exited {proc.returncode}\n{log_tail()}"
            assert time.monotonic() < deadline, f"round {rounds} not closed and evaluated in 60 s\n{log_tail()}"
            try:
                item = monitor.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(item, Message) and item.payload:
                doc = json.loads(item.payload)
                if item.topic == topics.status:
                    status = doc
                else:
                    evaluation = doc
        assert status["round"] == rounds and status["succeeded"] and status["reporting"] == 1, status
        assert status["rejected"] == 0, status
        personal = evaluation["personal_acc"]
        assert isinstance(personal, float) and 0.5 < personal <= 1.0, evaluation  # chance: 1/7
        assert procs["aggregator"].wait(timeout=30) == 0, log_tail()  # --exit-when-done
        procs["agent"].terminate()
        assert procs["agent"].wait(timeout=30) == 0, log_tail()  # SIGTERM is a clean stop
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
