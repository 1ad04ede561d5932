"""Configuration files: a wrong type is a ConfigError naming the file, section, key, expected and got;
the command exits with EX_CONFIG (78) so that systemd stops restarting a typo."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import (
    EXIT_CONFIG,
    AgentConfig,
    AggregatorConfig,
    BrokerConfig,
    ConfigError,
    load_config,
    load_toml,
    parse_set,
)

from ..conftest import ROOT

AGENT = '''device_id = "pi-1"
state_dir = "/tmp/x"

[broker]
host = "127.0.0.1"
port = 1883

[data]
subject = 4
'''


@pytest.mark.parametrize("change, section, key, expected", [
    (('port = 1883', 'port = "1883"'), "[broker]", "port", "an integer, got '1883' (str)"),
    (('subject = 4', 'subject = "4"'), "[data]", "subject", "an integer, got '4' (str)"),
    (('subject = 4', 'subject = true'), "[data]", "subject", "an integer, got True (bool)"),
    (('subject = 4', 'subject = 4\nmore_ports = ["/dev/ttyACM1", 2]'), "[data]", "more_ports",
     "a list of strings, got"),
    (('state_dir = "/tmp/x"', 'state_dir = 5'), "", "state_dir", "a string, got 5 (int)"),
])
def test_a_wrong_type_names_file_section_key_expected_and_got(tmp_path: Path, change: tuple[str, str],
                                                              section: str, key: str, expected: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_toml(path, AgentConfig)
    message = str(info.value)
    assert message.startswith(str(path)) and f"{section}: {key} must be".lstrip(": ") in message, message
    assert expected in message, message


def test_good_values_load_and_an_integer_stands_for_a_float(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT)
    cfg = load_toml(path, AgentConfig)
    assert cfg.broker.port == 1883 and cfg.data.subject == 4 and cfg.device_id == "pi-1"
    agg = tmp_path / "agg.toml"
    agg.write_text('state = "s.db"\n[fleet]\ndeadline_s = 30\n[train]\nrounds = 8\nlr = 1\noptimizer = "sgd"\n')
    loaded = load_toml(agg, AggregatorConfig)
    assert loaded.fleet.deadline_s == 30.0 and isinstance(loaded.fleet.deadline_s, float)
    assert loaded.train.rounds == 8 and loaded.train.lr == 1.0 and loaded.train.optimizer == "sgd"


def test_training_values_are_checked_too(tmp_path: Path) -> None:
    agg = tmp_path / "agg.toml"
    agg.write_text('state = "s.db"\n[train]\nrounds = "8"\n')
    with pytest.raises(ConfigError, match=r"\[train\]: rounds must be an integer, got '8'"):
        load_toml(agg, AggregatorConfig)
    agg.write_text('state = "s.db"\n[train]\noptimizer = "adamw"\n')
    with pytest.raises(ConfigError, match=r"optimizer must be one of 'adam', 'sgd', got 'adamw'"):
        load_toml(agg, AggregatorConfig)


def test_a_config_error_exits_78_with_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT.replace("port = 1883", 'port = "1883"'))
    p = subprocess.run([sys.executable, "-m", "edge_agent.cli", "agent", "--config", str(path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == EXIT_CONFIG == 78, p.stderr
    assert p.stderr.startswith("edge-fl: configuration error: ") and "port must be an integer" in p.stderr
    assert "Traceback" not in p.stderr


# --- every problem at once, ranges ----------------------------------------------------------------------

def test_every_problem_is_reported_not_only_the_first(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi 7"\nstate_dir = "/tmp/x"\ncolour = 1\n[broker]\nport = 70000\n'
                    '[data]\nsubject = "4"\nalpha = 0\n')
    with pytest.raises(ConfigError) as info:
        load_toml(path, AgentConfig)
    problems = info.value.problems
    assert problems == [
        f"{path}: unknown key 'colour'; known: backbone, broker, data, device_id, fleet, rng_stream, signing, state_dir, "
        "upload",
        f"{path}: device_id must be 1-64 letters, digits, '.', '_' or '-' (it becomes an MQTT topic level), "
        "got 'pi 7'",
        f"{path} [broker]: port must be between 1 and 65535, got 70000",
        f"{path} [data]: subject must be an integer, got '4' (str)",
        f"{path} [data]: alpha must be greater than 0, got 0.0",
    ]
    assert str(info.value).startswith("5 problems: ") and "\n" not in str(info.value)  # one line in a journal


@pytest.mark.parametrize("text, problem", [
    ('[fleet]\nmin_clients = 0', "[fleet]: min_clients must be at least 1, got 0"),
    ('[fleet]\ndeadline_s = -1', "[fleet]: deadline_s must be greater than 0, got -1.0"),
    ('[train]\nfraction = 1.5', "[train]: fraction must be greater than 0 and at most 1, got 1.5"),
    ('[train]\nstrategy = "fedsgd"', "[train]: strategy must be one of 'local'"),
    ('fleet_name = "a/b"', "fleet_name must be 1-64 letters"),
    ('[fleet]\nupload_window_s = -1', "[fleet]: upload_window_s must be at least 0, got -1.0"),
    ('[fleet]\ndeadline_s = 60\nupload_window_s = 60', "[fleet]: upload_window_s (60) must be less than deadline_s (60)"),
    ('[fleet]\nupload_window_s = 90', "[fleet]: upload_window_s (90) must be less than deadline_s (60)"),
])
def test_aggregator_ranges_are_checked(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "agg.toml"
    path.write_text('state = "s.db"\n' + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_toml(path, AggregatorConfig)
    assert problem in str(info.value), info.value


def test_the_upload_window_loads_when_it_ends_before_the_deadline(tmp_path: Path) -> None:
    path = tmp_path / "agg.toml"
    path.write_text('state = "s.db"\n[fleet]\ndeadline_s = 300\nupload_window_s = 120\n')
    fleet = load_toml(path, AggregatorConfig).fleet
    assert (fleet.deadline_s, fleet.upload_window_s) == (300.0, 120.0)
    assert AggregatorConfig(state="s.db").fleet.upload_window_s == 0.0  # no spread unless asked: the golden runs


@pytest.mark.parametrize("text, problem", [
    ("receipt_timeout_s = 0", "[upload]: receipt_timeout_s must be greater than 0, got 0"),
    ("receipt_timeout_s = 60\nmax_receipt_timeout_s = 30",
     "[upload]: [upload] max_receipt_timeout_s (30.0) must be at least receipt_timeout_s (60.0)"),
    ("max_receipt_timeout_s = inf", "max_receipt_timeout_s must be a finite number of seconds"),
    ("receipt_timout_s = 5", "[upload]: unknown key 'receipt_timout_s'; known: max_receipt_timeout_s, "
                             "receipt_timeout_s"),
])
def test_agent_receipt_timeouts_are_checked(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT + "\n[upload]\n" + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_toml(path, AgentConfig)
    assert problem in str(info.value), info.value


def test_agent_receipt_timeouts_load_and_default(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT + "\n[upload]\nreceipt_timeout_s = 5\nmax_receipt_timeout_s = 40\n")
    upload = load_toml(path, AgentConfig).upload
    assert (upload.receipt_timeout_s, upload.max_receipt_timeout_s) == (5.0, 40.0)
    assert (AgentConfig("d", "/s").upload.receipt_timeout_s, AgentConfig("d", "/s").upload.max_receipt_timeout_s) \
        == (30.0, 300.0)


# --- overrides: environment and --set --------------------------------------------------------------------

def test_precedence_is_set_over_environment_over_file_over_default(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl.config")
    path = tmp_path / "agent.toml"
    path.write_text(AGENT)
    env = {"EDGEFL_BROKER_HOST": "from-env", "EDGEFL_BROKER_PORT": "1884", "EDGEFL_DEVICE_ID": "pi-env",
           "EDGEFL_FLEET": "", "EDGEFL_SERIAL_PORT": "/dev/ttyUSB0"}  # an empty variable counts as unset
    cfg = load_config(path, AgentConfig, [parse_set("broker.host=from-cli"), parse_set("data.more_ports=a,b")],
                      environ=env)
    assert (cfg.broker.host, cfg.broker.port, cfg.device_id) == ("from-cli", 1884, "pi-env")
    assert cfg.fleet == "default" and cfg.data.port == "/dev/ttyUSB0" and cfg.data.more_ports == ["a", "b"]
    assert cfg.data.subject == 4 and cfg.data.baudrate == 115200  # file, default
    logged = caplog.text  # whoever reads the log sees why a value differs from the file
    assert "agent.toml, overridden by " in logged and "--set broker.host=from-cli" in logged
    assert all(f"environment variable {v}" in logged for v in ("EDGEFL_BROKER_HOST", "EDGEFL_DEVICE_ID"))
    assert "EDGEFL_FLEET" not in logged
    agg = tmp_path / "agg.toml"
    agg.write_text('state = "s.db"\n')
    loaded = load_config(agg, AggregatorConfig, [parse_set("train.optimizer=sgd"), parse_set("fleet.deadline_s=5")],
                         environ={"EDGEFL_FLEET": "f2", "EDGEFL_STATE": "/var/lib/x.db"})
    assert (loaded.fleet_name, loaded.state, loaded.train.optimizer, loaded.fleet.deadline_s) == \
        ("f2", "/var/lib/x.db", "sgd", 5.0)


def test_a_bad_override_names_the_variable_or_flag(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT)
    with pytest.raises(ConfigError) as info:
        load_config(path, AgentConfig, [parse_set("data.baudrate=fast"), parse_set("nope.x=1"),
                                         parse_set("broker.password=hunter2")],
                    environ={"EDGEFL_BROKER_PORT": "0"})
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert "environment variable EDGEFL_BROKER_PORT: broker.port must be between 1 and 65535, got 0" in problems
    assert "--set data.baudrate=fast: data.baudrate must be an integer, got 'fast'" in problems
    assert "--set nope.x=1: no key 'nope.x' in an agent config" in problems
    assert any(p.startswith("--set broker.password=<hidden>: broker.password cannot be set there") for p in problems)
    assert "hunter2" not in str(info.value)  # a secret typed by mistake is not echoed into a log
    with pytest.raises(ConfigError, match=r"expected SECTION\.KEY=VALUE"):
        parse_set("broker.port")


def test_overrides_on_the_command_line_of_the_agent(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT)
    p = subprocess.run([sys.executable, "-m", "edge_agent.cli", "agent", "--config", str(path),
                        "--set", "broker.port=x"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**os.environ, "EDGEFL_DEVICE_ID": "bad id"})
    assert p.returncode == EXIT_CONFIG, p.stderr
    assert "environment variable EDGEFL_DEVICE_ID: device_id must be 1-64 letters" in p.stderr
    assert "--set broker.port=x: broker.port must be an integer, got 'x'" in p.stderr


# --- the broker password ---------------------------------------------------------------------------------

def test_the_password_comes_from_the_credential_then_the_file_then_the_config(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    broker = BrokerConfig(password="inline", password_file=str(tmp_path / "pw"))
    assert broker.secret({"CREDENTIALS_DIRECTORY": str(creds)}) == "from-systemd"
    assert broker.secret({"CREDENTIALS_DIRECTORY": str(tmp_path / "elsewhere")}) == "from-file"
    assert broker.secret({}) == "from-file"
    assert BrokerConfig(password="inline").secret({}) == "inline"
    assert BrokerConfig().secret({}) is None


def test_an_unreadable_or_empty_password_file_is_a_config_error_without_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[broker\] password_file: cannot read .*missing \(No such file"):
        BrokerConfig(password_file=str(tmp_path / "missing")).secret({})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        BrokerConfig(password_file=str(tmp_path / "empty")).secret({})
