"""`edge-fl init agent|aggregator` writes configs that load and hold no secret; `edge-fl check-config`
names every problem of a file and exits 78 if there is one, 0 with a one-line summary if not."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.config import EXIT_CONFIG, AgentConfig, AggregatorConfig, load_toml
from edge_agent.config_tools import check_config, detect_kind


def test_init_agent_writes_a_config_that_loads_and_refuses_to_overwrite(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "etc" / "agent.toml"
    args = ["init", "agent", "--broker", "broker.lan:1884", "--device-id", "pi-7", "--state-dir", str(tmp_path / "s"),
            "--no-systemd", "--serial-port", "/dev/ttyACM0", "--serial-port", "/dev/ttyUSB0", "-o", str(out)]
    assert main(args) == 0
    cfg = load_toml(out, AgentConfig)
    assert (cfg.device_id, cfg.broker.host, cfg.broker.port) == ("pi-7", "broker.lan", 1884)
    etc = tmp_path / "etc"  # production by default: mutual TLS and signatures, files beside the config
    assert (cfg.broker.tls.ca_file, cfg.broker.tls.cert_file, cfg.broker.tls.key_file) == (
        f"{etc}/tls/ca.crt", f"{etc}/tls/pi-7.crt", f"{etc}/tls/pi-7.key")
    assert (cfg.signing.key, cfg.signing.fleet_keys) == (f"{etc}/device.key", [f"{etc}/fleet.pub"])
    assert cfg.broker.username is None  # the broker takes the certificate's CN
    assert (cfg.data.source, cfg.data.port, cfg.data.more_ports) == ("serial", "/dev/ttyACM0", ["/dev/ttyUSB0"])
    assert cfg.state_dir == str(tmp_path / "s") and cfg.broker.password is None and cfg.broker.password_file is None
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # no secret in it; the service's user must read it
    before = out.read_text()
    capsys.readouterr()
    assert main([*args[:-2], "--device-id", "other", "-o", str(out)]) == 1
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_text() == before
    assert main([*args[:-6], "--force", "--subject", "5", "-o", str(out)]) == 0
    replaced = load_toml(out, AgentConfig)
    assert replaced.data.source == "watch-dataset" and replaced.data.subject == 5


def test_init_puts_the_password_in_its_own_0600_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret pass\n"))
    out = tmp_path / "aggregator.toml"
    base = ["init", "aggregator", "--expected-clients", "6", "--min-clients", "3", "--state", str(tmp_path / "agg.db"),
            "--no-systemd", "--password-stdin", "-o", str(out)]
    with pytest.raises(SystemExit) as info:  # a password only with --password-auth: a usage error
        main(base)
    assert info.value.code == 2 and "go with --password-auth" in capsys.readouterr().err
    assert main([*base, "--password-auth"]) == 0
    secret = tmp_path / "aggregator-password"
    assert secret.read_text() == "s3cret pass\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    printed = capsys.readouterr()
    assert "s3cret" not in out.read_text() and "s3cret" not in printed.out
    assert "NOT for untrusted networks" in printed.err and "NOT for untrusted networks" in out.read_text()
    cfg = load_toml(out, AggregatorConfig)
    assert cfg.broker.password_file == str(secret) and cfg.broker.secret({}) == "s3cret pass"
    assert (cfg.fleet.expected_clients, cfg.fleet.min_clients, cfg.broker.username) == (6, 3, "aggregator")
    assert (cfg.broker.port, cfg.broker.tls.ca_file) == (1883, None)  # plain TCP to a development broker
    assert main(["check-config", str(out)]) == EXIT_CONFIG  # the fleet key and the registry are not there yet
    assert capsys.readouterr().out.splitlines()[-2:] == [
        f"{out} [signing] key: {tmp_path}/fleet.key does not exist; create it or fix the path",
        f"{out} [signing] registry: {tmp_path}/devices does not exist; create it or fix the path"]
    assert main(["keys", "new", "--out", str(tmp_path / "fleet.key")]) == 0
    (tmp_path / "devices").mkdir()
    assert main(["check-config", str(out)]) == 0
    checked = capsys.readouterr().out
    assert "no [broker.tls]: password authentication over plain TCP" in checked and "no device enrolled" in checked
    assert checked.splitlines()[-1].startswith(f"{out}: OK: aggregator of fleet 'default', broker 127.0.0.1:1883")


def test_init_refuses_an_unusable_value_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "agent.toml"
    assert main(["init", "agent", "--broker", "b", "--device-id", "has space", "--no-systemd", "-o", str(out)]) == 78
    assert "device_id must be 1-64 letters" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as info:  # a usage error is argparse's exit 2
        main(["init", "agent", "--broker", "host:notaport", "-o", str(out)])
    assert info.value.code == 2


def test_check_config_names_every_problem_and_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-1"\nstate_dir = "/tmp/x"\nbogus = 1\n[broker]\nport = "1883"\n'
                    f'password = "inline"\npassword_file = "{tmp_path}/missing"\n[data]\nsource = "serial"\n')
    assert main(["check-config", str(path)]) == EXIT_CONFIG
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if not line.startswith("warning: ")]
    assert f"warning: {path} [broker]: password is in the configuration file" in out.out
    assert lines == [
        f"{path}: unknown key 'bogus'; known: backbone, broker, data, device_id, fleet, rng_stream, signing, state_dir, "
            "upload",
        f"{path} [broker]: port must be an integer, got '1883' (str)",
        f"{path} [broker] password_file: cannot read {tmp_path}/missing (No such file or directory); create it with "
        "mode 0600, owned by the service's user, or fix the path",
        f"{path} [data]: port is required when source = 'serial' (a pyserial URL such as /dev/ttyACM0)",
    ]
    assert "4 problem(s)" in out.err and "inline" not in out.out + out.err


def test_check_config_tells_the_kind_and_applies_set_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert detect_kind({"device_id": "a", "broker": {}}) == "agent"
    assert detect_kind({"state": "a", "train": {}}) == "aggregator"
    assert detect_kind({"broker": {}}) is None and detect_kind({"state": "x", "state_dir": "y"}) is None
    path = tmp_path / "only-broker.toml"
    path.write_text('[broker]\nhost = "h"\n')
    report = check_config(path)
    assert report.problems == [f"{path}: cannot tell an agent config (device_id, state_dir, [data]) from an "
                               "aggregator config (state, fleet_name, [fleet], [train]); pass --kind"]
    assert main(["check-config", "--kind", "aggregator", str(path)]) == EXIT_CONFIG
    assert "missing required key 'state'" in capsys.readouterr().out
    assert main(["check-config", "--kind", "aggregator", "--set", "state=a.db", str(path)]) == 0
    monkeypatch.setenv("EDGEFL_STATE", "b.db")
    monkeypatch.setenv("EDGEFL_BROKER_PORT", "99999")
    assert main(["check-config", "--kind", "aggregator", str(path)]) == EXIT_CONFIG  # env ignored without --env
    capsys.readouterr()
    assert main(["check-config", "--kind", "aggregator", "--env", str(path)]) == EXIT_CONFIG
    assert [line for line in capsys.readouterr().out.splitlines() if not line.startswith("warning: ")] == [
        "environment variable EDGEFL_BROKER_PORT: broker.port must be between 1 and 65535, got 99999"]
    assert main(["check-config", str(tmp_path / "nope.toml")]) == EXIT_CONFIG
    assert "configuration file not found" in capsys.readouterr().out


def test_the_example_configs_check_clean_but_for_the_files_an_install_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    from ..conftest import ROOT

    monkeypatch.setattr("edge_agent.config_tools.SYSTEMD_UNIT_DIR", ROOT / "none")  # the units as shipped
    for name in ("agent.example.toml", "aggregator.example.toml"):
        report = check_config(ROOT / "deploy" / name, environ={})
        missing = [p for p in report.problems if p.endswith("does not exist; create it or fix the path")]
        assert report.problems == missing and missing, report.problems
        assert all(": /etc/edge-fl/" in p or "from /etc/edge-fl/" in p for p in missing), missing


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "agent.toml").write_text(
        'device_id = "pi-1"\nstate_dir = "state"\nbackbone = "../models/b.tflite"\n[broker]\npassword_file = "pw"\n'
        '[broker.tls]\nca_file = "tls/ca.crt"\ncert_file = "tls/pi-1.crt"\nkey_file = "/abs/pi-1.key"\n'
        '[data]\ndataset = "data/w.npz"\n[signing]\nkey = "device.key"\nfleet_keys = ["fleet.pub", "next.pub"]\n')
    (conf / "aggregator.toml").write_text('state = "agg.db"\n[signing]\nkey = "fleet.key"\nregistry = "devices"\n')
    monkeypatch.chdir(tmp_path)  # not the file's directory: the paths must not depend on it
    a = load_toml("conf/agent.toml", AgentConfig)
    assert (a.state_dir, a.backbone.model, a.broker.password_file, a.data.dataset) == (
        f"{conf}/state", f"{conf}/../models/b.tflite", f"{conf}/pw", f"{conf}/data/w.npz")
    assert (a.broker.tls.ca_file, a.broker.tls.cert_file, a.broker.tls.key_file) == (
        f"{conf}/tls/ca.crt", f"{conf}/tls/pi-1.crt", "/abs/pi-1.key")
    assert (a.signing.key, a.signing.fleet_keys) == (f"{conf}/device.key", [f"{conf}/fleet.pub", f"{conf}/next.pub"])
    g = load_toml(conf / "aggregator.toml", AggregatorConfig)
    assert (g.state, g.signing.key, g.signing.registry) == (f"{conf}/agg.db", f"{conf}/fleet.key", f"{conf}/devices")
    from edge_agent.config import load_config, parse_set  # a path on the command line: the current directory's

    assert load_config(conf / "agent.toml", AgentConfig, [parse_set("state_dir=here")], environ={}).state_dir == "here"


# The device's steps of deploy/README.md ("Each Raspberry Pi"), run for real with {ETC} for /etc/edge-fl and
# {CA} for the CA host's directory; the systemd steps are not run (test_deploy_units.py checks the units).
DEVICE_STEPS = [
    "edge-fl enrol pi-7 --dir {ETC}/tls",
    "scripts/fleet-ca --dir {CA} sign {ETC}/tls/pi-7.csr",
    "cp {CA}/clients/pi-7.crt {CA}/ca.crt {ETC}/tls/",
    "edge-fl keys new --out {ETC}/device.key",
    "edge-fl keys register pi-7 {ETC}/device.key.pub --registry {ETC}/devices",
    "cp {ETC}/fleet.key.pub {ETC}/fleet.pub",
    "edge-fl init agent --broker broker.lan --device-id pi-7 --serial-port /dev/ttyACM0",
    "edge-fl check-config {ETC}/agent.toml",
]


def test_the_install_guide_s_device_steps_work_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shlex
    import shutil
    import subprocess

    from ..conftest import ROOT

    guide = (ROOT / "deploy" / "README.md").read_text()
    for step in DEVICE_STEPS:
        assert step.format(ETC="/etc/edge-fl", CA="fleet-ca") in guide, step
    etc, ca = tmp_path / "etc", tmp_path / "fleet-ca"
    subprocess.run(["bash", str(ROOT / "scripts/fleet-ca"), "--dir", str(ca), "init"], check=True,
                   capture_output=True, timeout=60)
    assert main(["keys", "new", "--out", str(etc / "fleet.key")]) == 0  # the aggregator host's, made before
    for step in DEVICE_STEPS:
        words = shlex.split(step.format(ETC=etc, CA=ca))
        if words[0] == "edge-fl":
            if words[1] == "init":  # without root: name the files, not systemd credentials
                words += ["--no-systemd", "-o", str(etc / "agent.toml"), "--state-dir", str(tmp_path / "state")]
            capsys.readouterr()
            assert main(words[1:]) == 0, capsys.readouterr()
        elif words[0] == "cp":
            for source in words[1:-1]:
                shutil.copy(source, words[-1])
        else:
            p = subprocess.run(["bash", str(ROOT / words[0]), *words[1:]], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{etc}/agent.toml: OK: agent 'pi-7'")
    report = check_config(etc / "agent.toml", environ={})
    assert not report.problems and not any("TLS" in w or "signatures" in w for w in report.warnings), report
    # A certificate of another identity, a world-readable key: named, by file, section and key.
    shutil.copy(etc / "tls" / "pi-7.crt", etc / "tls" / "keep.crt")
    subprocess.run(["bash", str(ROOT / "scripts/fleet-ca"), "--dir", str(ca), "client", "pi-8"], check=True,
                   capture_output=True, timeout=60)
    shutil.copy(ca / "clients" / "pi-8.crt", etc / "tls" / "pi-7.crt")
    (etc / "device.key").chmod(0o644)
    assert check_config(etc / "agent.toml", environ={}).problems == [
        f"{etc}/agent.toml [broker.tls] cert_file: {etc}/tls/pi-7.crt is the certificate of 'pi-8', not of 'pi-7': "
        "the broker takes its CN as the identity (enrol this device under its device_id, or fix device_id)",
        f"{etc}/agent.toml [signing] key: {etc}/device.key is a private key readable by others (mode 0644): "
        f"chmod 600 {etc}/device.key"]


def test_a_systemd_config_names_the_credentials_the_unit_loads(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edge_agent.config_tools.SYSTEMD_UNIT_DIR", tmp_path / "none")  # the units as shipped
    out = tmp_path / "agent.toml"
    assert main(["init", "agent", "--broker", "b.lan", "--device-id", "pi-7", "--systemd", "--tls-dir",
                 "/etc/edge-fl/tls", "--signing-key", "/etc/edge-fl/device.key", "-o", str(out)]) == 0
    cfg = load_toml(out, AgentConfig)
    assert cfg.broker.tls.key_file == "/run/credentials/edge-fl-agent.service/tls-key"
    assert cfg.signing.key == "/run/credentials/edge-fl-agent.service/signing-key"
    problems = check_config(out, environ={}).problems
    assert f"{out} [broker.tls] key_file: credential 'tls-key' from /etc/edge-fl/tls/device.key does not exist; " \
           "create it or fix the path" in problems, problems


def test_check_config_describes_a_files_source_and_wants_its_card(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "drop").mkdir()
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-1"\nstate_dir = "state"\n[data]\nsource = "files"\ndir = "drop"\n')
    report = check_config(path)
    assert report.problems == [f"{path} [data]: {tmp_path}/drop has no dataset.json: the agent reads every file "
                               "against it (docs/data-format.md, 'Feeding an agent from files')"]
    (tmp_path / "drop" / "dataset.json").write_text("{}")
    report = check_config(path)
    assert report.problems == [] and f"data from files dropped in {tmp_path}/drop" in report.summary
