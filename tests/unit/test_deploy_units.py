"""The systemd units in deploy/: systemd itself accepts them (`systemd-analyze verify`), they rate 2.5 or
lower in `systemd-analyze security`, they start what deploy/README.md installs, and the memory protection
they ask for (MemoryDenyWriteExecute) does not break the agent's interpreter. The agent's files-source.conf
drop-in opens only the directory the example config and docs/data-format.md name, and keeps the rating.

`scripts/setup --dev` installs systemd-analyze (Debian package `systemd`); without it these tests skip and
say so. Nothing here needs systemd as PID 1."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from edge_agent.cli import main
from edge_agent.config import CREDENTIAL, EXIT_CONFIG, read_toml
from edge_agent.config_tools import unit_credentials, unit_files

from ..conftest import ROOT

DEPLOY = ROOT / "deploy"
UNITS = {
    "edge-fl-agent.service": ("agent", "/etc/edge-fl/agent.toml", "edge-fl"),
    "edge-fl-aggregator.service": ("aggregator", "/etc/edge-fl/aggregator.toml", "edge-fl-aggregator"),
}
# What each unit hands over as credentials (LoadCredential=): production, and with its password.conf drop-in.
CREDENTIALS = {
    "edge-fl-agent.service": {"tls-key": "/etc/edge-fl/tls/device.key", "signing-key": "/etc/edge-fl/device.key"},
    "edge-fl-aggregator.service": {"tls-key": "/etc/edge-fl/tls/aggregator.key",
                                   "signing-key": "/etc/edge-fl/fleet.key"},
}
PASSWORDS = {"edge-fl-agent.service": "/etc/edge-fl/mqtt-password",
             "edge-fl-aggregator.service": "/etc/edge-fl/aggregator-password"}
INSTALLED_BINARY = "/opt/edge-fl/bin/edge-fl"  # the venv deploy/README.md creates
FILES_DROP_IN = DEPLOY / "edge-fl-agent.service.d" / "files-source.conf"
# Where a [data] dir cannot be: the agent's unit hides these (ProtectHome=yes, PrivateTmp=yes), and
# ReadWritePaths= does not bring them back.
HIDDEN_BY_THE_UNIT = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")
MAX_EXPOSURE = 2.5

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian package "
                                                           "`systemd`; scripts/setup --dev installs it)")


def _directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_unit_starts_what_the_install_guide_installs(name: str) -> None:
    command, config, state = UNITS[name]
    d = _directives(DEPLOY / name)
    assert d["ExecStart"] == [f"{INSTALLED_BINARY} {command} --config {config}"]
    assert d["LoadCredential"] == [f"{k}:{v}" for k, v in CREDENTIALS[name].items()]
    assert d["RestartPreventExitStatus"] == [str(EXIT_CONFIG)] and d["Restart"] == ["on-failure"]
    assert d["StateDirectory"] == [state] and d["DynamicUser"] == ["yes"]
    assert d["MemoryDenyWriteExecute"] == ["yes"] and d["CapabilityBoundingSet"] == [""]
    assert d["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    guide = (DEPLOY / "README.md").read_text()
    for step in ("python3 -m venv /opt/edge-fl", f"edge-fl init {command}", config, name,
                 f"{name}.d/password.conf", PASSWORDS[name], *CREDENTIALS[name].values()):
        assert step in guide, f"deploy/README.md does not mention {step!r}, which {name} relies on"
    example = (DEPLOY / f"{command}.example.toml").read_text()
    assert f'"/var/lib/{state}' in example  # the example's state path is inside the unit's StateDirectory


def _sections(unit: Path) -> list[str]:
    return [line.strip() for line in unit.read_text().splitlines() if line.startswith("[")]


def _example_files_dir() -> str:
    """[data] dir of agent.example.toml's commented-out files source, uncommented and read as TOML."""
    lines = (DEPLOY / "agent.example.toml").read_text().splitlines()
    block = []
    for line in lines[lines.index('# source = "files"') - 1:]:  # from its "# [data]" to the next blank line
        if not line.startswith("#"):
            break
        block.append(line.removeprefix("#").removeprefix(" "))
    return str(tomllib.loads("\n".join(block))["data"]["dir"])


def _docs_files_dir() -> str:
    """[data] dir of the config in docs/data-format.md, "Feeding an agent from files"."""
    section = (ROOT / "docs" / "data-format.md").read_text().split("\n## Feeding an agent from files\n", 1)[1]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    return str(tomllib.loads(block)["data"]["dir"])


def test_the_files_drop_in_opens_only_the_data_directory_the_docs_name() -> None:
    assert _sections(FILES_DROP_IN) == ["[Service]"]
    d = _directives(FILES_DROP_IN)
    directory = d["ReadWritePaths"][0]
    # Nothing but the directory, the group that owns it, and a umask that keeps others out.
    assert d == {"ReadWritePaths": [directory], "SupplementaryGroups": ["my-app"], "UMask": ["0007"]}
    assert directory == _example_files_dir() == _docs_files_dir() == "/var/lib/my-app/edge-fl-data"
    assert directory.startswith("/") and not any(directory == hidden or directory.startswith(hidden + "/")
                                                 for hidden in HIDDEN_BY_THE_UNIT)
    unit = _directives(DEPLOY / "edge-fl-agent.service")  # what the drop-in is an exception to
    assert unit["ProtectSystem"] == ["strict"] and unit["UMask"] == ["0077"] and "ReadWritePaths" not in unit
    assert unit_credentials([DEPLOY / "edge-fl-agent.service", FILES_DROP_IN]) == CREDENTIALS["edge-fl-agent.service"]
    guide, docs = (DEPLOY / "README.md").read_text(), (ROOT / "docs" / "data-format.md").read_text()
    installed = "/etc/systemd/system/edge-fl-agent.service.d/files-source.conf"
    for step in (f"edge-fl-agent.service.d/files-source.conf {installed}", "systemctl daemon-reload", directory):
        assert step in guide, f"deploy/README.md does not mention {step!r}, which installing the drop-in needs"
    assert "`deploy/edge-fl-agent.service.d/files-source.conf`" in docs and f"`{installed}`" in docs


def test_the_aggregator_reloads_its_registry_on_systemctl_reload() -> None:
    # cli.py turns SIGHUP into a rescan of the device key registry ([signing] registry).
    assert _directives(DEPLOY / "edge-fl-aggregator.service")["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "signal.SIGHUP" in (ROOT / "edge_agent" / "cli.py").read_text()


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_credentials_loaded_are_the_paths_the_configs_name(name: str, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The units, their password drop-ins, the example configs and `edge-fl init` agree on every credential."""
    command = UNITS[name][0]
    loaded = unit_credentials(unit_files(DEPLOY / name)[:1])
    assert loaded == CREDENTIALS[name]
    with_password = unit_credentials([DEPLOY / name, DEPLOY / f"{name}.d" / "password.conf"])
    assert with_password == {"signing-key": CREDENTIALS[name]["signing-key"], CREDENTIAL: PASSWORDS[name]}
    own = {"tls-key": ("broker", "tls", "key_file"), "signing-key": ("signing", "key")}

    def at(table: dict[str, Any], keys: tuple[str, ...]) -> Any:
        for k in keys:
            table = table[k]
        return table

    example = read_toml(DEPLOY / f"{command}.example.toml")
    monkeypatch.setattr("edge_agent.config_tools.default_config_dir", lambda: Path("/etc/edge-fl"))
    monkeypatch.setattr("edge_agent.config_tools.SYSTEMD_UNIT_DIR", Path("/nonexistent"))  # the shipped units
    written = {}
    for mode in ("--systemd", "--no-systemd"):
        extra = ["--broker", "b.lan", "--device-id", "pi-7"] if command == "agent" else []
        assert main(["init", command, *extra, mode, "-o", "-"]) == 0
        written[mode] = tomllib.loads(capsys.readouterr().out)
    for credential, keys in own.items():
        assert at(example, keys) == at(written["--systemd"], keys) == f"/run/credentials/{name}/{credential}"
        source = Path(at(written["--no-systemd"], keys))  # the file init names when there is no systemd
        if credential == "tls-key" and command == "agent":
            source = source.with_name("device.key")  # enrol writes pi-7.key; the guide links it as device.key
        assert str(source) == loaded[credential]
    assert written["--systemd"]["broker"]["tls"]["ca_file"] == example["broker"]["tls"]["ca_file"]


def test_the_agent_reaches_only_serial_devices() -> None:
    d = _directives(DEPLOY / "edge-fl-agent.service")
    assert d["DevicePolicy"] == ["closed"] and d["DeviceAllow"] == ["char-ttyACM rw", "char-ttyUSB rw"]
    assert d["SupplementaryGroups"] == ["dialout"]


@needs_analyze
@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_accepts_the_unit(name: str, tmp_path: Path) -> None:
    # verify also checks that ExecStart's binary exists; /opt/edge-fl is not installed here, so a copy of the
    # unit runs this interpreter instead (the path itself is checked in the test above).
    text = (DEPLOY / name).read_text()
    assert text.count(f"ExecStart={INSTALLED_BINARY} ") == 1
    (tmp_path / name).write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={sys.executable} "))
    shutil.copytree(DEPLOY / f"{name}.d", tmp_path / f"{name}.d")  # verify reads the drop-in beside it too
    p = subprocess.run([ANALYZE or "", "verify", "--man=no", str(tmp_path / name)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    # verify exits 0 on unknown keys and unparsable values, only warning about them: any output is a failure.
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), p.stdout + p.stderr


@needs_analyze
@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_unit_rates_at_most_2_5_exposure(name: str, tmp_path: Path) -> None:
    p = subprocess.run([ANALYZE or "", "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}",
                        str(DEPLOY / name)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert found, p.stdout + p.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, p.stdout
    assert p.returncode == 0, p.stdout + p.stderr  # --threshold: non-zero above 2.5


@needs_analyze
def test_the_agent_unit_with_the_files_drop_in_rates_at_most_2_5_exposure(tmp_path: Path) -> None:
    # `security --offline` reads no drop-in, so the drop-in's [Service] section is appended to a copy of the unit,
    # as systemd merges it. (`verify` above reads the drop-ins beside the unit: it checks this one's syntax.)
    merged = tmp_path / "edge-fl-agent.service"
    merged.write_text((DEPLOY / "edge-fl-agent.service").read_text() + FILES_DROP_IN.read_text())
    p = subprocess.run([ANALYZE or "", "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}",
                        str(merged)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert found, p.stdout + p.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, p.stdout
    assert re.search(r"UMask=\s+Files created by service are group-writable", p.stdout), p.stdout  # merged, seen
    assert p.returncode == 0, p.stdout + p.stderr


MDWE_PROBE = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("no-mdwe"); sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("mdwe-not-enforced"); sys.exit(0)
except OSError:
    pass
import numpy as np, sqlite3, ssl, paho.mqtt.client, serial
from edge_agent.backbone import DEFAULT_MODEL, FrozenBackbone
from edge_agent.learning.head import PersonalizationHead
backbone = FrozenBackbone(DEFAULT_MODEL)
x = np.random.default_rng(0).normal(size=(16, *backbone.input_shape)).astype(np.float32)
print("ok", backbone.runtime, backbone.embed(x).shape)
"""


def test_the_interpreter_runs_with_write_xor_execute_memory(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes cannot be tried without systemd as PID 1; the kernel's own W^X switch
    (prctl PR_SET_MDWE, Linux >= 6.3, what systemd >= 253 uses too) refuses the same memory, so the agent's
    imports and a batched backbone pass run under it here."""
    p = subprocess.run([sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    if p.stdout.strip() in ("no-mdwe", "mdwe-not-enforced"):
        pytest.skip(f"this kernel has no PR_SET_MDWE ({p.stdout.strip()}): W^X not tried")
    assert p.stdout.startswith("ok "), p.stdout + p.stderr
