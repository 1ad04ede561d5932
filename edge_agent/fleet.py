"""The fleet's messages as types: a global model, a round task, and their envelopes.

The aggregator's training configuration is the one source of truth: it travels as envelope meta in
every global model and round task, and each device rebuilds the same strategy from it. The envelope's
wire format is unchanged (codec/envelope.py); this module is the only place that reads or writes the
meta keys, so no service picks values out of an untyped dict. A signed fleet passes the signer in; the
signature itself is codec/signing.py's business.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .codec.envelope import AGGREGATOR_ID, Envelope, Kind, encode_envelope
from .learning.head import HeadConfig
from .learning.strategies import ServerState, Strategy, make_strategy
from .learning.training import TrainingConfig

Signer = Callable[[bytes], bytes]  # the envelope bytes to sign -> the signature (codec.signing.signer)
EVERY_DEVICE = "*"  # `selected` of a round that takes every device online when it opened


class FleetMessageError(ValueError):
    """An envelope that is intact but is not a valid global model or round task."""


@dataclass(frozen=True)
class GlobalModel:
    """A version of the global (shared) tensors and the training configuration that produced it."""

    version: int
    training: TrainingConfig
    head: HeadConfig
    params: Mapping[str, np.ndarray]

    def strategy(self) -> Strategy:
        return make_strategy(self.training.strategy, self.head, self.training.strategy_config())

    def server(self) -> ServerState:
        return ServerState(self.version, dict(self.params))

    @property
    def codec(self) -> str:
        return "int8" if self.training.int8_updates else "float32"


@dataclass(frozen=True)
class RoundTask:
    """Round `round`: train from `model`, upload before `deadline` (unix seconds); `selected` is None when
    every device online at the round's start takes part."""

    round: int
    deadline: float
    selected: tuple[str, ...] | None
    model: GlobalModel

    def selects(self, device_id: str) -> bool:
        return self.selected is None or device_id in self.selected


def _meta(model: GlobalModel) -> dict[str, Any]:
    meta: dict[str, Any] = {f"train.{k}": v for k, v in asdict(model.training).items()}
    meta.update({"head.in_dim": model.head.in_dim, "head.num_classes": model.head.num_classes,
                 "head.adapter_dim": model.head.adapter_dim})
    return meta


def _encode(model: GlobalModel, round_no: int, extra: dict[str, Any], sign: Signer | None) -> bytes:
    return encode_envelope(Envelope(
        kind=Kind.GLOBAL, device_id=AGGREGATOR_ID, round=round_no, model_version=model.version,
        strategy=model.training.strategy, update_id=uuid.uuid4().hex, num_examples=0, tensors=dict(model.params),
        codec=model.codec, meta={**_meta(model), **extra}), sign=sign)


def encode_global(model: GlobalModel, sign: Signer | None = None) -> bytes:
    """`sign`: `codec.signing.signer(fleet key, context(Purpose.MODEL, fleet))`, or None for an unsigned fleet."""
    return _encode(model, model.version, {}, sign)


def encode_task(task: RoundTask, sign: Signer | None = None) -> bytes:
    """`sign`: `codec.signing.signer(fleet key, context(Purpose.TASK, fleet))`, or None for an unsigned fleet."""
    selected = EVERY_DEVICE if task.selected is None else ",".join(task.selected)
    return _encode(task.model, task.round, {"round": task.round, "deadline": task.deadline, "selected": selected},
                   sign)


_DEFAULTS = TrainingConfig()


def _typed(name: str, value: object) -> Any:
    """A meta value of the type the training field has (an int may stand for a float, not a bool)."""
    want = type(getattr(_DEFAULTS, name))
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if not ok and want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise TypeError(f"train.{name} is {value!r}, expected {want.__name__}")
    return value


def decode_global(env: Envelope) -> GlobalModel:
    """The global model an envelope of kind GLOBAL carries; FleetMessageError if it is not one."""
    if env.kind is not Kind.GLOBAL:
        raise FleetMessageError(f"expected a GLOBAL envelope, got kind {env.kind.name} from {env.device_id!r}")
    meta = env.meta
    try:
        training = TrainingConfig(**{f.name: _typed(f.name, meta[f"train.{f.name}"]) for f in fields(TrainingConfig)})
        head = HeadConfig(int(meta["head.in_dim"]), int(meta["head.num_classes"]), int(meta["head.adapter_dim"]))
    except KeyError as exc:
        raise FleetMessageError(f"global model version {env.model_version} lacks the training configuration "
                                f"key {exc}") from None
    except (TypeError, ValueError) as exc:
        raise FleetMessageError(f"global model version {env.model_version}: bad training configuration: "
                                f"{exc}") from None
    return GlobalModel(env.model_version, training, head, dict(env.tensors))


def decode_task(env: Envelope) -> RoundTask:
    """The round task an envelope carries; FleetMessageError if it is a bare model or malformed."""
    model = decode_global(env)
    meta = env.meta
    try:
        round_no, deadline, selected = int(meta["round"]), float(meta["deadline"]), str(meta["selected"])
    except KeyError as exc:
        raise FleetMessageError(f"round task {env.round} lacks {exc}") from None
    except (TypeError, ValueError) as exc:
        raise FleetMessageError(f"round task {env.round}: {exc}") from None
    ids = None if selected == EVERY_DEVICE else tuple(s for s in selected.split(",") if s)
    return RoundTask(round_no, deadline, ids, model)
