"""TOML configuration of the agent and the aggregator, checked on load with messages that name the file
and the key. Unknown keys are errors: a typo must not silently fall back to a default."""

from __future__ import annotations

import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .learning.training import TrainingConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(ValueError):
    """A configuration file is missing, is not TOML, or has a wrong, missing or unknown key."""


EXIT_CONFIG = 78  # EX_CONFIG (sysexits.h): a service manager should not restart a typo


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    password_file: str | None = None  # preferred over `password` on a device: keep secrets out of the config
    max_payload_bytes: int = 256 * 1024 - 1024  # below mosquitto-dev.conf's max_packet_size

    def secret(self) -> str | None:
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return self.password


@dataclass(frozen=True)
class DataConfig:
    source: str = "watch-dataset"  # the demo's data (this subject's bundled recordings), or "serial": an attached MCU
    port: str | None = None  # serial: any pyserial URL (/dev/ttyACM0, socket://host:port, a pty)
    more_ports: list[str] = field(default_factory=list)  # serial: further MCUs attached to this agent
    baudrate: int = 115200
    min_windows: int = 14  # serial: labelled windows needed before the device trains
    subject: int = 4
    regime: str = "natural"
    seed: int = 0
    shots: int = 5
    classes_per_client: int = 3
    alpha: float = 0.5
    dataset: str | None = None
    cache_dir: str | None = None


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: str
    fleet: str = "default"
    rng_stream: int = 0  # this device's random stream; the demo sets it to the client's index in `simulate`
    backbone: str | None = None
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass(frozen=True)
class FleetConfig:
    """How rounds run; what is trained (strategy, rounds, fraction, hyperparameters) is in [train]."""

    expected_clients: int = 1  # round 1 opens once this many devices are online
    min_clients: int = 1
    deadline_s: float = 60.0
    max_update_bytes: int = 1 << 20


@dataclass(frozen=True)
class AggregatorConfig:
    state: str
    fleet_name: str = "default"
    embedding_dim: int = 64
    num_classes: int = 7
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)


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


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{where}: missing required key {name!r}")
            continue
        value = data[name]
        sub = f.type if isinstance(f.type, type) else _NESTED.get(str(f.type))
        if sub is not None and is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{name}] must be a table")
            value = _build(sub, value, f"{where} [{name}]")
        else:
            hint = hints[name]
            if not _fits(value, hint):
                raise ConfigError(f"{where}: {name} must be {_describe(hint)}, got {value!r} "
                                  f"({type(value).__name__})")
            if hint is float and isinstance(value, int):
                value = float(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


_NESTED: dict[str, type] = {"BrokerConfig": BrokerConfig, "DataConfig": DataConfig, "FleetConfig": FleetConfig,
                            "TrainingConfig": TrainingConfig}


def load_toml(path: str | Path, cls: type[T]) -> T:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from exc
    return _build(cls, data, str(p))
