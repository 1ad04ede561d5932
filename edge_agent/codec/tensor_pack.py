"""An explicit, versioned byte format for a dict of named tensors, with optional int8 compression.

Layout: b"EFLT" | u8 version | u32 header length | JSON header | raw little-endian tensor bytes.
The header lists name, encoding, dtype, shape and byte range of every tensor. Matrices can be sent
as int8 with one float32 scale per output column ("int8-per-channel"): 4x smaller than float32 and,
for a personalization head, no loss of accuracy (see tests).

The tensor specs and their body are built and checked by `encode_tensors` / `decode_tensors`, the ONE
implementation shared by this pack and by the update envelope (`envelope.py`), so both formats accept
and refuse exactly the same tensors.

Tensor spec rules (checked on decode, produced by encode):

- encodings: "raw" (float32, int8 or int32, any shape up to `MAX_NDIM` dims), "int8-per-channel" (an int8
  matrix) followed by its companion "<name>#scale" with encoding "scale" (float32, one per column);
- names: 1..`MAX_NAME` printable characters, unique, and "#" only in the "#scale" suffix of a companion;
- byte ranges: contiguous, in header order, starting at 0 and ending exactly at the end of the body.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..learning.quant import MIN_SCALE, QMAX, QuantizedTensor, quantize_per_channel

MAGIC = b"EFLT"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")
_DTYPES = {"float32": "<f4", "int8": "i1", "int32": "<i4"}
MAX_HEADER = 1 << 20
MAX_NDIM = 8  # heads are at most 2-D; the cap keeps numpy's own dimension limit out of reach of a sender
MAX_NAME = 128
SCALE_SUFFIX = "#scale"
RAW, INT8, SCALE = "raw", "int8-per-channel", "scale"
ENCODINGS = (RAW, INT8, SCALE)


class CodecError(ValueError):
    """Bytes that are not a valid tensor pack; the message says what is wrong and where."""


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in a body and how to read it."""

    name: str
    encoding: str  # one of ENCODINGS
    dtype: str  # one of "float32", "int8", "int32" (always little-endian on the wire)
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict[str, object]:
        # Key order is part of the tensor pack's bytes (its header is not key-sorted): keep it.
        return {"name": self.name, "encoding": self.encoding, "dtype": self.dtype, "shape": list(self.shape),
                "offset": self.offset, "nbytes": self.nbytes}

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true must not pass for 1


def _name_problem(name: str, *, companion: bool = False) -> str | None:
    """Why `name` cannot be a tensor name, or None. "#" is reserved for the "#scale" companions."""
    if not 1 <= len(name) <= MAX_NAME:
        return f"must be 1..{MAX_NAME} characters (has {len(name)})"
    if not name.isprintable():  # control characters and lone surrogates (unencodable) alike
        return "has non-printable characters"
    base = name[:-len(SCALE_SUFFIX)] if companion and name.endswith(SCALE_SUFFIX) else name
    if "#" in base or not base:
        return f"may contain '#' only in the {SCALE_SUFFIX!r} suffix of a scale companion"
    return None


def parse_specs(entries: object, *, max_specs: int | None = None) -> list[TensorSpec]:
    """Check the types of a JSON `tensors` list and turn it into specs (no range checks yet)."""
    if not isinstance(entries, list):
        raise CodecError(f"'tensors' must be a list of tensor specs, not {type(entries).__name__}")
    if max_specs is not None and len(entries) > max_specs:
        raise CodecError(f"too many tensors: the header lists {len(entries)} tensor specs, at most {max_specs} allowed")
    specs = []
    keys = {"name", "encoding", "dtype", "shape", "offset", "nbytes"}
    for i, e in enumerate(entries):
        where = f"tensors[{i}]"
        if not isinstance(e, dict):
            raise CodecError(f"{where}: a tensor spec must be an object, not {type(e).__name__}")
        if set(e) != keys:
            missing, extra = sorted(keys - set(e)), sorted(set(e) - keys)
            raise CodecError(f"{where}: tensor spec fields wrong (missing {missing}, unknown {extra})")
        name, encoding, dtype, shape = e["name"], e["encoding"], e["dtype"], e["shape"]
        if not isinstance(name, str):
            raise CodecError(f"{where}: 'name' must be a string, not {type(name).__name__}")
        where = f"{where} {name[:MAX_NAME]!r}"
        if not isinstance(encoding, str) or encoding not in ENCODINGS:
            raise CodecError(f"{where}: unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CodecError(f"{where}: unsupported dtype {dtype!r} (float32, int8, int32 only)")
        if not isinstance(shape, list) or not all(_is_int(s) for s in shape):
            raise CodecError(f"{where}: 'shape' must be a list of integers, got {shape!r:.80}")
        if len(shape) > MAX_NDIM:
            raise CodecError(f"{where}: {len(shape)} dimensions, at most {MAX_NDIM} allowed")
        if any(s < 0 for s in shape):
            raise CodecError(f"{where}: negative dimension in shape {shape}")
        for field in ("offset", "nbytes"):
            v = e[field]
            if not _is_int(v) or v < 0:
                raise CodecError(f"{where}: {field!r} must be a non-negative integer, got {v!r:.40}")
        specs.append(TensorSpec(name, encoding, dtype, tuple(shape), e["offset"], e["nbytes"]))
    return specs


def encode_tensors(tensors: Mapping[str, np.ndarray], *, int8: bool,
                   require_finite: bool = False) -> tuple[list[TensorSpec], bytes]:
    """Lay out `tensors` (sorted by name) as specs + one body; with `int8`, every 2-D float matrix
    becomes int8 per output channel followed by its "<name>#scale" companion.

    float64 is sent as float32. `require_finite` refuses NaN/inf, and int8 matrices whose largest
    dequantized value would overflow float32, so the receiver's finiteness check cannot fail on them.
    Raises CodecError (a ValueError) on anything that cannot be sent.
    """
    specs: list[TensorSpec] = []
    blobs: list[bytes] = []
    offset = 0

    def add(name: str, encoding: str, arr: np.ndarray) -> None:
        nonlocal offset
        dtype = str(arr.dtype)
        if dtype not in _DTYPES:
            raise CodecError(f"tensor {name!r}: dtype {dtype} cannot be sent (float32, int8, int32 only)")
        if arr.ndim > MAX_NDIM:
            raise CodecError(f"tensor {name!r}: {arr.ndim} dimensions, at most {MAX_NDIM} can be sent")
        raw = np.ascontiguousarray(arr, dtype=_DTYPES[dtype]).tobytes()
        specs.append(TensorSpec(name, encoding, dtype, tuple(int(s) for s in arr.shape), offset, len(raw)))
        blobs.append(raw)
        offset += len(raw)

    for name in sorted(tensors):
        if not isinstance(name, str) or (problem := _name_problem(name)) is not None:
            raise CodecError(f"tensor name {name!r} {problem or 'must be a string'}")
        arr = np.asarray(tensors[name])
        if arr.dtype == np.float64:
            with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, caught next
                arr = arr.astype(np.float32)
        if require_finite and arr.dtype == np.float32 and not np.all(np.isfinite(arr)):
            raise CodecError(f"tensor {name!r}: contains NaN or inf")
        if int8 and arr.ndim == 2 and arr.dtype == np.float32:
            if arr.size:
                qt = quantize_per_channel(arr, axis=-1)
            else:  # nothing to quantize (numpy has no max of an empty column): smallest scales
                qt = QuantizedTensor(np.zeros(arr.shape, np.int8), np.full(arr.shape[1], MIN_SCALE, np.float32), 1)
            with np.errstate(over="ignore"):  # the largest dequantized value, q = QMAX, must stay finite
                overflow = require_finite and not np.all(np.isfinite(qt.scale * np.float32(QMAX)))
            if overflow:
                raise CodecError(f"tensor {name!r}: values too close to float32's limit to quantize to int8")
            add(name, INT8, qt.q)
            add(name + SCALE_SUFFIX, SCALE, qt.scale)
        else:
            add(name, RAW, arr)
    return specs, b"".join(blobs)


def decode_tensors(specs: Sequence[TensorSpec], body: bytes | memoryview, *, require_finite: bool = False,
                   max_tensors: int | None = None, max_elements: int | None = None) -> dict[str, np.ndarray]:
    """Inverse of `encode_tensors`: check every spec against the body, then read (and dequantize) them.

    Returned arrays are native-endian copies, never views of `body`. Limits: `max_tensors` counts
    tensors (a scale companion is part of its matrix), `max_elements` the elements of all specs together;
    both are checked before any array is built. `require_finite` refuses NaN/inf in float tensors
    (after dequantization). Raises CodecError naming the tensor and what is wrong with it.
    """
    by_name: dict[str, tuple[int, TensorSpec]] = {}
    end = 0
    elements = 0
    for i, s in enumerate(specs):
        where = f"tensors[{i}] {s.name[:MAX_NAME]!r}"
        if (problem := _name_problem(s.name, companion=s.encoding == SCALE)) is not None:
            raise CodecError(f"{where}: name {problem}")
        if s.name in by_name:
            raise CodecError(f"{where}: duplicate name (also tensors[{by_name[s.name][0]}])")
        if s.encoding == INT8 and (s.dtype != "int8" or len(s.shape) != 2):
            raise CodecError(f"{where}: int8-per-channel needs a 2-D int8 matrix, got {s.dtype} of shape {s.shape}")
        if s.encoding == SCALE and (s.dtype != "float32" or len(s.shape) != 1 or not s.name.endswith(SCALE_SUFFIX)):
            raise CodecError(f"{where}: a scale must be a float32 vector named '<matrix>{SCALE_SUFFIX}', "
                             f"got {s.dtype} of shape {s.shape}")
        by_name[s.name] = (i, s)
        elements += s.size
        if max_elements is not None and elements > max_elements:
            raise CodecError(f"{where}: too many elements, {elements} so far, at most {max_elements} allowed")
        expected = np.dtype(_DTYPES[s.dtype]).itemsize * s.size
        if s.nbytes != expected:
            raise CodecError(f"{where}: byte range {s.offset}+{s.nbytes} does not match shape {s.shape} "
                             f"of {s.dtype} ({expected} bytes)")
        if s.offset < end:
            raise CodecError(f"{where}: byte range {s.offset}+{s.nbytes} overlaps the previous tensor, "
                             f"which ends at {end}")
        if s.offset > end:
            raise CodecError(f"{where}: byte range {s.offset}+{s.nbytes} leaves a gap after byte {end}")
        if s.offset + s.nbytes > len(body):
            raise CodecError(f"{where}: byte range {s.offset}+{s.nbytes} is out of range of the "
                             f"{len(body)}-byte body")
        end = s.offset + s.nbytes
    if end != len(body):
        raise CodecError(f"{len(body) - end} trailing bytes after the last tensor, which ends at byte {end} "
                         f"of the {len(body)}-byte body")
    count = sum(1 for s in specs if s.encoding != SCALE)
    if max_tensors is not None and count > max_tensors:
        raise CodecError(f"too many tensors: {count}, at most {max_tensors} allowed")

    def read(s: TensorSpec) -> np.ndarray:
        # astype copies into a native-endian array the caller owns (no view pinning the received bytes)
        raw = np.frombuffer(body, dtype=_DTYPES[s.dtype], count=s.size, offset=s.offset).reshape(s.shape)
        return raw.astype(raw.dtype.newbyteorder("="))

    out: dict[str, np.ndarray] = {}
    for i, s in enumerate(specs):
        where = f"tensors[{i}] {s.name!r}"
        if s.encoding == SCALE:
            base = by_name.get(s.name[:-len(SCALE_SUFFIX)])
            if base is None or base[1].encoding != INT8:
                raise CodecError(f"{where}: scale without an int8-per-channel matrix named "
                                 f"{s.name[:-len(SCALE_SUFFIX)]!r}")
            continue
        if s.encoding == INT8:
            companion = by_name.get(s.name + SCALE_SUFFIX)
            if companion is None or companion[1].shape != (s.shape[1],):
                raise CodecError(f"{where}: int8 data without a matching per-channel scale "
                                 f"('{s.name}{SCALE_SUFFIX}' of shape ({s.shape[1]},))")
            scale = read(companion[1])
            if require_finite and not np.all(np.isfinite(scale)):
                raise CodecError(f"{where}: its per-channel scale contains NaN or inf")
            with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
                arr = QuantizedTensor(read(s), scale, 1).dequantize()
        else:
            arr = read(s)
        if require_finite and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr.ravel()))[0])
            raise CodecError(f"{where}: contains NaN or inf (first at flat index {bad})")
        out[s.name] = arr
    return out


def pack_tensors(tensors: Mapping[str, np.ndarray], *, int8: bool = True) -> bytes:
    """Serialize tensors; with `int8`, every 2-D float matrix is sent int8 per output channel."""
    specs, body = encode_tensors(tensors, int8=int8)
    header = json.dumps({"tensors": [s.to_json() for s in specs]}, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + body


def unpack_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `pack_tensors`; int8 matrices come back dequantized to float32."""
    if len(data) < _PREFIX.size:
        raise CodecError(f"tensor pack truncated: {len(data)} bytes, the fixed prefix alone is {_PREFIX.size}")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"not a tensor pack: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"tensor pack version {version} is not supported (this build reads version {VERSION})")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(data):
        raise CodecError(f"tensor pack header length {hlen} exceeds the {len(data)} bytes received")
    try:
        header = json.loads(bytes(data[_PREFIX.size:_PREFIX.size + hlen]))
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise CodecError(f"tensor pack header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or "tensors" not in header:
        raise CodecError("tensor pack header is not a JSON object with a 'tensors' list")
    specs = parse_specs(header["tensors"])
    return decode_tensors(specs, memoryview(data)[_PREFIX.size + hlen:])
