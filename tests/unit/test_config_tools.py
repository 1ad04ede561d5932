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
            "--serial-port", "/dev/ttyACM0", "--serial-port", "/dev/ttyUSB0", "-o", str(out)]
    assert main(args) == 0
    cfg = load_toml(out, AgentConfig)
    assert (cfg.device_id, cfg.broker.host, cfg.broker.port) == ("pi-7", "broker.lan", 1884)
    assert cfg.broker.username == "pi-7"  # the production ACL's %u is the device id
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
    assert main(["init", "aggregator", "--expected-clients", "6", "--min-clients", "3", "--state",
                 str(tmp_path / "agg.db"), "--password-stdin", "-o", str(out)]) == 0
    secret = tmp_path / "aggregator-password"
    assert secret.read_text() == "s3cret pass\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "s3cret" not in out.read_text() and "s3cret" not in capsys.readouterr().out
    cfg = load_toml(out, AggregatorConfig)
    assert cfg.broker.password_file == str(secret) and cfg.broker.secret({}) == "s3cret pass"
    assert (cfg.fleet.expected_clients, cfg.fleet.min_clients, cfg.broker.username) == (6, 3, "aggregator")
    assert main(["check-config", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: OK: aggregator of fleet 'default', broker 127.0.0.1:1883")


def test_init_refuses_an_unusable_value_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "agent.toml"
    assert main(["init", "agent", "--broker", "b", "--device-id", "has space", "-o", str(out)]) == EXIT_CONFIG
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
    lines = out.out.splitlines()
    assert lines[0].startswith(f"warning: {path} [broker]: password is in the configuration file")
    assert lines[1:] == [
        f"{path}: unknown key 'bogus'; known: backbone, broker, data, device_id, fleet, rng_stream, state_dir",
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
    assert capsys.readouterr().out.splitlines() == [
        "environment variable EDGEFL_BROKER_PORT: broker.port must be between 1 and 65535, got 99999"]
    assert main(["check-config", str(tmp_path / "nope.toml")]) == EXIT_CONFIG
    assert "configuration file not found" in capsys.readouterr().out


def test_the_example_configs_check_clean(capsys: pytest.CaptureFixture[str]) -> None:
    from ..conftest import ROOT

    for name in ("agent.example.toml", "aggregator.example.toml"):
        report = check_config(ROOT / "deploy" / name, environ={})
        assert not report.problems, report.problems
