"""Configuration files: a wrong type is a ConfigError naming the file, section, key, expected and got;
the command exits with EX_CONFIG (78) so that systemd stops restarting a typo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import EXIT_CONFIG, AgentConfig, AggregatorConfig, ConfigError, load_toml

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
