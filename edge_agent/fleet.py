"""The fleet's messages as types: a global model, a round task, and their envelopes.

The aggregator's training configuration is the one source of truth: it travels as envelope meta in
every global model and round task, and each device rebuilds the same strategy from it. The envelope's
wire format is unchanged (codec/envelope.py); this module is the only place that reads or writes the
meta keys, so no service picks values out of an untyped dict. A signed fleet passes the signer in; the
signature itself is codec/signing.py's business.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from .codec.compression import CodecSpec
from .codec.envelope import AGGREGATOR_ID, Envelope, Kind, encode_envelope
from .learning.head import HeadConfig
from .learning.strategies import ServerState, Strategy, make_strategy
from .learning.training import TrainingConfig

Signer = Callable[[bytes], bytes]  # the envelope bytes to sign -> the signature (codec.signing.signer)
EVERY_DEVICE = "*"  # `selected` of a round that takes every device online when it opened
BOUNDS_PREFIX = "agg."  # meta keys of what bounds an update this round (learning/robust.py); devices may ignore them
MAX_ABS_KEY = "limits.max_abs"  # optional meta: older aggregators do not send it, devices then use the default


class FleetMessageError(ValueError):
    """An envelope that is intact but is not a valid global model or round task."""


@dataclass(frozen=True)
class GlobalModel:
    """A version of the global (shared) tensors and the training configuration that produced it."""

    version: int
    training: TrainingConfig
    head: HeadConfig
    params: Mapping[str, np.ndarray]
    max_abs: float | None = None  # the bound on |weight| a device enforces (learning/validate.py); None: default

    def strategy(self) -> Strategy:
        return make_strategy(self.training.strategy, self.head, self.training.strategy_config())

    def server(self) -> ServerState:
        return ServerState(self.version, dict(self.params))

    @property
    def codec(self) -> str:
        """The envelope codec of a legacy update (no `training.codec`): int8 or float32 whole tensors."""
        return "int8" if self.training.int8_updates else "float32"

    @property
    def model_codec(self) -> str:
        """The envelope codec of this model as a whole: float32 when versions go down as deltas (a device must
        hold exactly what the aggregator holds, to apply the next delta), else the updates' envelope codec."""
        return "float32" if self.training.downlink_codec else self.codec

    @property
    def downlink_codec(self) -> CodecSpec | None:
        """The codec each new version goes down in, as a delta (codec/downlink.py), or None: whole models."""
        return CodecSpec.parse(self.training.downlink_codec) if self.training.downlink_codec else None

    def with_params(self, params: Mapping[str, np.ndarray]) -> GlobalModel:
        return replace(self, params=dict(params))

    @property
    def update_codec(self) -> CodecSpec | None:
        """The lossy codec updates use (a compact update frame of the change, with error feedback), or None."""
        return CodecSpec.parse(self.training.codec) if self.training.codec else None


def update_base(params: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """What a compressed update (a compact update frame) is the change from, tensor by tensor: the global model's
    tensor of that name and shape, or zeros for what the global model does not hold (class statistics, which are
    sent whole). The device and the aggregator both call this on the same global version."""
    out = {}
    for name, shape in shapes.items():
        base = params.get(name)
        out[name] = (np.asarray(base, np.float32) if base is not None and tuple(np.shape(base)) == tuple(shape)
                     else np.zeros(shape, np.float32))
    return out


SELECTION_RULE_PREFIX = "hash1:"  # `selected` of a sampled round: "hash1:<salt hex>:<threshold>"


def selection_key(salt: bytes, device_id: str) -> int:
    """A device's place in a round's draw: a keyed 64-bit hash, the same on every device and the aggregator."""
    return int.from_bytes(hashlib.blake2b(device_id.encode(), key=salt, digest_size=8).digest(), "big")


@dataclass(frozen=True)
class SelectionRule:
    """A sampled round's selection in constant size: device d takes part iff selection_key(salt, d) <= threshold.

    The aggregator picks the threshold so that exactly the devices it expects are below it (the k smallest
    keys of the online devices), so the task stays a few dozen bytes whatever the fleet's size."""

    salt: bytes
    threshold: int

    def selects(self, device_id: str) -> bool:
        return selection_key(self.salt, device_id) <= self.threshold

    def encode(self) -> str:
        return f"{SELECTION_RULE_PREFIX}{self.salt.hex()}:{self.threshold:d}"

    @classmethod
    def decode(cls, text: str) -> SelectionRule:
        """The rule `encode` wrote; ValueError if `text` is not one."""
        salt_hex, sep, threshold = text.removeprefix(SELECTION_RULE_PREFIX).partition(":")
        salt, value = bytes.fromhex(salt_hex), int(threshold)
        if not text.startswith(SELECTION_RULE_PREFIX) or not sep or not 1 <= len(salt) <= 64 or not 0 <= value < 2**64:
            raise ValueError(f"not a selection rule: {text[:80]!r}")
        return cls(salt, value)


UPLOAD_WINDOW_KEY = "upload_window_s"  # optional meta: absent (older aggregators, or no spread) means 0
RETRY_AFTER_KEY = "retry_after_s"  # optional meta: absent means devices pace resends by their own config alone
# With a downlink codec, a task carries no tensors: the digest of the model to train from (codec.downlink.model_digest),
# which a device holds by applying the deltas, and how many versions' deltas the aggregator keeps retained.
DIGEST_KEY = "model.digest"
DOWNLINK_KEEP_KEY = "downlink.keep"
_DIGEST = re.compile(r"[0-9a-f]{32}")


def upload_delay(window_s: float, device_id: str, round_no: int) -> float:
    """How long `device_id` waits before its first upload of round `round_no`: uniform in [0, window_s), drawn
    from a hash of (device, round), so the fleet's uploads spread over the window and a test can predict each."""
    if window_s <= 0:
        return 0.0
    digest = hashlib.blake2b(f"{device_id}/{round_no}".encode(), digest_size=8, person=b"edgefl-upload").digest()
    return window_s * (int.from_bytes(digest, "big") / 2**64)


@dataclass(frozen=True)
class RoundTask:
    """Round `round`: train from `model`, upload before `deadline` (unix seconds); `selected` is None when
    every device online at the round's start takes part, or when `rule` says who does (a sampled round)."""

    round: int
    deadline: float
    selected: tuple[str, ...] | None
    model: GlobalModel
    # What the aggregator allows an update this round (rule, max_examples, norm_bound, ...): announced, so a
    # device knows its update is clipped; nothing a device needs to train.
    bounds: Mapping[str, str | int | float] = field(default_factory=dict)
    rule: SelectionRule | None = None  # a sampled round's selection, in constant size (`selected` is then None)
    quorum: int | None = None  # the round closes once this many selected devices reported (None: not announced)
    # Devices spread their first upload over this many seconds after the task (upload_delay): thousands of devices
    # must not reach the broker's queues in one burst. 0: every device uploads as soon as it trained.
    upload_window_s: float = 0.0
    # When devices should come back with an update the aggregator has not confirmed: not before this many seconds
    # after a send, each device at its own point of [retry_after_s, 2 * retry_after_s) (`retry_delay`), so the
    # resends of a round that overran the broker do not return as one burst either. 0: the device's own timeout.
    retry_after_s: float = 0.0
    # With a downlink codec (model.training.downlink_codec): `model` holds no tensors; the device trains from the
    # version it holds once its digest is this (codec/downlink.py), and resyncs from model/current when it is
    # more than `downlink_keep` versions behind.
    model_digest: str | None = None
    downlink_keep: int = 0

    def selects(self, device_id: str) -> bool:
        if self.rule is not None:
            return self.rule.selects(device_id)
        return self.selected is None or device_id in self.selected

    def upload_delay(self, device_id: str) -> float:
        return upload_delay(self.upload_window_s, device_id, self.round)

    def retry_delay(self, device_id: str) -> float:
        """The least wait before `device_id` sends an unconfirmed update of this round again (0: no steer)."""
        if self.retry_after_s <= 0:
            return 0.0
        return self.retry_after_s + upload_delay(self.retry_after_s, device_id, -self.round)  # another draw


CONFIG_DIGEST_KEY = "train.digest"


def training_digest(training: TrainingConfig) -> str:
    """16 hex digits naming a training configuration: both sides compute it over every field."""
    text = json.dumps(asdict(training), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _meta(model: GlobalModel) -> dict[str, Any]:
    config = asdict(model.training)
    if model.training.downlink_codec:
        # A fleet paying for its downlink: only what differs from the defaults (the whole list was half of every
        # task), with the digest of the whole, so a device whose defaults differ (another edge-fl release) finds
        # out instead of training with other settings.
        config = {k: v for k, v in config.items() if v != getattr(_DEFAULTS, k)}
        config["digest"] = training_digest(model.training)
    meta: dict[str, Any] = {f"train.{k}": v for k, v in config.items()}
    meta.update({"head.in_dim": model.head.in_dim, "head.num_classes": model.head.num_classes,
                 "head.adapter_dim": model.head.adapter_dim})
    if model.max_abs is not None:
        meta[MAX_ABS_KEY] = float(model.max_abs)
    return meta


def _encode(model: GlobalModel, round_no: int, extra: dict[str, Any], sign: Signer | None, *,
            tensors: bool = True) -> bytes:
    return encode_envelope(Envelope(
        kind=Kind.GLOBAL, device_id=AGGREGATOR_ID, round=round_no, model_version=model.version,
        strategy=model.training.strategy, update_id=uuid.uuid4().hex, num_examples=0,
        tensors=dict(model.params) if tensors else {}, codec=model.model_codec, meta={**_meta(model), **extra}),
        sign=sign)


def encode_global(model: GlobalModel, sign: Signer | None = None) -> bytes:
    """`sign`: `codec.signing.signer(fleet key, context(Purpose.MODEL, fleet))`, or None for an unsigned fleet."""
    return _encode(model, model.version, {}, sign)


def encode_task(task: RoundTask, sign: Signer | None = None) -> bytes:
    """`sign`: `codec.signing.signer(fleet key, context(Purpose.TASK, fleet))`, or None for an unsigned fleet."""
    # An explicit list is still read (older aggregators send one), but it grows with the fleet and the envelope's
    # meta strings are limited: a sampled round goes out as its constant-size rule.
    if task.rule is not None:
        selected = task.rule.encode()
    else:
        selected = EVERY_DEVICE if task.selected is None else ",".join(task.selected)
    bounds = {BOUNDS_PREFIX + k: v for k, v in task.bounds.items()}
    if task.quorum is not None:
        bounds["quorum"] = task.quorum
    if task.upload_window_s > 0:  # absent when 0: a task without a window reads the same to every device
        bounds[UPLOAD_WINDOW_KEY] = float(task.upload_window_s)
    if task.retry_after_s > 0:
        bounds[RETRY_AFTER_KEY] = float(task.retry_after_s)
    whole = task.model.downlink_codec is None
    if not whole:  # the device holds the model already, or gets it from the deltas: the task names it only
        if task.model_digest is None or not _DIGEST.fullmatch(task.model_digest):
            raise ValueError(f"a task of a fleet with a downlink codec needs the model's digest, not "
                             f"{task.model_digest!r}")
        bounds[DIGEST_KEY] = task.model_digest
        bounds[DOWNLINK_KEEP_KEY] = int(task.downlink_keep)
    return _encode(task.model, task.round, {"round": task.round, "deadline": task.deadline, "selected": selected,
                                            **bounds}, sign, tensors=whole)


_DEFAULTS = TrainingConfig()
# Training fields added after the first release: a task from an older aggregator lacks them (their defaults hold).
_OPTIONAL_TRAINING = frozenset({"codec", "downlink_codec"})


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
    digest = meta.get(CONFIG_DIGEST_KEY)
    try:
        training = TrainingConfig(**{f.name: _typed(f.name, meta[f"train.{f.name}"]) for f in fields(TrainingConfig)
                                     if (f.name not in _OPTIONAL_TRAINING and digest is None)
                                     or f"train.{f.name}" in meta})
        for codec in (training.codec, training.downlink_codec):
            if codec:
                CodecSpec.parse(codec)  # a codec this build does not know: refused here, said clearly
        head = HeadConfig(int(meta["head.in_dim"]), int(meta["head.num_classes"]), int(meta["head.adapter_dim"]))
    except KeyError as exc:
        raise FleetMessageError(f"global model version {env.model_version} lacks the training configuration "
                                f"key {exc}") from None
    except (TypeError, ValueError) as exc:
        raise FleetMessageError(f"global model version {env.model_version}: bad training configuration: "
                                f"{exc}") from None
    if digest is not None and digest != training_digest(training):
        raise FleetMessageError(f"global model version {env.model_version}: the training configuration sent as its "
                                f"differences from the defaults does not match its digest {digest!r:.40}: this "
                                f"device's defaults differ from the aggregator's (another edge-fl release); install "
                                f"the aggregator's release on the device")
    max_abs = meta.get(MAX_ABS_KEY)
    if max_abs is not None and (isinstance(max_abs, bool) or not isinstance(max_abs, (int, float))):
        raise FleetMessageError(f"global model version {env.model_version}: {MAX_ABS_KEY} is {max_abs!r}, "
                                f"expected a number")
    return GlobalModel(env.model_version, training, head, dict(env.tensors),
                       None if max_abs is None else float(max_abs))


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
    rule = None
    if selected.startswith(SELECTION_RULE_PREFIX):
        try:
            rule = SelectionRule.decode(selected)
        except ValueError as exc:
            raise FleetMessageError(f"round task {env.round}: {exc}") from None
    ids = None if selected == EVERY_DEVICE or rule is not None else tuple(s for s in selected.split(",") if s)
    bounds = {k[len(BOUNDS_PREFIX):]: v for k, v in meta.items()
              if k.startswith(BOUNDS_PREFIX) and isinstance(v, (str, int, float))}
    quorum = meta.get("quorum")
    window, retry = (meta.get(key, 0.0) for key in (UPLOAD_WINDOW_KEY, RETRY_AFTER_KEY))
    for key, value in ((UPLOAD_WINDOW_KEY, window), (RETRY_AFTER_KEY, retry)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise FleetMessageError(f"round task {env.round}: {key} is {value!r:.40}, expected a number of "
                                    f"seconds >= 0")
    digest, keep = None, 0
    if model.downlink_codec is not None:
        digest, keep = _downlink_fields(meta, env.round)
    return RoundTask(round_no, deadline, ids, model, bounds, rule,
                     quorum if isinstance(quorum, int) and not isinstance(quorum, bool) else None, float(window),
                     float(retry), digest, keep)


def _downlink_fields(meta: Mapping[str, Any], round_no: int) -> tuple[str, int]:
    """(model digest, versions kept) of a task whose model goes down as deltas."""
    digest, keep = meta.get(DIGEST_KEY), meta.get(DOWNLINK_KEEP_KEY, 0)
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise FleetMessageError(f"round task {round_no}: {DIGEST_KEY} is {digest!r:.40}, expected 32 hex digits")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise FleetMessageError(f"round task {round_no}: {DOWNLINK_KEEP_KEY} is {keep!r:.40}, expected a number "
                                f"of versions >= 0")
    return digest, keep
