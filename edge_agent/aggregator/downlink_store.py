"""Where the aggregator keeps its downlink state (codec/downlink.py): in the store's meta, written in the
transaction that closes the round, so a crash, a restart or another coordinator finds the residual and the
retained deltas of exactly the versions the store holds.

- `downlink.residual`: "<version>:<base64 of the arrays>", the error feedback left after that version; it only
  applies to a delta from that version (a recovered or restarted model starts with none).
- `downlink.frame.<version mod keep>`: the base64 delta frame that gives that version, `keep` slots in turn.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping

import numpy as np

from ..codec.downlink import frame_versions
from ..codec.envelope import EnvelopeError
from .store import StoreError, arrays_to_bytes, bytes_to_arrays

RESIDUAL_KEY = "downlink.residual"


def frame_key(version: int, keep: int) -> str:
    return f"downlink.frame.{version % keep}"


def encode_residual(version: int, arrays: Mapping[str, np.ndarray]) -> str:
    return f"{version}:{base64.b64encode(arrays_to_bytes(arrays)).decode()}"


def decode_residual(text: str | None, version: int) -> dict[str, np.ndarray]:
    """The residual left after `version`, or none: absent, unreadable, or left after another version."""
    stored, sep, blob = (text or "").partition(":")
    if not sep or stored != str(version):
        return {}
    try:
        return bytes_to_arrays(base64.b64decode(blob, validate=True))
    except (binascii.Error, StoreError, ValueError):
        return {}


def encode_frame(frame: bytes) -> str:
    return base64.b64encode(frame).decode()


def kept_frames(read_meta: Callable[[str], str | None], version: int, keep: int) -> dict[int, bytes]:
    """The delta frames of versions version-keep+1 .. version that the store holds, by version."""
    out = {}
    for v in range(max(1, version - keep + 1), version + 1):
        text = read_meta(frame_key(v, keep))
        if not text:
            continue
        try:
            frame = base64.b64decode(text, validate=True)
            if frame_versions(frame)[0] == v:  # a slot holds the latest version that maps to it
                out[v] = frame
        except (binascii.Error, EnvelopeError):
            continue
    return out
