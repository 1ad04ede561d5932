"""The global model on its way down: each version as a compressed change from the version before.

The aggregator keeps two things: the official model V (what every device holds, bit for bit, and what updates
are the change from) and a residual R (what compression has not delivered yet). When a round aggregates to A
(computed from V_{v-1}, like every update), version v is

    c   = decode(encode(A - V_{v-1} + R_{v-1}))      the delta frame, sent on the retained model/delta/<v>
    V_v = V_{v-1} + c                                what devices hold after applying it
    R_v = A + R_{v-1} - V_v                          error feedback: carried into the next version

so the official model never drifts from the aggregate by more than one version's compression error, whatever
the number of versions (the same argument as the uplink's `compression.ErrorFeedback`, which this uses).

A device applies the frame to the V_{v-1} it holds, in float32 like the aggregator, and checks the result
against the model digest the frame carries in its update-id field (`model_digest`): a device whose copy
differs, by a bug or a lost version, finds out at once and resyncs from the whole model on `model/current`.

Pure: numpy and bytes, no transport. The frame is `update_frame`'s, with round = the new version, model_version
= the version it applies to, no examples, and the seeds of the fixed sender `DOWNLINK_SENDER`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .compression import CodecSpec, ErrorFeedback
from .digest import sha256
from .envelope import EnvelopeError
from .update_frame import HEADER, MAGIC, decode_update_frame, frame_seeds, pack_update_frame

DOWNLINK_SENDER = "edgefl-downlink"  # the seed namespace of delta frames (an update frame's is its device id)
DOWNLINK_STRATEGY = "downlink"  # what a decoded delta frame names as its strategy (not in the bytes)
MAX_VERSION = 2**32 - 1  # a frame's u32 round field


class DownlinkError(ValueError):
    """A delta frame that cannot give the version it claims from the model this side holds."""


def model_digest(params: Mapping[str, np.ndarray]) -> str:
    """32 hex digits identifying a model exactly: SHA-256 of every tensor's name, shape and float32 bytes, in name
    order. Two sides agree on it iff they hold the same model bit for bit."""
    h = sha256()
    h.update(b"edge-fl/model-digest/v1")
    for name in sorted(params):
        value = np.ascontiguousarray(params[name], dtype="<f4")
        raw = name.encode()
        h.update(struct.pack("<HB", len(raw), value.ndim) + raw + struct.pack(f"<{value.ndim}I", *value.shape))
        h.update(value.tobytes())
    return bytes(h.digest()[:16]).hex()


def shapes_of(params: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in params.items()}


@dataclass(frozen=True)
class DownlinkStep:
    """What the aggregator publishes and keeps for one new version."""

    version: int
    params: dict[str, np.ndarray]  # V_v: the official model, what devices hold once they applied `frame`
    residual: dict[str, np.ndarray]  # R_v: kept by the aggregator with the version
    frame: bytes  # the delta frame from version - 1, signed when a signer was given


def compress_version(previous: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray],
                     residual: Mapping[str, np.ndarray], spec: CodecSpec, *, version: int,
                     sign: Callable[[bytes], bytes] | None = None) -> DownlinkStep | None:
    """Version `version` as a delta from `previous` (version - 1) towards `target`, the round's aggregate, with
    `residual` fed back. None when `target` holds other tensors than `previous` (another head or strategy): no
    delta means anything then, and devices take the whole model. A residual of other tensors is dropped."""
    if not 1 <= version <= MAX_VERSION:
        raise ValueError(f"version {version} is not in 1..{MAX_VERSION}")
    shapes = shapes_of(previous)
    if shapes != shapes_of(target):
        return None
    kept = {k: v for k, v in residual.items() if k in shapes and tuple(np.shape(v)) == shapes[k]}
    feedback = ErrorFeedback.from_arrays(kept)
    delta = {k: np.asarray(target[k], np.float32) - np.asarray(previous[k], np.float32) for k in shapes}
    seed_of = frame_seeds(DOWNLINK_SENDER)
    encoded, decoded = feedback.compress(delta, spec, {k: seed_of(version, "", k) for k in shapes})
    params = {k: np.asarray(previous[k], np.float32) + decoded[k] for k in shapes}
    digest = model_digest(params)
    frame = pack_update_frame(round_no=version, model_version=version - 1, update_id=digest, num_examples=0,
                              codec=spec, encoded=encoded, shapes=shapes, sign=sign)
    new_residual = feedback.to_arrays()
    return DownlinkStep(version, params, {k: new_residual.get(k, np.zeros(s, np.float32)) for k, s in shapes.items()},
                        frame)


def frame_versions(frame: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(the version a delta frame gives, the version it applies to), read from its header without checking the
    rest; EnvelopeError if it does not even have a frame's header."""
    view = memoryview(frame).cast("B")
    if view.nbytes < HEADER.size or bytes(view[:len(MAGIC)]) != MAGIC:
        raise EnvelopeError(f"not a delta frame: {view.nbytes} bytes starting {bytes(view[:4])!r}")
    fields = HEADER.unpack_from(view)
    return int(fields[6]), int(fields[7])


def apply_delta(previous: Mapping[str, np.ndarray], previous_version: int, frame: bytes | bytearray | memoryview,
                *, max_bytes: int = 1 << 20) -> tuple[int, dict[str, np.ndarray]]:
    """(the new version, its tensors): `frame` applied to `previous`, which is version `previous_version`.

    EnvelopeError for bytes that are not an intact frame for these tensors; DownlinkError when the frame applies
    to another version, or the result is not the model the aggregator holds (its digest differs)."""
    shapes = shapes_of(previous)
    decoded = decode_update_frame(frame, device_id=DOWNLINK_SENDER, strategy=DOWNLINK_STRATEGY, shapes=shapes,
                                  seed_of=frame_seeds(DOWNLINK_SENDER), max_bytes=max_bytes)
    if decoded.model_version != previous_version:
        raise DownlinkError(f"the delta to version {decoded.round} applies to version {decoded.model_version}, "
                            f"not to version {previous_version}")
    params = {k: np.asarray(previous[k], np.float32) + decoded.tensors[k] for k in shapes}
    if model_digest(params) != decoded.update_id:
        raise DownlinkError(f"version {decoded.round} rebuilt from version {previous_version} does not match the "
                            f"aggregator's (model digest {model_digest(params)}, expected {decoded.update_id})")
    return decoded.round, params
