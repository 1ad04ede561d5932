"""TOML configuration of the agent and the aggregator, checked on load with messages that name the file
and the key. Unknown keys are errors: a typo must not silently fall back to a default.

Where a value comes from, strongest first: `--set section.key=value` on the command line, then an
environment variable (`ENVIRONMENT`, for the few values operators change per device), then the file,
then the default. Every source is type- and range-checked the same way; a problem names its source.
Secrets never come from the command line or the environment: see `BrokerConfig.secret`.

Paths in a file (`PATH_KEYS`: state, model, password, certificate, key and registry paths) may be relative:
they are taken relative to the directory of the file that names them, whatever directory the service
starts in; `~` is the home directory. A path given by `--set` or an environment variable is relative to
the current directory, like any path on a command line."""

from __future__ import annotations

import logging
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .learning.robust import RobustConfig
from .learning.strategies import STRATEGIES
from .learning.training import TrainingConfig
from .messaging import TlsOptions
from .protocol import check_name

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(ValueError):
    """A configuration file is missing, is not TOML, or has a wrong, missing or unknown key.

    `problems` holds every problem found, each naming its file (or variable, or flag), section and key."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]

    @classmethod
    def of(cls, problems: Sequence[str]) -> ConfigError:
        if len(problems) == 1:
            return cls(problems[0], problems)
        return cls(f"{len(problems)} problems: " + "; ".join(problems), problems)


EXIT_CONFIG = 78  # EX_CONFIG (sysexits.h): a service manager should not restart a typo


@dataclass(frozen=True)
class TlsConfig:
    """`[broker.tls]`: TLS to the broker, mutual with a client certificate (SECURITY.md). Unset `ca_file`: plain
    TCP, for a development broker on loopback only (the link then logs a warning)."""

    ca_file: str | None = None  # the fleet CA (PEM): the broker's certificate must be signed by it
    cert_file: str | None = None  # this client's certificate (PEM); its CN is the identity: the device id
    key_file: str | None = None  # its private key (PEM, mode 0600), made on the device by `edge-fl enrol`
    key_password_file: str | None = None  # the passphrase of an encrypted key_file
    min_version: str = "1.2"  # oldest TLS version accepted: "1.2" or "1.3"
    # The broker's name is always checked against its certificate; this key exists only to refuse `false`.
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("[broker.tls] cert_file and key_file go together: set both (mutual TLS) or neither")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("[broker.tls] cert_file needs ca_file (the fleet CA that signed the broker's certificate)")

    def options(self) -> TlsOptions | None:
        """What the broker link takes, or None without `ca_file` (plain TCP)."""
        if self.ca_file is None:
            return None
        return TlsOptions(self.ca_file, self.cert_file, self.key_file, self.key_password_file, self.min_version)


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None  # with a client certificate the broker takes the certificate's CN instead
    password: str | None = None
    password_file: str | None = None  # preferred over `password` on a device: keep secrets out of the config
    max_payload_bytes: int = 256 * 1024 - 1024  # below mosquitto-dev.conf's max_packet_size
    keepalive_s: int = 30  # MQTT keepalive: the broker declares this client gone after 1.5x this without traffic
    connect_timeout_s: float = 30.0  # how long the first connection may take (TLS failures are reported at once)
    # A device sends a topic it publishes every round (telemetry) as an MQTT v5 topic alias: about 29 bytes a
    # round less (docs/topic-aliases.md). Off by default: it relies on how paho keeps unacknowledged messages.
    topic_aliases: bool = False
    tls: TlsConfig = field(default_factory=TlsConfig)

    def secret(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The MQTT password: the systemd credential `mqtt-password` (LoadCredential=) when the service
        has one, else the file `password_file` names, else `password` (for throw-away development
        brokers only). Never logged or printed."""
        source = secret_source(self, environ)
        if source is None:
            return self.password
        path, what = source
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {path} ({exc.strerror or exc}); create it (mode 0600, "
                              "readable by the service's user) or fix the path") from None
        if not text:
            raise ConfigError(f"{what}: {path} is empty; write the broker password into it")
        return text


CREDENTIAL = "mqtt-password"  # the name in the units' LoadCredential=mqtt-password:/etc/edge-fl/...


def secret_source(broker: BrokerConfig, environ: Mapping[str, str] = os.environ) -> tuple[Path, str] | None:
    """Which file holds the password (path, what to call it in a message), or None: no secret file."""
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL).is_file():
        return Path(credentials) / CREDENTIAL, f"systemd credential {CREDENTIAL!r} ($CREDENTIALS_DIRECTORY)"
    if broker.password_file:
        return Path(broker.password_file), "[broker] password_file"
    return None


# What a device does with its labelled windows before training, when its config leaves the key unset. Off: the
# validation search (bench/results/tuning.md) picks them for some strategies on one dataset and not the other,
# so they are a per-deployment choice (README, "Which strategy"); switching one on is changing its constant
# here: a source that cannot apply one (an MCU's windows, a features card) then stays without it.
DEFAULT_AUGMENT_COPIES = 0  # copies of each labelled window; 8 is what edge_agent/data/augment.py measured
DEFAULT_PER_USER_STANDARDIZATION = False
MAX_AUGMENT_COPIES = 32  # each copy costs one backbone invoke per labelled window and one stored embedding


@dataclass(frozen=True)
class DataConfig:
    # "watch-dataset": the demo's data (this subject's bundled recordings); "serial": an attached MCU; "files": files a
    # device application writes in `dir` (docs/data-format.md, "Feeding an agent from files"); "user-dataset": one
    # federated user (`user`) of the per-user dataset directory `dir` (docs/data-format.md, `edge-fl demo --data`),
    # through the backbone `[backbone] model` names (a windows dataset), split in time by `split`, partitioned by
    # regime, seed, shots, ... as `edge-fl simulate --data dir` gives that user
    source: str = "watch-dataset"
    port: str | None = None  # serial: any pyserial URL (/dev/ttyACM0, socket://host:port, a pty)
    more_ports: list[str] = field(default_factory=list)  # serial: further MCUs attached to this agent
    baudrate: int = 115200
    # files: the directory the application writes its .npz files and dataset.json in; user-dataset: the dataset
    dir: str | None = None
    user: str | None = None  # user-dataset: the user id (one of the card's roles.federate)
    split: str = "auto"  # user-dataset: the time split, as `edge-fl simulate --split` ("auto", "session", "segment")
    keep_files: bool = True  # files: a stored file moves to dir/processed/ (false: it is deleted)
    min_windows: int = 14  # serial, files: labelled windows needed before the device trains
    # serial, files: embeddings of windows kept (64 bytes each on disk, 256 as training data); beyond it the oldest go
    max_windows: int = 5000
    subject: int = 4
    regime: str = "natural"
    seed: int = 0
    shots: int = 5
    classes_per_client: int = 3
    alpha: float = 0.5
    dataset: str | None = None
    cache_dir: str | None = None
    # watch-dataset, user-dataset (windows), files (windows card): this many augmented copies of each labelled
    # training window (edge_agent/data/augment.py), embedded by the backbone and trained on beside it; 0: none.
    # Unset: DEFAULT_AUGMENT_COPIES where the source can augment, 0 elsewhere.
    augment_copies: int | None = None
    # Standardize the embeddings with this user's own statistics (of its training windows, labels unread), shrunk
    # towards the population's (edge_agent/learning/features.py, fit_user_standardizer). Unset:
    # DEFAULT_PER_USER_STANDARDIZATION where the source has population statistics, false elsewhere.
    per_user_standardization: bool | None = None

    def __post_init__(self) -> None:
        if self.max_windows < self.min_windows:
            raise ValueError(f"max_windows ({self.max_windows}) must be at least min_windows ({self.min_windows})")
        if self.source == "files" and not self.dir:
            raise ValueError("source = 'files' needs dir: the directory the application writes its files in")
        if self.source == "user-dataset" and not (self.dir and self.user):
            raise ValueError("source = 'user-dataset' needs dir (a dataset directory, docs/data-format.md) and user "
                             "(one of its federated users)")
        if self.source == "serial" and self.augment_copies:
            raise ValueError(f"augment_copies = {self.augment_copies} cannot apply to source = 'serial': the MCU's "
                             "windows are embedded one at a time as they arrive and are not augmented; set "
                             "augment_copies = 0 (or leave it out), or feed the windows as files (source = 'files')")

    def copies_to_make(self, *, can_augment: bool) -> int:
        """Augmented copies of each labelled window, for a source that `can_augment` (has raw sensor windows and
        augments them) or not: the key's value, or unset the default where it applies."""
        if self.augment_copies is not None:
            return self.augment_copies
        return DEFAULT_AUGMENT_COPIES if can_augment else 0

    def standardizes_per_user(self, *, has_population: bool) -> bool:
        """Whether to standardize with the user's own statistics, for a source that has population statistics to
        shrink them towards or not: the key's value, or unset the default where it applies."""
        if self.per_user_standardization is not None:
            return self.per_user_standardization
        return DEFAULT_PER_USER_STANDARDIZATION and has_population


@dataclass(frozen=True)
class BackboneConfig:
    """`[backbone]`: the frozen feature extractor the agent runs (`backbone = "PATH"` alone is short for `model`)."""

    model: str | None = None  # a .tflite file; default: the model shipped with edge-fl
    # "auto": LiteRT if installed, else tflite-runtime; "litert" (= "ai-edge-litert") or "tflite-runtime" to choose
    runtime: str = "auto"
    num_threads: int = 1
    # The tensor whose values are the embedding (docs/backbones.md): an integer is a position among the model's
    # outputs; a string is a signature output key or the name of any tensor, "tensor:N" the tensor with index N
    # (an intermediate one is read with every tensor kept). Default: the sidecar's feature_output, else output 0.
    feature_output: int | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.feature_output, int) and self.feature_output < 0:
            raise ValueError(f"[backbone] feature_output {self.feature_output} is not an output position (0, 1, ...)")
        if isinstance(self.feature_output, str) and not self.feature_output.strip():
            raise ValueError("[backbone] feature_output is empty: name a tensor, or leave the key out")


@dataclass(frozen=True)
class AgentSigningConfig:
    """Ed25519 signatures (deploy/README.md, "Keys"). Unset `key`: the agent signs nothing and takes unsigned
    tasks and models, which anyone who can publish on the broker can forge: development only."""

    key: str | None = None  # this device's private key (PEM, mode 0600): signs its updates
    fleet_keys: list[str] = field(default_factory=list)  # fleet public key(s) PEM; two during a fleet key rotation
    required: bool = True  # refuse unsigned tasks and models (false only while a fleet moves to signatures)

    def __post_init__(self) -> None:
        if bool(self.key) != bool(self.fleet_keys):
            raise ValueError("[signing] key and fleet_keys go together: set both (signatures on) or neither (off)")


@dataclass(frozen=True)
class UploadConfig:
    """`[upload]`: how long an update waits for the aggregator's receipt (edge_agent/receipts.py) before the
    agent sends it again. A PUBACK is not enough: a broker past its queue limits drops what it acknowledged."""

    receipt_timeout_s: float = 30.0  # the first wait after a send; it doubles with every send of the same update
    max_receipt_timeout_s: float = 300.0  # the longest wait: an aggregator that is slow gets fewer copies

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_receipt_timeout_s):
            raise ValueError("[upload] max_receipt_timeout_s must be a finite number of seconds: an update without "
                             "a receipt must be sent again some day")
        if self.max_receipt_timeout_s < self.receipt_timeout_s:
            raise ValueError(f"[upload] max_receipt_timeout_s ({self.max_receipt_timeout_s}) must be at least "
                             f"receipt_timeout_s ({self.receipt_timeout_s})")


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: str
    fleet: str = "default"
    rng_stream: int = 0  # this device's random stream; the demo sets it to the client's index in `simulate`
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    signing: AgentSigningConfig = field(default_factory=AgentSigningConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)


@dataclass(frozen=True)
class FleetConfig:
    """How rounds run; what is trained (strategy, rounds, fraction, hyperparameters) is in [train]."""

    expected_clients: int = 1  # round 1 opens once this many devices are online
    min_clients: int = 1
    deadline_s: float = 60.0
    max_update_bytes: int = 1 << 20
    # A round closes once this share of its selected devices reported (1.0: all of them, or the deadline):
    # ghost devices (online, never training) then cannot hold every round until its deadline.
    min_reported_fraction: float = 1.0
    # Chunked updates are reassembled in memory with these bounds; whatever does not fit is dropped and counted.
    chunk_timeout_s: float = 10.0  # a partial message whose other chunks do not follow within this is dropped
    max_partial_bytes: int = 32 << 20  # all partial messages together
    max_partials_per_device: int = 2  # a device's partial messages in flight (its oldest is dropped beyond)
    # Devices spread their first upload of a round over this many seconds (0: no spread), so a round of thousands
    # of devices does not reach the broker as one burst past its queue limits (broker_config/README.md).
    upload_window_s: float = 0.0
    # Devices send an update the aggregator has not confirmed again no sooner than this (each at its own point of
    # [retry_after_s, 2 * retry_after_s)), whatever their own [upload] receipt_timeout_s: announced in the task,
    # for a fleet whose round takes the aggregator longer to ingest than the devices' timeout. 0: not announced.
    retry_after_s: float = 0.0
    # With [train] downlink_codec: the changes of this many latest versions stay retained (model/delta/<v>), so a
    # device this many versions behind catches up from them; one further behind reads the whole model.
    downlink_keep: int = 8

    def __post_init__(self) -> None:
        if self.upload_window_s > 0 and self.upload_window_s >= self.deadline_s:
            raise ValueError(f"upload_window_s ({self.upload_window_s:g}) must be less than deadline_s "
                             f"({self.deadline_s:g}): the last device would upload after the deadline; keep the "
                             f"window well inside it (at most half: devices also need time to train and resend)")


@dataclass(frozen=True)
class AggregatorSigningConfig:
    """Ed25519 signatures (deploy/README.md, "Keys"). Unset `key`: tasks and models go out unsigned and any
    update is taken, whoever published it: development only."""

    key: str | None = None  # the fleet's private key (PEM, mode 0600): signs round tasks and global models
    registry: str | None = None  # directory of enrolled devices' public keys, one <device id>.pub each
    required: bool = True  # refuse unsigned updates (false only while a fleet moves to signatures)

    def __post_init__(self) -> None:
        if bool(self.key) != bool(self.registry):
            raise ValueError("[signing] key and registry go together: set both (signatures on) or neither (off)")


@dataclass(frozen=True)
class AggregatorConfig:
    # A SQLite file (one aggregator process), or a PostgreSQL URL "postgresql://user@host:5432/db" that several
    # aggregator workers share (docs/scale-out.md; needs the `postgres` extra).
    state: str
    fleet_name: str = "default"
    # This process's name among the workers of a PostgreSQL state (its MQTT client id and durable session end in
    # it, so keep it across restarts); unset: the host name. Unused with a SQLite state.
    worker: str = ""
    embedding_dim: int = 64
    num_classes: int = 7
    # Status page, /api/status and Prometheus /metrics on this HOST:PORT (":9465" = loopback). Off unless set:
    # a service should open no port it was not asked to, and metrics need prometheus-client (`aggregator` extra).
    http: str | None = None
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    signing: AggregatorSigningConfig = field(default_factory=AggregatorSigningConfig)
    # How updates are weighted, bounded and combined (learning/robust.py): the [aggregator] table.
    aggregator: RobustConfig = field(default_factory=RobustConfig)


def _fits(value: Any, hint: Any) -> bool:
    """Is a TOML value of the type a config field declares? (bool is not an int here; an int is a float.)"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], str(args[0]))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _build(cls: type[T], data: dict[str, Any], where: str, problems: list[str],
           origins: Mapping[str, str] | None = None, prefix: str = "", base: Path | None = None) -> T | None:
    """The config `cls` from a TOML table, or None; every problem found goes to `problems` (not only
    the first). `origins` names where an overridden key came from ("environment variable ..."); a relative
    path from the file is taken relative to `base`, the file's directory (`resolve_path`)."""
    origins = origins or {}
    known = {f.name: f for f in fields(cls)}
    for name in sorted(set(data) - set(known)):
        problems.append(f"{where}: unknown key {name!r}; known: {', '.join(sorted(known))}")
    before = len(problems)
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for name, f in known.items():
        dotted = prefix + name
        at = f"{origins[dotted]}: {dotted}" if dotted in origins else f"{where}: {name}"
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(f"{where}: missing required key {name!r}")
            continue
        value = data[name]
        sub = f.type if isinstance(f.type, type) else _NESTED.get(str(f.type))
        if sub is BackboneConfig and isinstance(value, str):
            value = {"model": value}  # `backbone = "PATH"`, the form before [backbone] had other keys
        if sub is not None and is_dataclass(sub):
            if not isinstance(value, dict):
                problems.append(f"{where}: [{name}] must be a table, got {value!r}")
                continue
            value = _build(sub, value, f"{where} [{name}]", problems, origins, dotted + ".", base)
            if value is None:
                continue
        else:
            hint = hints[name]
            if not _fits(value, hint):
                problems.append(f"{at} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")
                continue
            if hint is float and isinstance(value, int):
                value = float(value)
            check = _CHECKS.get((cls, name))
            expected = check(value) if check is not None and value is not None else None
            if expected:
                problems.append(f"{at} must be {expected}, got {value!r}")
                continue
            if (cls, name) in PATH_KEYS and base is not None and dotted not in origins:
                value = [resolve_path(v, base) for v in value] if isinstance(value, list) \
                    else resolve_path(value, base)
        kwargs[name] = value
    if len(problems) > before:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{where}: {exc}")
        return None


_NESTED: dict[str, type] = {"BackboneConfig": BackboneConfig, "BrokerConfig": BrokerConfig, "DataConfig": DataConfig,
                            "TlsConfig": TlsConfig,
                            "FleetConfig": FleetConfig,
                            "TrainingConfig": TrainingConfig, "AgentSigningConfig": AgentSigningConfig,
                            "AggregatorSigningConfig": AggregatorSigningConfig, "RobustConfig": RobustConfig,
                            "UploadConfig": UploadConfig}


def resolve_path(value: str | None, base: Path) -> str | None:
    """A path as a config file means it: `~` is the home directory, and a relative path is relative to the
    directory of the file that names it, not to wherever the service happens to start (systemd: /)."""
    if value is None or value == "" or "://" in value:  # a URL (a PostgreSQL state) is not a path
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def config_dir(path: str | Path) -> Path:
    """The directory relative paths in the config file `path` are taken from."""
    return Path(path).absolute().parent


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"{p} is a directory, not a configuration file") from None
    except PermissionError:
        raise ConfigError(f"{p}: permission denied (the file must be readable by this user)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from exc


def load_toml(path: str | Path, cls: type[T], overrides: Sequence[Override] = ()) -> T:
    """Load and check a config file; `overrides` (environment, then --set) are applied over it in order.
    Raises ConfigError listing every problem."""
    data = read_toml(path)
    cfg, problems, _ = check_table(data, cls, str(path), overrides, base=config_dir(path))
    if problems or cfg is None:
        raise ConfigError.of(problems)
    return cfg


def check_table(data: dict[str, Any], cls: type[T], where: str, overrides: Sequence[Override] = (),
                base: Path | None = None) -> tuple[T | None, list[str], dict[str, Any]]:
    """(the config or None, every problem, the table with the overrides applied). With `base` (the file's
    directory) relative paths of the file are made absolute from it; paths given by an override are left as
    given (relative to the current directory, as on any command line)."""
    problems: list[str] = []
    origins: dict[str, str] = {}
    apply_overrides(cls, data, overrides, problems, origins)
    return _build(cls, data, where, problems, origins, base=base), problems, data


def check_toml(text: str, cls: type[T], where: str, overrides: Sequence[Override] = (),
               base: Path | None = None) -> tuple[T | None, list[str], dict[str, Any]]:
    """`check_table` of TOML text (which may not have been written yet)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [f"{where}: not valid TOML ({exc})"], {}
    return check_table(data, cls, where, overrides, base)


def load_config(path: str | Path, cls: type[T], sets: Sequence[Override] = (),
                environ: Mapping[str, str] = os.environ) -> T:
    """What `edge-fl agent` and `edge-fl aggregator` run on: the file, then the environment, then --set."""
    overrides = [*env_overrides(cls, environ), *sets]
    cfg = load_toml(path, cls, overrides)
    if overrides:  # say so: a value that differs from the file should not puzzle whoever reads the log
        logging.getLogger("edge_fl.config").info("%s, overridden by %s", path, "; ".join(o.origin for o in overrides))
    return cfg


# --- overrides: environment variables and --set ----------------------------------------------------------------

@dataclass(frozen=True)
class Override:
    key: str  # dotted: "device_id", "broker.port"
    value: str  # as the operator wrote it; parsed to the key's type
    origin: str  # for messages: "environment variable EDGEFL_BROKER_PORT", "--set broker.port=x"


# The few values operators change per device (or per aggregator host), by environment variable.
ENVIRONMENT: dict[str, dict[str, str]] = {
    "AgentConfig": {
        "EDGEFL_DEVICE_ID": "device_id",
        "EDGEFL_FLEET": "fleet",
        "EDGEFL_STATE": "state_dir",
        "EDGEFL_BROKER_HOST": "broker.host",
        "EDGEFL_BROKER_PORT": "broker.port",
        "EDGEFL_BROKER_USERNAME": "broker.username",
        "EDGEFL_BROKER_PASSWORD_FILE": "broker.password_file",
        "EDGEFL_SERIAL_PORT": "data.port",
    },
    "AggregatorConfig": {
        "EDGEFL_FLEET": "fleet_name",
        "EDGEFL_STATE": "state",
        "EDGEFL_WORKER": "worker",
        "EDGEFL_BROKER_HOST": "broker.host",
        "EDGEFL_BROKER_PORT": "broker.port",
        "EDGEFL_BROKER_USERNAME": "broker.username",
        "EDGEFL_BROKER_PASSWORD_FILE": "broker.password_file",
    },
}
# A password on a command line is visible to every user (ps); in the environment, to the process tree.
_SECRET_KEYS = frozenset({"broker.password"})


def env_overrides(cls: type[Any], environ: Mapping[str, str] = os.environ) -> list[Override]:
    """The overrides set in the environment for this kind of config (an empty variable counts as unset)."""
    table = ENVIRONMENT.get(cls.__name__, {})
    return [Override(key, environ[var], f"environment variable {var}") for var, key in table.items()
            if environ.get(var)]


def parse_set(text: str) -> Override:
    """`section.key=value` (or `key=value` for a top-level key) from a --set option."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set {text}: expected SECTION.KEY=VALUE, for example broker.port=1884")
    key = key.strip()
    return Override(key, value, f"--set {key}=<hidden>" if key in _SECRET_KEYS else f"--set {text}")


def apply_overrides(cls: type[Any], data: dict[str, Any], overrides: Sequence[Override], problems: list[str],
                    origins: dict[str, str]) -> None:
    """Write each override into the TOML table `data`, parsed to its key's type; record its origin."""
    for o in overrides:
        if o.key in _SECRET_KEYS:
            problems.append(f"{o.origin}: {o.key} cannot be set there (other processes can read it); put the "
                            f"password in a file named by [broker] password_file or in the systemd credential "
                            f"{CREDENTIAL!r}")
            continue
        *sections, name = o.key.split(".")
        target: type[Any] = cls
        table = data
        for section in sections:
            sub = typing.get_type_hints(target).get(section) if section in {f.name for f in fields(target)} else None
            if not isinstance(sub, type) or not is_dataclass(sub):
                target = type(None)
                break
            target, table = sub, table.setdefault(section, {})
        names = {f.name for f in fields(target)} if is_dataclass(target) else set()
        hint = typing.get_type_hints(target).get(name) if name in names else None
        if hint is None or is_dataclass(hint) or not isinstance(table, dict):
            problems.append(f"{o.origin}: no key {o.key!r} in an {_KIND.get(cls.__name__, cls.__name__)} config")
            continue
        try:
            table[name] = _parse(o.value, hint)
        except ValueError:
            problems.append(f"{o.origin}: {o.key} must be {_describe(hint)}, got {o.value!r}")
            continue
        origins[o.key] = o.origin


_KIND = {"AgentConfig": "agent", "AggregatorConfig": "aggregator"}
_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _parse(text: str, hint: Any) -> Any:
    """A value typed on a command line or in an environment variable, as the type a field declares."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if text == "" and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _parse(text, arg)
                except ValueError:
                    pass
        raise ValueError(text)
    if origin is typing.Literal:
        for arg in args:
            if text == str(arg):
                return arg
        raise ValueError(text)
    if origin is list:
        return [_parse(part.strip(), args[0]) for part in text.split(",") if part.strip()]
    if hint is bool:
        word = text.strip().lower()
        if word not in _BOOLEANS:
            raise ValueError(text)
        return _BOOLEANS[word]
    if hint is int:
        return int(text)
    if hint is float:
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(text)
        return number
    if hint is str:
        return text
    raise ValueError(text)


# --- ranges and formats, checked beside the declared types -----------------------------------------------------

Check = Callable[[Any], "str | None"]  # None if the value is fine, else what was expected


def _at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"at least {low}"


def _between(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"between {low} and {high}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "greater than 0"


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "greater than 0 and at most 1"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


def _codec_spec(v: str) -> str | None:
    if not v:
        return None
    from .codec.compression import CodecSpec
    from .codec.tensor_pack import CodecError

    try:
        CodecSpec.parse(v)
    except CodecError as exc:
        return str(exc)
    return None


def _topic_name(v: str) -> str | None:
    try:
        check_name("name", v)
    except ValueError:
        return "1-64 letters, digits, '.', '_' or '-' (it becomes an MQTT topic level)"
    return None


def _user_id(v: str) -> str | None:
    try:
        check_name("user", v)  # user ids have the alphabet of device ids (docs/data-format.md)
    except ValueError:
        return "a user id of the dataset: 1-64 letters, digits, '.', '_' or '-'"
    return None


def _http_address(v: str | None) -> str | None:
    """HOST:PORT, :PORT or PORT, as edge_agent.aggregator.web.parse_address reads it."""
    host, sep, port = (v or "").rpartition(":")
    if v is None or (port.isdigit() and int(port) <= 65535 and " " not in host and (sep or not host)):
        return None
    return "HOST:PORT, e.g. \"127.0.0.1:9465\" (or \":9465\" for loopback)"


# Keys that name files or directories: relative to the config file's directory (`resolve_path`).
PATH_KEYS: frozenset[tuple[type[Any], str]] = frozenset({
    (AgentConfig, "state_dir"), (AggregatorConfig, "state"), (BackboneConfig, "model"),
    (BrokerConfig, "password_file"), (TlsConfig, "ca_file"), (TlsConfig, "cert_file"), (TlsConfig, "key_file"),
    (TlsConfig, "key_password_file"), (DataConfig, "dataset"), (DataConfig, "cache_dir"), (DataConfig, "dir"),
    (AgentSigningConfig, "key"), (AgentSigningConfig, "fleet_keys"),
    (AggregatorSigningConfig, "key"), (AggregatorSigningConfig, "registry"),
})

_CHECKS: dict[tuple[type[Any], str], Check] = {
    (AggregatorConfig, "http"): _http_address,
    (BrokerConfig, "port"): _between(1, 65535),
    (BrokerConfig, "max_payload_bytes"): _between(1024, 268_435_455),  # MQTT's largest packet
    (BrokerConfig, "keepalive_s"): _between(5, 65535),  # MQTT's limit; under 5 s pings cost more than they tell
    (BrokerConfig, "connect_timeout_s"): _positive,
    (TlsConfig, "min_version"): _one_of("1.2", "1.3"),
    (TlsConfig, "check_hostname"): lambda v: None if v else (
        "true: the broker's certificate must always match the host connected to; set host to a name its "
        "subjectAltName lists (scripts/fleet-ca broker NAME --ip ADDR) instead of turning the check off"),
    (DataConfig, "source"): _one_of("watch-dataset", "serial", "files", "user-dataset"),
    (DataConfig, "user"): lambda v: None if v is None else _user_id(v),
    (DataConfig, "split"): _one_of("auto", "session", "segment"),
    (DataConfig, "baudrate"): _at_least(1),
    (DataConfig, "min_windows"): _at_least(1),
    (DataConfig, "max_windows"): _at_least(1),
    (DataConfig, "augment_copies"): lambda v: None if 0 <= v <= MAX_AUGMENT_COPIES else (
        f"between 0 (no augmentation) and {MAX_AUGMENT_COPIES} (each copy of a labelled window costs a backbone "
        "invoke and a stored embedding; 8 is the measured choice)"),
    (BackboneConfig, "runtime"): _one_of("auto", "litert", "ai-edge-litert", "tflite-runtime"),
    (BackboneConfig, "num_threads"): _between(1, 64),
    (DataConfig, "subject"): _at_least(1),
    (DataConfig, "seed"): _at_least(0),
    (DataConfig, "shots"): _at_least(0),
    (DataConfig, "classes_per_client"): _at_least(1),
    (DataConfig, "alpha"): _positive,
    (AgentConfig, "device_id"): _topic_name,
    (AgentConfig, "fleet"): _topic_name,
    (AgentConfig, "rng_stream"): _at_least(0),
    (FleetConfig, "expected_clients"): _at_least(1),
    (FleetConfig, "min_clients"): _at_least(1),
    (FleetConfig, "deadline_s"): _positive,
    (FleetConfig, "max_update_bytes"): _at_least(1),
    (FleetConfig, "min_reported_fraction"): _fraction,
    (FleetConfig, "chunk_timeout_s"): _positive,
    (FleetConfig, "max_partial_bytes"): _at_least(0),
    (FleetConfig, "max_partials_per_device"): _at_least(1),
    (FleetConfig, "upload_window_s"): _at_least(0),
    (FleetConfig, "retry_after_s"): _at_least(0),
    (FleetConfig, "downlink_keep"): _at_least(1),
    (UploadConfig, "receipt_timeout_s"): _positive,
    (UploadConfig, "max_receipt_timeout_s"): _positive,
    (AggregatorConfig, "fleet_name"): _topic_name,
    (AggregatorConfig, "worker"): lambda v: None if v == "" else _topic_name(v),
    (AggregatorConfig, "embedding_dim"): _at_least(1),
    (AggregatorConfig, "num_classes"): _at_least(2),
    (TrainingConfig, "strategy"): _one_of(*STRATEGIES),
    (TrainingConfig, "rounds"): _at_least(1),
    (TrainingConfig, "seed"): _at_least(0),
    (TrainingConfig, "fraction"): _fraction,
    (TrainingConfig, "adapter_dim"): _at_least(0),
    (TrainingConfig, "local_epochs"): _at_least(0),
    (TrainingConfig, "batch_size"): _at_least(1),
    (TrainingConfig, "lr"): _positive,
    (TrainingConfig, "weight_decay"): _at_least(0),
    (TrainingConfig, "finetune_epochs"): _at_least(0),
    (TrainingConfig, "fedrep_head_epochs"): _at_least(0),
    (TrainingConfig, "ditto_lambda"): _at_least(0),
    (TrainingConfig, "codec"): _codec_spec,
    (TrainingConfig, "downlink_codec"): _codec_spec,
}
