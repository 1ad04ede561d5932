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
from dataclasses import dataclass, field, replace
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
    config_dir,
    env_overrides,
    parse_set,
    read_toml,
    resolve_path,
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


def split_host_port(text: str) -> tuple[str, int | None]:
    """'host', 'host:port' or '[v6addr]:port', as (host, port or None when not given): argparse's type of --broker."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST or HOST:PORT, got {text!r}") from None
    if not host or not 1 <= (port or 1) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST or HOST:PORT (port 1-65535), got {text!r}")
    return host, port


# --- the systemd units and their credentials ----------------------------------------------------------

UNITS = {"agent": "edge-fl-agent.service", "aggregator": "edge-fl-aggregator.service"}
TLS_KEY, SIGNING_KEY = "tls-key", "signing-key"  # the credential names the units load (LoadCredential=)
SYSTEMD_UNIT_DIR = Path("/etc/systemd/system")
_CREDENTIALS = re.compile(r"^/run/credentials/(?P<unit>[^/]+)/(?P<name>[^/]+)$")


def credential_path(kind: str, name: str) -> str:
    """Where systemd puts the credential `name` of the unit of `kind`: what a config names for it."""
    return f"/run/credentials/{UNITS[kind]}/{name}"


def unit_files(unit_file: Path) -> list[Path]:
    """A unit and its drop-ins (UNIT.d/*.conf), in the order systemd applies them."""
    return [unit_file, *sorted(unit_file.with_name(unit_file.name + ".d").glob("*.conf"), key=lambda p: p.name)]


def unit_credentials(files: Sequence[Path]) -> dict[str, str]:
    """{credential name: source file} that a unit's files (`unit_files`) load with LoadCredential=; an empty
    `LoadCredential=` drops those before it, as in systemd."""
    found: dict[str, str] = {}
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, eq, value = line.strip().partition("=")
            if not eq or key.strip() != "LoadCredential":
                continue
            name, _, source = value.strip().partition(":")
            if not name:
                found.clear()
            else:
                found[name] = source or name
    return found


def service_credentials(kind: str, password_auth: bool = False) -> tuple[dict[str, str], str]:
    """What the unit of `kind` loads, and which unit that is: as installed in /etc/systemd/system (with its
    drop-ins), else the template edge-fl ships (deploy/), with its password.conf drop-in for `password_auth`."""
    installed = SYSTEMD_UNIT_DIR / UNITS[kind]
    if installed.is_file():
        return unit_credentials(unit_files(installed)), str(installed)
    from .resources import deploy_file

    template = deploy_file(UNITS[kind])
    files = [template, *([deploy_file(f"{UNITS[kind]}.d/password.conf")] if password_auth else [])]
    return unit_credentials(files), f"{UNITS[kind]} as shipped"


# --- rendering ----------------------------------------------------------------------------------------

def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


PASSWORD_AUTH_WARNING = ("password authentication over plain TCP: for a development broker on loopback or a "
                         "trusted lab network only, NOT for untrusted networks (anyone on the path reads the "
                         "password and every message); production is mutual TLS (deploy/README.md, SECURITY.md)")


@dataclass(frozen=True)
class Security:
    """How a config proves who it is: mutual TLS (production) or a password (development), and its signing keys.

    Key paths are what the config names: a systemd credential (/run/credentials/UNIT/NAME) or the file itself."""

    password_auth: bool = False
    ca_file: str = "/etc/edge-fl/tls/ca.crt"
    cert_file: str = ""
    key_file: str = ""
    key_source: str = ""  # where a credential's key comes from, for the comment (the unit's LoadCredential=)
    signing_key: str = ""
    signing_source: str = ""
    password_file: str | None = None


def _tls_lines(sec: Security, identity: str) -> list[str]:
    if sec.password_auth:
        return [f"# WARNING: {PASSWORD_AUTH_WARNING}."]
    source = f"   # the unit's LoadCredential={TLS_KEY}:{sec.key_source}" if sec.key_source else ""
    return [
        "",
        f"# Mutual TLS (SECURITY.md): the certificate's CN, {identity!r}, is this client's identity for the broker",
        "# and its ACL. No password: the broker takes the certificate's CN as the MQTT user.",
        "[broker.tls]",
        f"ca_file = {_q(sec.ca_file)}",
        f"cert_file = {_q(sec.cert_file)}",
        f"key_file = {_q(sec.key_file)}{source}",
        '# min_version = "1.2"                # or "1.3"',
    ]


def _password_lines(sec: Security, username: str, default_file: str) -> list[str]:
    if not sec.password_auth:
        return []
    return [
        f"username = {_q(username)}",
        f"# No password in this file. Under systemd it is the credential {CREDENTIAL!r} (the unit's drop-in",
        "# password.conf, which wins over password_file); elsewhere the file below (mode 0600).",
        (f"password_file = {_q(sec.password_file)}" if sec.password_file
         else f"# password_file = {_q(default_file)}"),
    ]


def _signing_comment(sec: Security) -> str:
    return f"   # the unit's LoadCredential={SIGNING_KEY}:{sec.signing_source}" if sec.signing_source else ""


@dataclass(frozen=True)
class AgentInit:
    device_id: str
    broker_host: str
    broker_port: int = 8883
    fleet: str = "default"
    username: str | None = None  # password auth: default the device id (the ACL's %u is the device)
    state_dir: str = "/var/lib/edge-fl"
    source: str = "serial"
    serial_ports: list[str] = field(default_factory=lambda: ["/dev/ttyACM0"])
    subject: int = 4
    security: Security = field(default_factory=Security)
    fleet_keys: list[str] = field(default_factory=lambda: ["/etc/edge-fl/fleet.pub"])


def render_agent(a: AgentInit) -> str:
    sec = a.security
    lines = [
        "# edge-fl device agent (written by `edge-fl init agent`; check it with `edge-fl check-config FILE`).",
        "# Unknown keys are errors. Relative paths are relative to this file's directory. Per device, without",
        "# editing this file: environment variables (EDGEFL_DEVICE_ID, ...) or `edge-fl agent --set KEY=VALUE`.",
        f"device_id = {_q(a.device_id):<25} # letters, digits . _ - : an MQTT topic level and the client id",
        f"fleet = {_q(a.fleet):<29} # must match the aggregator's fleet_name",
        f"state_dir = {_q(a.state_dir):<25} # head, personal tensors, round log, outbox (SQLite)",
        '# [backbone] model = "/path/to/backbone.tflite"   # default: the model shipped with edge-fl',
        "",
        "[broker]",
        f"host = {_q(a.broker_host)}",
        f"port = {a.broker_port}",
        *_password_lines(sec, a.username or a.device_id, "/etc/edge-fl/mqtt-password"),
        *_tls_lines(sec, a.device_id),
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
    lines += [
        "",
        "# Signatures (deploy/README.md, \"Keys\"): this device signs its updates with its own key and takes round",
        "# tasks and global models only when signed by the fleet key.",
        "[signing]",
        f"key = {_q(sec.signing_key)}{_signing_comment(sec)}",
        f"fleet_keys = [{', '.join(_q(k) for k in a.fleet_keys)}]",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class AggregatorInit:
    state: str
    broker_host: str = "127.0.0.1"
    broker_port: int = 8883
    fleet: str = "default"
    username: str = "aggregator"
    expected_clients: int = 1
    min_clients: int = 1
    deadline_s: float = 120.0
    strategy: str = "ditto"
    rounds: int = 30
    security: Security = field(default_factory=Security)
    registry: str = "/etc/edge-fl/devices"


def render_aggregator(a: AggregatorInit) -> str:
    sec = a.security
    lines = [
        "# edge-fl aggregator (written by `edge-fl init aggregator`; check it with `edge-fl check-config FILE`).",
        "# What is trained lives in [train] and reaches every device with each round task. Relative paths are",
        "# relative to this file's directory.",
        f"state = {_q(a.state)}   # SQLite (WAL): rounds, accepted updates, global versions; a postgresql:// URL "
        f"for several workers (docs/scale-out.md)",
        f"fleet_name = {_q(a.fleet)}",
        "embedding_dim = 64                 # the backbone's embedding width",
        "num_classes = 7",
        "",
        "[broker]",
        f"host = {_q(a.broker_host)}" + ("" if sec.password_auth else "   # a name the broker certificate lists"),
        f"port = {a.broker_port}",
        *_password_lines(sec, a.username, "/etc/edge-fl/aggregator-password"),
        *_tls_lines(sec, "aggregator"),
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
        "",
        "# Signatures (deploy/README.md, \"Keys\"): tasks and models are signed with the fleet key; an update counts",
        "# only if signed by a key enrolled for its device (`edge-fl keys register`; rescanned on change, SIGHUP).",
        "[signing]",
        f"key = {_q(sec.signing_key)}{_signing_comment(sec)}",
        f"registry = {_q(a.registry)}",
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


def _security(kind: str, args: argparse.Namespace, conf_dir: Path, identity: str) -> tuple[Security, list[str]]:
    """The [broker.tls] and [signing] paths init writes, and notes for the operator about them."""
    systemd: bool = _is_root() if args.systemd is None else args.systemd
    notes: list[str] = []
    tls_dir: Path = (args.tls_dir or conf_dir / "tls").absolute()
    default_signing = conf_dir / ("device.key" if kind == "agent" else "fleet.key")
    signing_file: Path = (args.signing_key or default_signing).absolute()
    key_file, signing_key = str(tls_dir / f"{identity}.key"), str(signing_file)
    key_source = signing_source = ""
    if systemd:  # the service runs as a dynamic user: it gets root-only keys as credentials
        creds, unit = service_credentials(kind, args.password_auth)
        wanted = {SIGNING_KEY: signing_key} if args.password_auth else {TLS_KEY: key_file, SIGNING_KEY: signing_key}
        for name, own in wanted.items():
            source = creds.get(name)
            if source is None:
                raise InitError(f"{unit} loads no credential {name!r}: add LoadCredential={name}:{own} to it")
            if name == TLS_KEY:
                key_file, key_source = credential_path(kind, name), source
            else:
                signing_key, signing_source = credential_path(kind, name), source
            if not Path(source).exists():
                notes.append(f"the unit takes the {name} credential from {source}, which does not exist yet"
                             + (f": ln -s {Path(own).name} {source}" if Path(own).exists() and name == TLS_KEY
                                else ""))
    return Security(password_auth=args.password_auth, ca_file=str(tls_dir / "ca.crt"),
                    cert_file=str(tls_dir / f"{identity}.crt"), key_file=key_file, key_source=key_source,
                    signing_key=signing_key, signing_source=signing_source), notes


def cmd_init(args: argparse.Namespace) -> int:
    kind: str = args.kind
    out: Path = args.output or default_config_dir() / f"{kind}.toml"
    conf_dir = (default_config_dir() if str(out) == "-" else out.parent).absolute()
    password_file: Path | None = args.password_file
    if (args.password_stdin or password_file is not None) and not args.password_auth:
        args.parser.error("--password-stdin and --password-file go with --password-auth (a development broker); "
                          "a production broker takes the device's certificate instead")
    if args.password_stdin and password_file is None:
        password_file = conf_dir / ("mqtt-password" if kind == "agent" else "aggregator-password")
    if password_file is not None:
        password_file = password_file.absolute()  # the service does not run in this directory
    host, port = args.broker
    port = port or (1883 if args.password_auth else 8883)
    identity = args.device_id if kind == "agent" else "aggregator"
    security, notes = _security(kind, args, conf_dir, identity)
    security = replace(security, password_file=str(password_file) if password_file else None)
    if kind == "agent":
        source = "watch-dataset" if args.subject is not None else "serial"
        fleet_keys = [str(k.absolute()) for k in args.fleet_key] or [str(conf_dir / "fleet.pub")]
        text = render_agent(AgentInit(
            device_id=args.device_id, broker_host=host, broker_port=port, fleet=args.fleet, username=args.username,
            state_dir=str(args.state_dir or default_state_dir("edge-fl")), source=source,
            serial_ports=args.serial_port or ["/dev/ttyACM0"], subject=args.subject or 4, security=security,
            fleet_keys=fleet_keys))
        cls: type[Any] = AgentConfig
    else:
        state = args.state or default_state_dir("edge-fl-aggregator") / "aggregator.db"
        text = render_aggregator(AggregatorInit(
            state=str(state), broker_host=host, broker_port=port, fleet=args.fleet, username=args.username,
            expected_clients=args.expected_clients, min_clients=min(args.min_clients, args.expected_clients),
            rounds=args.rounds, strategy=args.strategy, security=security,
            registry=str((args.registry or conf_dir / "devices").absolute())))
        cls = AggregatorConfig
    # What we write must load: check the text before it replaces anything.
    _, problems, _ = check_toml(text, cls, where=f"{out} (as it would be written)", base=conf_dir)
    if problems:
        raise ConfigError.of(problems)
    if args.password_auth:
        print(f"WARNING: {PASSWORD_AUTH_WARNING}", file=sys.stderr)
    if str(out) == "-":
        sys.stdout.write(text)
        return 0
    password = _read_password(sys.stdin) if args.password_stdin else None
    write_file(out, text, mode=0o644, force=args.force)  # no secret in it: the service's user must read it
    print(f"wrote {out}")
    if password is not None and password_file is not None:
        write_file(password_file, password + "\n", mode=0o600, force=args.force)
        print(f"wrote the broker password to {password_file} (mode 0600)")
    elif args.password_auth and password_file is None:
        print(f"no password file named: under systemd put the password in the credential {CREDENTIAL!r} "
              f"(deploy/README.md), or rerun with --password-stdin")
    for note in notes:
        print(f"note: {note}")
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
    merged: dict[str, Any] = field(default_factory=dict)  # the table checked, overrides applied


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


def _get(table: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        table = table.get(key) if isinstance(table, Mapping) else None  # type: ignore[assignment]
    return table


def _readable_by_others(path: Path) -> bool:
    """Can a user who is neither owner nor group (a DynamicUser service) read `path` and reach it?"""
    try:
        wanted = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
        if path.stat().st_mode & wanted != wanted:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.absolute().parents)
    except OSError:
        return False


def _content_problem(path: Path, what: str, identity: str | None) -> str | None:
    """What is wrong with the content of a key or certificate file, or None."""
    from . import keys

    try:
        if what == "signing-key":
            keys.load_private_key(path)
        elif what == "public-key":
            keys.load_public_keys(path)
        elif what == "private-key":
            if b"PRIVATE KEY" not in path.read_bytes():
                return "is not a PEM private key"
        elif what in ("ca", "cert"):
            from cryptography import x509
            from cryptography.x509.oid import NameOID

            cert = x509.load_pem_x509_certificate(path.read_bytes())
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            cn = str(names[0].value) if names else ""
            if what == "cert" and identity is not None and cn != identity:
                return (f"is the certificate of {cn!r}, not of {identity!r}: the broker takes its CN as the identity "
                        "(enrol this device under its device_id, or fix device_id)")
    except (ValueError, OSError) as exc:
        text = str(exc)
        return text[text.find(":") + 2:] if text.startswith(("private key", "public key")) else f"does not load ({exc})"
    return None


def _check_file(report: CheckReport, at: str, value: str, what: str, kind: str, base: Path,
                environ: Mapping[str, str], service: bool, identity: str | None) -> None:
    """One path of a config: there, readable by whoever reads it (the service or its credential loader), and
    holding what it should. `what`: file, dir, ca, cert, private-key, signing-key, public-key."""
    resolved = resolve_path(value, base) or value
    private = what in ("private-key", "signing-key")
    target, label, read_by_root = Path(resolved), f"{at}: {resolved}", False
    credential = _CREDENTIALS.match(resolved)
    if credential:
        unit, name = credential["unit"], credential["name"]
        here = environ.get("CREDENTIALS_DIRECTORY")
        if here and Path(here) == Path(resolved).parent:  # running inside the unit: the copy itself
            target = Path(resolved)
        else:
            unit_kind = next((k for k, u in UNITS.items() if u == unit), kind)
            password_auth = not _get(report.merged, "broker", "tls", "ca_file")
            creds, described = service_credentials(unit_kind, password_auth)
            source = creds.get(name)
            if source is None:
                report.problems.append(f"{label} is the credential {name!r} of {unit}, which {described} does not "
                                       f"load: add LoadCredential={name}:FILE to the unit (systemctl edit {unit}), "
                                       "or name the file itself")
                return
            target, label, read_by_root = Path(source), f"{at}: credential {name!r} from {source}", True
    if not target.exists():
        report.problems.append(f"{label} does not exist; create it or fix the path")
        return
    if what == "dir" and not target.is_dir():
        report.problems.append(f"{label} is not a directory")
        return
    if not os.access(target, os.R_OK):
        if read_by_root and not _is_root():
            report.warnings.append(f"{label}: cannot check it as this user (systemd reads it as root); run "
                                   "check-config as root")
        else:
            report.problems.append(f"{label} is not readable by this user; fix its owner or mode")
        return
    if private and target.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        report.problems.append(f"{label} is a private key readable by others (mode "
                               f"{stat.S_IMODE(target.stat().st_mode):04o}): chmod 600 {target}")
    elif service and not read_by_root and not _readable_by_others(target):
        report.problems.append(f"{label} is not readable by the service's dynamic user (mode "
                               f"{stat.S_IMODE(target.stat().st_mode):04o}, or a directory on the way without o+x): "
                               f"chmod o+r{'x' if target.is_dir() else ''} it")
    if what == "dir":
        if not any(target.glob("*.pub")):
            report.warnings.append(f"{label}: no device enrolled yet (edge-fl keys register DEVICE FILE.pub "
                                   f"--registry {target})")
        return
    problem = _content_problem(target, what, identity)
    if problem:
        report.problems.append(f"{label} {problem}")


def _check_paths(report: CheckReport, kind: str, where: str, base: Path, environ: Mapping[str, str]) -> None:
    """Every file a config names, found from the table: even when other keys are wrong."""
    merged = report.merged
    paths: list[tuple[str, Any, str]] = []  # (where/section key, value, what)
    tls = _get(merged, "broker", "tls")
    tls = tls if isinstance(tls, Mapping) else {}
    paths += [(f"{where} [broker.tls] {key}", tls.get(key), what) for key, what in
              (("ca_file", "ca"), ("cert_file", "cert"), ("key_file", "private-key"), ("key_password_file", "file"))]
    signing = merged.get("signing")
    signing = signing if isinstance(signing, Mapping) else {}
    paths.append((f"{where} [signing] key", signing.get("key"), "signing-key"))
    if kind == "agent":
        backbone = merged.get("backbone")
        if isinstance(backbone, str):
            paths.append((f"{where} backbone", backbone, "file"))
        else:
            paths.append((f"{where} [backbone] model", _get(merged, "backbone", "model"), "file"))
        paths.append((f"{where} [data] dataset", _get(merged, "data", "dataset"), "file"))
        fleet_keys = signing.get("fleet_keys")
        for i, key in enumerate(fleet_keys if isinstance(fleet_keys, list) else []):
            paths.append((f"{where} [signing] fleet_keys[{i}]", key, "public-key"))
        identity = merged.get("device_id") if isinstance(merged.get("device_id"), str) else None
    else:
        paths.append((f"{where} [signing] registry", signing.get("registry"), "dir"))
        identity = "aggregator"
    values = [v for _, v, _ in paths if isinstance(v, str)]
    service = any(_CREDENTIALS.match(resolve_path(v, base) or "") for v in values)
    for at, value, what in paths:
        if isinstance(value, str) and value:
            _check_file(report, at, value, what, kind, base, environ, service, identity)
    if not tls.get("ca_file"):
        report.warnings.append(f"{where} [broker]: no [broker.tls]: {PASSWORD_AUTH_WARNING}")
    if not signing.get("key"):
        report.warnings.append(f"{where}: no [signing] key: signatures are off, and whoever can publish on the "
                               "broker can forge messages (deploy/README.md, \"Keys\")")


def _user_dataset_problem(directory: str, user: str) -> tuple[str | None, str | None]:
    """(what stops an agent with `source = "user-dataset"` before it reads a window, the card's kind): no dataset
    card in `directory`, or `user` no federated user of it (the users' files are checked when the agent starts, as
    `edge-fl data check DIR` checks them)."""
    from .data.from_userdata import check_federated_user
    from .data.userdata import UserDataError, UserDataset, read_card

    root = Path(directory)
    if not root.is_dir():
        return (f"dir {directory}: no such directory; give a dataset directory (dataset.json and users/, "
                "docs/data-format.md; `edge-fl data import ...` writes one)"), None
    try:
        card = read_card(root)
        check_federated_user(UserDataset(card, {}, root), user)
    except UserDataError as exc:
        return str(exc), None
    return None, card.kind


def _files_card_kind(report: CheckReport, path: str | Path, directory: str) -> tuple[str | None, str | None]:
    """(what stops an agent with `source = "files"` before it takes a file, the card's kind). A card that does not
    read is a warning: the application may install it with the directory, and the agent checks it when it starts."""
    from .data.userdata import UserDataError, read_card

    root = Path(directory)
    if not (root / "dataset.json").is_file():
        return (f"{directory} has no dataset.json: the agent reads every file against it (docs/data-format.md, "
                "'Feeding an agent from files')"), None
    try:
        return None, read_card(root).kind
    except UserDataError as exc:
        report.warnings.append(f"{path} [data]: {exc}; the agent refuses to start until the card reads, and the "
                               "augmentation and standardization keys are checked against it then")
        return None, None


def _data_options(report: CheckReport, path: str | Path, cfg: AgentConfig, kind: str | None) -> str:
    """What the agent does with its labelled windows (`[data] augment_copies`, `per_user_standardization`) for its
    source (`kind`: the card's, where the source has one); a key the source cannot apply is a problem."""
    from .agent.data_options import describe, option_problems

    d = cfg.data
    if d.source == "serial":
        windows, population, what = False, True, "an MCU on a serial line"
    elif d.source == "files":
        if kind is None:  # no card to tell: said above
            return ""
        windows = population = kind == "windows"
        what = f"the {kind} card of {d.dir}"
    elif d.source == "user-dataset":
        if kind is None:
            return ""
        windows, population, what = kind == "windows", True, f"the {kind} dataset {d.dir}"
    else:
        windows, population, what = True, True, "the bundled recordings"
    report.problems += [f"{path} {p}" for p in option_problems(d, windows=windows, population=population, what=what)]
    return f" ({describe(d, windows=windows, population=population)})"


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
    base = config_dir(path)
    cfg, problems, merged = check_toml(Path(path).read_text(), KINDS[report.kind], where=str(path),
                                       overrides=overrides, base=base)
    report.problems += problems
    report.merged = merged
    broker = merged.get("broker")
    broker = dict(broker) if isinstance(broker, dict) else {}
    if isinstance(broker.get("password_file"), str):
        broker["password_file"] = resolve_path(broker["password_file"], base)
    _check_secret(broker, str(path), environ, report)
    if report.kind == "agent":  # from the table: found even when other keys are wrong
        data_table = merged.get("data")
        data_table = data_table if isinstance(data_table, dict) else {}
        if data_table.get("source") == "serial" and not data_table.get("port"):
            report.problems.append(f"{path} [data]: port is required when source = 'serial' "
                                   "(a pyserial URL such as /dev/ttyACM0)")
    _check_paths(report, report.kind, str(path), base, environ)
    if isinstance(cfg, AgentConfig):
        card_kind: str | None = None
        problem: str | None = None
        if cfg.data.source == "serial":
            data = f"serial {', '.join([cfg.data.port or '?', *cfg.data.more_ports])}"
        elif cfg.data.source == "files":
            data = f"files dropped in {cfg.data.dir}"
            problem, card_kind = _files_card_kind(report, path, cfg.data.dir or "")
        elif cfg.data.source == "user-dataset":
            data = f"user {cfg.data.user} of the dataset in {cfg.data.dir}"
            problem, card_kind = _user_dataset_problem(cfg.data.dir or "", cfg.data.user or "")
        else:
            data = f"bundled recordings of subject {cfg.data.subject}"
        if problem:
            report.problems.append(f"{path} [data]: {problem}")
        data += _data_options(report, path, cfg, card_kind)
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
                          description="Write a working config: mutual TLS to the broker and signed messages (the "
                                      "production setup, deploy/README.md), or with --password-auth a password "
                                      "for a development broker. No secret goes into it.")
    kinds = init.add_subparsers(dest="kind", required=True, metavar="KIND")
    agent = kinds.add_parser("agent", help="a device agent's config",
                             description="Write a device agent's config. Production (the default): [broker.tls] "
                                         "with TLS_DIR/ca.crt, TLS_DIR/DEVICE_ID.crt and the device's TLS key "
                                         "(`edge-fl enrol`), [signing] with its signing key (`edge-fl keys new`) "
                                         "and the fleet's public key.")
    agent.add_argument("--broker", type=split_host_port, required=True, metavar="HOST[:PORT]",
                       help="the fleet's MQTT broker (port default: 8883, with --password-auth 1883)")
    agent.add_argument("--device-id", default=default_device_id(),
                       help="this device's id, the CN of its certificate (default: the host name, here %(default)s)")
    agent.add_argument("--fleet", default="default", help="the aggregator's fleet_name (default: default)")
    agent.add_argument("--username", help="--password-auth: MQTT user (default: the device id, as the ACL expects)")
    agent.add_argument("--state-dir", type=Path,
                       help="agent state (default: /var/lib/edge-fl as root, else ~/.local/state/edge-fl)")
    source = agent.add_mutually_exclusive_group()
    source.add_argument("--serial-port", action="append", metavar="URL",
                        help="an MCU's serial port (repeatable; default /dev/ttyACM0)")
    source.add_argument("--subject", type=int,
                        help="use the bundled recordings of this subject (4-9) instead of a serial MCU: the demo data")
    agent.add_argument("--signing-key", type=Path, metavar="FILE",
                       help="this device's signing key (default: device.key beside the config)")
    agent.add_argument("--fleet-key", type=Path, action="append", default=[], metavar="FILE",
                       help="the fleet's public key (repeatable during a rotation; default: fleet.pub beside the "
                            "config)")
    aggregator = kinds.add_parser("aggregator", help="the aggregator's config",
                                  description="Write the aggregator's config. Production (the default): "
                                              "[broker.tls] with TLS_DIR/ca.crt, TLS_DIR/aggregator.crt and .key "
                                              "(`scripts/fleet-ca client aggregator`), [signing] with the fleet key "
                                              "and the device key registry.")
    aggregator.add_argument("--broker", type=split_host_port, default=("127.0.0.1", None), metavar="HOST[:PORT]",
                            help="the fleet's MQTT broker (default: 127.0.0.1, port 8883, with --password-auth 1883)")
    aggregator.add_argument("--fleet", default="default", help="fleet name, the agents' fleet (default: default)")
    aggregator.add_argument("--username", default="aggregator",
                            help="--password-auth: MQTT user (default: aggregator)")
    aggregator.add_argument("--state", type=Path, help="SQLite file (default: /var/lib/edge-fl-aggregator/"
                                                        "aggregator.db as root, else under ~/.local/state)")
    aggregator.add_argument("--expected-clients", type=int, default=1,
                            help="round 1 opens once this many devices are online (default: 1)")
    aggregator.add_argument("--min-clients", type=int, default=1,
                            help="fewest updates for a round to count (default: 1)")
    aggregator.add_argument("--rounds", type=int, default=30, help="federated rounds (default: 30)")
    aggregator.add_argument("--strategy", default="ditto", help="see `edge-fl simulate --help` (default: ditto)")
    aggregator.add_argument("--signing-key", type=Path, metavar="FILE",
                            help="the fleet's signing key (default: fleet.key beside the config)")
    aggregator.add_argument("--registry", type=Path, metavar="DIR",
                            help="enrolled devices' public keys (default: devices/ beside the config)")
    for p in (agent, aggregator):
        p.add_argument("-o", "--output", type=Path,
                       help="where to write (default: /etc/edge-fl/KIND.toml as root, else ~/.config/edge-fl/; "
                            "'-' prints it)")
        p.add_argument("--tls-dir", type=Path, metavar="DIR",
                       help="where ca.crt, the certificate and (without systemd) the TLS key are (default: tls/ "
                            "beside the config)")
        p.add_argument("--systemd", action=argparse.BooleanOptionalAction, default=None,
                       help="name the private keys as the systemd unit's credentials (/run/credentials/UNIT/...) "
                            "rather than as files (default: as root yes, else no)")
        p.add_argument("--password-auth", action="store_true",
                       help="a development broker that takes a password (no TLS): NOT for untrusted networks")
        p.add_argument("--password-file", type=Path,
                       help="--password-auth: the file holding the broker password (named in the config)")
        p.add_argument("--password-stdin", action="store_true",
                       help="--password-auth: read the password from standard input and write it to "
                            "--password-file (default: beside the config) with mode 0600")
        p.add_argument("--force", action="store_true", help="replace existing files")
        p.set_defaults(func=cmd_init, parser=p)

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
