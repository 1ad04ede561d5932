"""Config files for people: `edge-fl init agent|aggregator` writes a working config (never a secret: the
password goes to its own 0600 file or a systemd credential), and `edge-fl check-config FILE` names every
problem in one (file, section, key), not only the first."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    CREDENTIAL,
    EXIT_CONFIG,
    AgentConfig,
    AggregatorConfig,
    BrokerConfig,
    ConfigError,
    Override,
    check_toml,
    env_overrides,
    parse_set,
    read_toml,
    secret_source,
)


class InitError(RuntimeError):
    """`edge-fl init` could not write what it was asked to (the file exists, a value is unusable)."""


# --- where things go by default ----------------------------------------------------------------------

def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_config_dir() -> Path:
    """/etc/edge-fl for root (what the systemd units read), else $XDG_CONFIG_HOME/edge-fl (Termux, a user)."""
    if _is_root():
        return Path("/etc/edge-fl")
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "edge-fl"


def default_state_dir(unit_dir: str) -> Path:
    """The units' StateDirectory (/var/lib/<unit_dir>) for root, else $XDG_STATE_HOME/<unit_dir>."""
    if _is_root():
        return Path("/var/lib") / unit_dir
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / unit_dir


def default_device_id() -> str:
    """This machine's host name, made a valid device id (it becomes an MQTT topic level and client id)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip("-.")[:64]
    return name or "device"


def split_host_port(text: str, default_port: int = 1883) -> tuple[str, int]:
    """'host', 'host:port' or '[v6addr]:port'."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST or HOST:PORT, got {text!r}") from None
    if not host or not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST or HOST:PORT (port 1-65535), got {text!r}")
    return host, port


# --- rendering ----------------------------------------------------------------------------------------

def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


@dataclass(frozen=True)
class AgentInit:
    device_id: str
    broker_host: str
    broker_port: int = 1883
    fleet: str = "default"
    username: str | None = None  # default: the device id (the production ACL's %u is the device)
    state_dir: str = "/var/lib/edge-fl"
    source: str = "serial"
    serial_ports: list[str] = field(default_factory=lambda: ["/dev/ttyACM0"])
    subject: int = 4
    password_file: str | None = None


def render_agent(a: AgentInit) -> str:
    lines = [
        "# edge-fl device agent (written by `edge-fl init agent`; check it with `edge-fl check-config FILE`).",
        "# Unknown keys are errors. Per device, without editing this file: environment variables",
        "# (EDGEFL_DEVICE_ID, EDGEFL_BROKER_HOST, ...) or `edge-fl agent --set section.key=value`.",
        f"device_id = {_q(a.device_id):<25} # letters, digits . _ - : an MQTT topic level and the client id",
        f"fleet = {_q(a.fleet):<29} # must match the aggregator's fleet_name",
        f"state_dir = {_q(a.state_dir):<25} # head, personal tensors, round log, outbox (SQLite)",
        '# backbone = "/path/to/backbone.tflite"   # default: the model shipped with edge-fl',
        "",
        "[broker]",
        f"host = {_q(a.broker_host)}",
        f"port = {a.broker_port}",
        f"username = {_q(a.username or a.device_id)}",
        f"# No password in this file. Under systemd it is the credential {CREDENTIAL!r} (LoadCredential= in",
        "# the unit, which wins over password_file); elsewhere the file below (mode 0600).",
        (f"password_file = {_q(a.password_file)}" if a.password_file
         else '# password_file = "/etc/edge-fl/mqtt-password"'),
        "",
        "[data]",
    ]
    if a.source == "serial":
        lines += [
            'source = "serial"                  # windows from the microcontroller(s) on serial lines',
            f"port = {_q(a.serial_ports[0]):<28} # any pyserial URL: /dev/ttyACM0, socket://host:port",
            (f"more_ports = [{', '.join(_q(p) for p in a.serial_ports[1:])}]" if len(a.serial_ports) > 1
             else "# more_ports = [\"/dev/ttyACM1\"]    # further MCUs on this device"),
            "# baudrate = 115200",
            "# min_windows = 14                 # labelled windows needed before the device trains",
        ]
    else:
        lines += [
            'source = "watch-dataset"           # the demo data: one subject of the bundled recordings',
            f"subject = {a.subject:<26} # a federated subject: 4-9",
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class AggregatorInit:
    state: str
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    fleet: str = "default"
    username: str = "aggregator"
    expected_clients: int = 1
    min_clients: int = 1
    deadline_s: float = 120.0
    strategy: str = "ditto"
    rounds: int = 30
    password_file: str | None = None


def render_aggregator(a: AggregatorInit) -> str:
    lines = [
        "# edge-fl aggregator (written by `edge-fl init aggregator`; check it with `edge-fl check-config FILE`).",
        "# What is trained lives in [train] and reaches every device with each round task.",
        f"state = {_q(a.state)}   # SQLite (WAL): rounds, accepted updates, global versions",
        f"fleet_name = {_q(a.fleet)}",
        "embedding_dim = 64                 # the backbone's embedding width",
        "num_classes = 7",
        "",
        "[broker]",
        f"host = {_q(a.broker_host)}",
        f"port = {a.broker_port}",
        f"username = {_q(a.username)}",
        f"# No password in this file: the credential {CREDENTIAL!r} under systemd, else this file (mode 0600).",
        (f"password_file = {_q(a.password_file)}" if a.password_file
         else '# password_file = "/etc/edge-fl/aggregator-password"'),
        "",
        "[fleet]",
        f"expected_clients = {a.expected_clients:<14} # round 1 opens when this many devices are online",
        f"min_clients = {a.min_clients:<19} # fewer updates at the deadline: the round fails, the head stays",
        f"deadline_s = {a.deadline_s:g}",
        "",
        "[train]",
        f"strategy = {_q(a.strategy)}",
        f"rounds = {a.rounds}",
        "fraction = 1.0                     # share of online devices selected per round",
    ]
    return "\n".join(lines) + "\n"


# --- writing --------------------------------------------------------------------------------------------

def write_file(path: Path, text: str, *, mode: int, force: bool) -> None:
    """Write `text` to `path` with `mode` from the first byte (a secret is never readable by others, even
    briefly); refuse to replace an existing file unless `force`."""
    if path.exists() and not force:
        raise InitError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)  # the umask may have taken bits away; a config must stay readable by the service
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_password(stream: Any) -> str:
    password = str(stream.readline()).rstrip("\r\n")
    if not password:
        raise InitError("--password-stdin: standard input held no password (an empty first line)")
    return password


def cmd_init(args: argparse.Namespace) -> int:
    kind: str = args.kind
    out: Path = args.output or default_config_dir() / f"{kind}.toml"
    password_file: Path | None = args.password_file
    if args.password_stdin and password_file is None:
        password_file = out.parent / ("mqtt-password" if kind == "agent" else "aggregator-password")
    if password_file is not None:
        password_file = password_file.absolute()  # the service does not run in this directory
    if kind == "agent":
        host, port = args.broker
        source = "watch-dataset" if args.subject is not None else "serial"
        text = render_agent(AgentInit(
            device_id=args.device_id, broker_host=host, broker_port=port, fleet=args.fleet, username=args.username,
            state_dir=str(args.state_dir or default_state_dir("edge-fl")), source=source,
            serial_ports=args.serial_port or ["/dev/ttyACM0"], subject=args.subject or 4,
            password_file=str(password_file) if password_file else None))
        cls: type[Any] = AgentConfig
    else:
        host, port = args.broker
        state = args.state or default_state_dir("edge-fl-aggregator") / "aggregator.db"
        text = render_aggregator(AggregatorInit(
            state=str(state), broker_host=host, broker_port=port, fleet=args.fleet, username=args.username,
            expected_clients=args.expected_clients, min_clients=min(args.min_clients, args.expected_clients),
            rounds=args.rounds, strategy=args.strategy,
            password_file=str(password_file) if password_file else None))
        cls = AggregatorConfig
    # What we write must load: check the text before it replaces anything.
    _, problems, _ = check_toml(text, cls, where=f"{out} (as it would be written)")
    if problems:
        raise ConfigError.of(problems)
    if str(out) == "-":
        sys.stdout.write(text)
        return 0
    password = _read_password(sys.stdin) if args.password_stdin else None
    write_file(out, text, mode=0o644, force=args.force)  # no secret in it: the service's user must read it
    print(f"wrote {out}")
    if password is not None and password_file is not None:
        write_file(password_file, password + "\n", mode=0o600, force=args.force)
        print(f"wrote the broker password to {password_file} (mode 0600)")
    elif password_file is None:
        print(f"no password file named: under systemd put the password in the credential {CREDENTIAL!r} "
              f"(see deploy/README.md), or rerun with --password-stdin")
    print(f"check it with: edge-fl check-config {out}")
    return 0


# --- checking --------------------------------------------------------------------------------------------

_AGENT_ONLY = {"device_id", "state_dir", "rng_stream", "backbone", "data"}
_AGGREGATOR_ONLY = {"state", "fleet_name", "embedding_dim", "num_classes", "train"}
KINDS: dict[str, type[Any]] = {"agent": AgentConfig, "aggregator": AggregatorConfig}


def detect_kind(data: Mapping[str, Any]) -> str | None:
    """'agent' or 'aggregator' from the keys a file has, or None when it cannot tell."""
    agent, aggregator = bool(_AGENT_ONLY & set(data)), bool(_AGGREGATOR_ONLY & set(data))
    if agent == aggregator:
        return None
    return "agent" if agent else "aggregator"


@dataclass
class CheckReport:
    path: str
    kind: str | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: str = ""


def _check_secret(broker: Mapping[str, Any], where: str, environ: Mapping[str, str], report: CheckReport) -> None:
    if "password" in broker:
        report.warnings.append(f"{where} [broker]: password is in the configuration file; move it to a file named "
                               f"by password_file (mode 0600) or to the systemd credential {CREDENTIAL!r}")
    password_file = broker.get("password_file")
    source = secret_source(BrokerConfig(password_file=password_file if isinstance(password_file, str) else None),
                           environ)
    if source is None:
        if broker.get("username") and "password" not in broker:
            report.warnings.append(f"{where} [broker]: no password_file; the password must then come from the "
                                   f"systemd credential {CREDENTIAL!r} (LoadCredential= in the unit)")
        return
    path, what = source
    what = f"{where} {what}" if what.startswith("[") else what
    try:
        mode = path.stat().st_mode
        empty = not path.read_text().strip()
    except OSError as exc:
        report.problems.append(f"{what}: cannot read {path} ({exc.strerror or exc}); create it with mode 0600, "
                               "owned by the service's user, or fix the path")
        return
    if empty:
        report.problems.append(f"{what}: {path} is empty; write the broker password into it")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        report.warnings.append(f"{what}: {path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
                               f"chmod 600 {path}")


def check_config(path: str | Path, kind: str | None = None, overrides: Sequence[Override] = (),
                 environ: Mapping[str, str] = os.environ) -> CheckReport:
    """Every problem in an agent or aggregator config, and what would run if there is none."""
    report = CheckReport(str(path))
    try:
        raw = read_toml(path)
    except ConfigError as exc:
        report.problems.append(str(exc))
        return report
    report.kind = kind or detect_kind(raw)
    if report.kind is None:
        report.problems.append(f"{path}: cannot tell an agent config (device_id, state_dir, [data]) from an "
                               "aggregator config (state, fleet_name, [fleet], [train]); pass --kind")
        return report
    cfg, problems, merged = check_toml(Path(path).read_text(), KINDS[report.kind], where=str(path),
                                       overrides=overrides)
    report.problems += problems
    broker = merged.get("broker")
    _check_secret(broker if isinstance(broker, dict) else {}, str(path), environ, report)
    if report.kind == "agent":  # from the table: found even when other keys are wrong
        data_table = merged.get("data")
        data_table = data_table if isinstance(data_table, dict) else {}
        if data_table.get("source") == "serial" and not data_table.get("port"):
            report.problems.append(f"{path} [data]: port is required when source = 'serial' "
                                   "(a pyserial URL such as /dev/ttyACM0)")
        backbone = merged.get("backbone")
        if isinstance(backbone, str) and not Path(backbone).is_file():
            report.problems.append(f"{path}: backbone {backbone!r} is not a file")
    if isinstance(cfg, AgentConfig):
        data = f"serial {', '.join([cfg.data.port or '?', *cfg.data.more_ports])}" if cfg.data.source == "serial" \
            else f"bundled recordings of subject {cfg.data.subject}"
        report.summary = (f"agent {cfg.device_id!r} in fleet {cfg.fleet!r}, broker {cfg.broker.host}:{cfg.broker.port}"
                          f" as {cfg.broker.username or 'anonymous'}, data from {data}, state in {cfg.state_dir}")
    elif isinstance(cfg, AggregatorConfig):
        if cfg.fleet.min_clients > cfg.fleet.expected_clients:
            report.warnings.append(f"{path} [fleet]: min_clients ({cfg.fleet.min_clients}) is above "
                                   f"expected_clients ({cfg.fleet.expected_clients})")
        report.summary = (f"aggregator of fleet {cfg.fleet_name!r}, broker {cfg.broker.host}:{cfg.broker.port} as "
                          f"{cfg.broker.username or 'anonymous'}, {cfg.train.strategy} for {cfg.train.rounds} rounds, "
                          f"state in {cfg.state}")
    return report


def cmd_check_config(args: argparse.Namespace) -> int:
    kind: str | None = args.kind
    if args.env and kind is None:
        try:
            kind = detect_kind(read_toml(args.file))
        except ConfigError:
            kind = None  # check_config reports the unreadable file
    overrides = [*(env_overrides(KINDS[kind]) if args.env and kind else []), *args.set]
    report = check_config(args.file, args.kind, overrides)
    for warning in report.warnings:
        print(f"warning: {warning}")
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"{args.file}: {len(report.problems)} problem(s); `edge-fl {report.kind or 'agent'}` would exit "
              f"{EXIT_CONFIG} (configuration error)", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.file}: OK: {report.summary}")
    return 0


# --- command-line wiring (edge_agent/cli.py registers these) -------------------------------------------------

def set_option(text: str) -> Override:
    """argparse type of `--set SECTION.KEY=VALUE`."""
    try:
        return parse_set(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], type=set_option, metavar="SECTION.KEY=VALUE",
                   help="override one value of the file (repeatable), e.g. --set broker.host=10.0.0.2 or "
                        "--set device_id=pi-7; precedence: --set > EDGEFL_* environment variables > file > default")


def add_parsers(sub: Any) -> None:
    """`edge-fl init agent|aggregator` and `edge-fl check-config`."""
    init = sub.add_parser("init", help="write a first config for an agent or the aggregator",
                          description="Write a working config. No secret goes into it: the broker password goes "
                                      "to its own file (--password-stdin, mode 0600) or a systemd credential.")
    kinds = init.add_subparsers(dest="kind", required=True, metavar="KIND")
    agent = kinds.add_parser("agent", help="a device agent's config")
    agent.add_argument("--broker", type=split_host_port, required=True, metavar="HOST[:PORT]",
                       help="the fleet's MQTT broker (port default: 1883)")
    agent.add_argument("--device-id", default=default_device_id(),
                       help="this device's id (default: the host name, here %(default)s)")
    agent.add_argument("--fleet", default="default", help="the aggregator's fleet_name (default: default)")
    agent.add_argument("--username", help="MQTT user (default: the device id, as the production ACL expects)")
    agent.add_argument("--state-dir", type=Path,
                       help="agent state (default: /var/lib/edge-fl as root, else ~/.local/state/edge-fl)")
    source = agent.add_mutually_exclusive_group()
    source.add_argument("--serial-port", action="append", metavar="URL",
                        help="an MCU's serial port (repeatable; default /dev/ttyACM0)")
    source.add_argument("--subject", type=int,
                        help="use the bundled recordings of this subject (4-9) instead of a serial MCU: the demo data")
    aggregator = kinds.add_parser("aggregator", help="the aggregator's config")
    aggregator.add_argument("--broker", type=split_host_port, default=("127.0.0.1", 1883), metavar="HOST[:PORT]",
                            help="the fleet's MQTT broker (default: 127.0.0.1:1883)")
    aggregator.add_argument("--fleet", default="default", help="fleet name, the agents' fleet (default: default)")
    aggregator.add_argument("--username", default="aggregator", help="MQTT user (default: aggregator)")
    aggregator.add_argument("--state", type=Path, help="SQLite file (default: /var/lib/edge-fl-aggregator/"
                                                        "aggregator.db as root, else under ~/.local/state)")
    aggregator.add_argument("--expected-clients", type=int, default=1,
                            help="round 1 opens once this many devices are online (default: 1)")
    aggregator.add_argument("--min-clients", type=int, default=1,
                            help="fewest updates for a round to count (default: 1)")
    aggregator.add_argument("--rounds", type=int, default=30, help="federated rounds (default: 30)")
    aggregator.add_argument("--strategy", default="ditto", help="see `edge-fl simulate --help` (default: ditto)")
    for p in (agent, aggregator):
        p.add_argument("-o", "--output", type=Path,
                       help="where to write (default: /etc/edge-fl/KIND.toml as root, else ~/.config/edge-fl/; "
                            "'-' prints it)")
        p.add_argument("--password-file", type=Path, help="the file holding the broker password (named in the config)")
        p.add_argument("--password-stdin", action="store_true",
                       help="read the password from standard input and write it to --password-file "
                            "(default: beside the config) with mode 0600")
        p.add_argument("--force", action="store_true", help="replace existing files")
        p.set_defaults(func=cmd_init)

    check = sub.add_parser("check-config", help="check an agent or aggregator config and name every problem",
                           description="Load a config as `edge-fl agent` or `edge-fl aggregator` would and print "
                                       "every problem by file, section and key. Exit 0 if none, "
                                       f"{EXIT_CONFIG} otherwise.")
    check.add_argument("file", type=Path, help="the TOML file")
    check.add_argument("--kind", choices=list(KINDS), help="default: told from the file's keys")
    check.add_argument("--env", action="store_true", help="apply the EDGEFL_* environment variables as the service "
                                                           "would")
    add_set_option(check)
    check.set_defaults(func=cmd_check_config)
