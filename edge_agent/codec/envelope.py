"""The versioned binary envelope around every payload that carries tensors (updates and global models).

Layout (all integers little-endian)::

    offset  size  field
    ------  ----  -------------------------------------------------------------------------
         0     4  magic b"EFLE"
         4     1  format version, u8 (1)
         5     1  kind, u8 (1 UPDATE, 2 GLOBAL)
         6     4  header length H, u32
        10     4  payload length P, u32
        14     2  flags, u16: 0, or FLAG_SIGNED (0x0001); other bits are refused
        16    32  SHA-256 of bytes [0, 16) + header + payload
        48     H  header: JSON, UTF-8, sorted keys, compact separators
      48+H     P  payload: raw little-endian tensor bytes, laid out as the header's "tensors" say
    48+H+P    64  only with FLAG_SIGNED: an Ed25519 signature of a context string + bytes [0, 48+H+P)

Header keys: codec, device_id, meta, model_version, num_examples, round, strategy, tensors, update_id.
"tensors" is a list of {dtype, encoding, name, nbytes, offset, shape}, as built by
`tensor_pack.encode_tensors` (int8 matrices are followed by their "<name>#scale" float32 companion).

Decoding checks, cheapest first, so a hostile sender costs little: size cap (before hashing anything),
prefix, lengths, digest, then the header's JSON and every field, then each tensor's byte range, and
finally that no float tensor holds NaN or inf (a poisoned update must not reach aggregation). Every
failure is an `EnvelopeError` whose message says which field, offset or tensor is wrong. The digest
detects corruption in transit; it is not a signature (anyone can recompute it). The optional signature
trailer is made and checked by `codec.signing` (this module only frames it, and stays free of crypto):
`decode_envelope` accepts a signed envelope without checking the signature, so whoever requires one
checks it with `codec.signing` first.
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .digest import sha256
from .tensor_pack import CodecError, decode_tensors, encode_tensors, parse_specs

MAGIC = b"EFLE"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
PREFIX = struct.Struct("<4sBBIIH")  # magic, version, kind, header length, payload length, flags
DIGEST_SIZE = 32
FLAG_SIGNED = 0x0001  # a SIGNATURE_SIZE-byte signature trailer follows the payload
SIGNATURE_SIZE = 64  # Ed25519
FIXED_SIZE = PREFIX.size + DIGEST_SIZE  # 48: bytes before the header
AGGREGATOR_ID = "aggregator"
CODECS = ("int8", "float32")
MAX_U32 = 2**32
MAX_I64 = 2**63  # counts and meta integers must fit a signed 64-bit column (SQLite) on the aggregator
MAX_META_ITEMS = 64  # the round task's training configuration travels here (about 20 entries today)
MAX_META_STR = 8192

_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_STRATEGY = re.compile(r"[A-Za-z0-9._-]{1,32}")
_FIELDS = ("codec", "device_id", "meta", "model_version", "num_examples", "round", "strategy",
           "tensors", "update_id")

MetaValue = str | int | float | bool


class EnvelopeError(CodecError):
    """Bytes that are not a valid envelope: the one error `decode_envelope` raises."""


class Kind(enum.IntEnum):
    UPDATE = 1  # device -> aggregator: shared tensors of one round
    GLOBAL = 2  # aggregator -> devices: the global (shared) tensors of a model version


_KINDS = ", ".join(f"{k.value} {k.name}" for k in Kind)


@dataclass(frozen=True)
class Envelope:
    kind: Kind
    device_id: str  # sender; "aggregator" for GLOBAL (and only then). 1..64 chars of [A-Za-z0-9._-]
    round: int  # 0 <= round < 2**32
    model_version: int  # GLOBAL: its version; UPDATE: the global version trained from. 0 <= v < 2**32
    strategy: str  # e.g. "ditto"; 1..32 chars of [A-Za-z0-9._-]
    update_id: str  # unique id (e.g. uuid4().hex) for idempotent ingest; 1..64 chars of [A-Za-z0-9._-]
    num_examples: int  # aggregation weight, 0 <= n < 2**63
    tensors: Mapping[str, np.ndarray]
    codec: str = "int8"  # "int8" (2-D float matrices int8 per output channel, the rest as is) or "float32"
    meta: Mapping[str, MetaValue] = field(default_factory=dict)  # <= 64 JSON scalars, keys like device_id


def _digest(prefix: bytes | memoryview, header: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    h = sha256()
    for part in (prefix, header, payload):
        h.update(part)
    return bytes(h.digest())


def _check_header(h: Mapping[str, object], kind: Kind, fail: type[ValueError]) -> None:
    """The header rules, shared by encode (fail=ValueError) and decode (fail=EnvelopeError)."""
    missing, unknown = sorted(set(_FIELDS) - set(h)), sorted(set(h) - set(_FIELDS))
    if missing:
        raise fail(f"header is missing field(s) {', '.join(missing)}")
    if unknown:  # strict: a new field needs a new format version, so old readers say so instead of guessing
        names = ", ".join(k[:40] for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")  # a bounded message
        raise fail(f"header has unknown field(s) {names} (format version {VERSION} has {', '.join(_FIELDS)})")
    for name, pattern in (("device_id", _ID), ("strategy", _STRATEGY), ("update_id", _ID)):
        v = h[name]
        if not isinstance(v, str) or not pattern.fullmatch(v):
            raise fail(f"header field {name} = {v!r:.80} is invalid: must be {pattern.pattern}")
    if kind is Kind.GLOBAL and h["device_id"] != AGGREGATOR_ID:
        raise fail(f"header field device_id = {h['device_id']!r}: a GLOBAL envelope comes from {AGGREGATOR_ID!r}")
    if kind is Kind.UPDATE and h["device_id"] == AGGREGATOR_ID:  # reserved, so no device can pose as it
        raise fail(f"header field device_id: {AGGREGATOR_ID!r} is reserved for GLOBAL envelopes")
    for name, limit in (("round", MAX_U32), ("model_version", MAX_U32), ("num_examples", MAX_I64)):
        v = h[name]
        if isinstance(v, bool) or not isinstance(v, int):  # JSON true must not pass for 1
            raise fail(f"header field {name} must be an integer, not {type(v).__name__} {v!r:.40}")
        if not 0 <= v < limit:
            raise fail(f"header field {name} = {v} is out of range (0 <= {name} < {limit})")
    if h["codec"] not in CODECS:
        raise fail(f"header field codec = {h['codec']!r:.40} is unknown (known: {', '.join(CODECS)})")
    meta = h["meta"]
    if not isinstance(meta, Mapping):
        raise fail(f"header field meta must be an object, not {type(meta).__name__}")
    if len(meta) > MAX_META_ITEMS:
        raise fail(f"header field meta has {len(meta)} entries, at most {MAX_META_ITEMS} allowed")
    for k, v in meta.items():
        if not isinstance(k, str) or not _ID.fullmatch(k):
            raise fail(f"meta key {k!r:.80} is invalid: must be {_ID.pattern}")
        if isinstance(v, str):
            if len(v) > MAX_META_STR or not v.isprintable():
                raise fail(f"meta[{k!r}]: strings must be printable and at most {MAX_META_STR} characters")
        elif isinstance(v, bool):
            pass
        elif isinstance(v, int):
            if not -MAX_I64 <= v < MAX_I64:
                raise fail(f"meta[{k!r}] = {v} does not fit a signed 64-bit integer")
        elif isinstance(v, float):
            if not math.isfinite(v):  # JSON has no NaN/inf; "1e999" would parse to inf
                raise fail(f"meta[{k!r}] = {v} is not finite")
        else:
            raise fail(f"meta[{k!r}] must be a string, integer, float or bool, not {type(v).__name__}")


def encode_envelope(env: Envelope, *, sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """Serialize `env`; raises ValueError for anything `decode_envelope` would refuse.

    With `sign` (see `codec.signing.signer`), the envelope is flagged FLAG_SIGNED and `sign(bytes before the
    trailer)` is appended: the signature covers the prefix (flags included), digest, header and payload."""
    try:
        kind = Kind(env.kind)
    except ValueError:
        raise ValueError(f"unknown kind {env.kind!r} (known: {_KINDS})") from None
    if not isinstance(env.tensors, Mapping) or not isinstance(env.meta, Mapping):
        raise ValueError("tensors and meta must be mappings")
    header: dict[str, object] = {
        "codec": env.codec, "device_id": env.device_id, "meta": dict(env.meta), "model_version": env.model_version,
        "num_examples": env.num_examples, "round": env.round, "strategy": env.strategy, "update_id": env.update_id,
    }
    _check_header({**header, "tensors": []}, kind, ValueError)
    try:
        specs, payload = encode_tensors(env.tensors, int8=env.codec == "int8", require_finite=True)
    except CodecError as exc:
        raise ValueError(str(exc)) from None  # bad input, not bad bytes: not an EnvelopeError
    header["tensors"] = [s.to_json() for s in specs]
    hbytes = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    total = FIXED_SIZE + len(hbytes) + len(payload)
    if total >= MAX_U32:
        raise ValueError(f"envelope of {total} bytes does not fit the format's u32 lengths")
    prefix = PREFIX.pack(MAGIC, VERSION, kind, len(hbytes), len(payload), 0 if sign is None else FLAG_SIGNED)
    body = prefix + _digest(prefix, hbytes, payload) + hbytes + payload
    if sign is None:
        return body
    signature = sign(body)
    if len(signature) != SIGNATURE_SIZE:
        raise ValueError(f"the signer returned {len(signature)} bytes, a signature has {SIGNATURE_SIZE}")
    return body + signature


def signed_parts(data: bytes | bytearray | memoryview) -> tuple[memoryview, bytes | None]:
    """(the bytes a signature covers, the signature) of an envelope, or (all of it, None) when it is not
    signed. Only the fixed prefix is checked (magic, flags, lengths): cheap enough to run before anything
    else on a hostile input; `decode_envelope` checks the rest."""
    view = memoryview(data).cast("B")
    if view.nbytes < FIXED_SIZE:
        raise EnvelopeError(f"envelope truncated: {view.nbytes} bytes, expected at least {FIXED_SIZE}")
    magic, _version, _kind, hlen, plen, flags = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise EnvelopeError(f"not an envelope: magic {bytes(magic)!r} at offset 0, expected {MAGIC!r}")
    if flags & ~FLAG_SIGNED:
        raise EnvelopeError(f"flags 0x{flags:04x} at offset 14 are not supported (known: 0x{FLAG_SIGNED:04x} signed)")
    if not flags & FLAG_SIGNED:
        return view, None
    end = FIXED_SIZE + hlen + plen
    if view.nbytes != end + SIGNATURE_SIZE:
        raise EnvelopeError(f"signed envelope of {view.nbytes} bytes: header length {hlen} + payload length {plen} "
                            f"+ {FIXED_SIZE} + a {SIGNATURE_SIZE}-byte signature = {end + SIGNATURE_SIZE} expected")
    return view[:end], bytes(view[end:])


def digest_matches(body: bytes | bytearray | memoryview) -> bool:
    """Does the SHA-256 at offset 16 match the rest of `body` (an envelope without its signature trailer)?
    Tells a damaged envelope from an intact one signed with another key."""
    view = memoryview(body).cast("B")
    if view.nbytes < FIXED_SIZE:
        return False
    _magic, _version, _kind, hlen, plen, _flags = PREFIX.unpack_from(view)
    if view.nbytes != FIXED_SIZE + hlen + plen:
        return False
    return _digest(view[:PREFIX.size], view[FIXED_SIZE:FIXED_SIZE + hlen], view[FIXED_SIZE + hlen:]) == bytes(
        view[PREFIX.size:FIXED_SIZE])


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # {"round": 1, "round": 2} would otherwise mean whatever the last one says: refuse the ambiguity
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise EnvelopeError(f"header JSON repeats the key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> object:
    raise EnvelopeError(f"header JSON contains {name}, which is not JSON")


def read_header(data: bytes) -> dict[str, Any]:
    """The header of an envelope this process already trusts (its own traffic, an observer's copy), without
    verifying the digest or decoding the tensors; EnvelopeError if it is not even shaped like one. Anything
    received from a device goes through `decode_envelope`."""
    if len(data) < FIXED_SIZE:
        raise EnvelopeError(f"envelope truncated: {len(data)} bytes, expected at least {FIXED_SIZE}")
    magic, _version, _kind, hlen, _plen, _flags = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError(f"not an envelope: magic {magic!r} at offset 0, expected {MAGIC!r}")
    try:
        header = json.loads(bytes(data[FIXED_SIZE:FIXED_SIZE + hlen]))
    except ValueError as exc:
        raise EnvelopeError(f"envelope header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise EnvelopeError("envelope header is not a JSON object")
    return header


def decode_envelope(data: bytes | bytearray | memoryview, *, max_bytes: int = 1 << 20, max_tensors: int = 64,
                    max_elements: int = 1 << 22) -> Envelope:
    """Parse and fully check an envelope; raises EnvelopeError, and only that, for any bad input.

    `max_bytes` is checked before anything else (no hashing of an oversized message); `max_tensors` counts
    tensors (an int8 matrix's scale is part of it); `max_elements` bounds all elements together.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EnvelopeError(f"an envelope is bytes, not {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise EnvelopeError(f"envelope oversized: {size} bytes, at most {max_bytes} accepted")
    buf = bytes(data)
    if size < FIXED_SIZE:
        raise EnvelopeError(f"envelope truncated: {size} bytes, expected at least {FIXED_SIZE} "
                            f"(the fixed prefix and digest)")
    magic, version, kind_code, hlen, plen, flags = PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise EnvelopeError(f"not an envelope: magic {magic!r} at offset 0, expected {MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        raise EnvelopeError(f"envelope format version {version} (offset 4) is not supported; "
                            f"this build reads version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}")
    try:
        kind = Kind(kind_code)
    except ValueError:
        raise EnvelopeError(f"unknown kind {kind_code} at offset 5 (known: {_KINDS})") from None
    if flags & ~FLAG_SIGNED:
        raise EnvelopeError(f"flags 0x{flags:04x} at offset 14 are not supported by format version {VERSION} "
                            f"(known: 0x{FLAG_SIGNED:04x} signed)")
    trailer = SIGNATURE_SIZE if flags & FLAG_SIGNED else 0  # checked by codec.signing, not here
    expected = FIXED_SIZE + hlen + plen + trailer
    if expected > size:
        raise EnvelopeError(f"envelope truncated: header length {hlen} + payload length {plen} + {FIXED_SIZE} "
                            f"+ signature {trailer} = {expected} bytes expected, {size} received")
    if expected < size:
        raise EnvelopeError(f"envelope has {size - expected} trailing bytes: header length {hlen} + payload "
                            f"length {plen} + {FIXED_SIZE} + signature {trailer} = {expected} bytes, {size} received")
    view = memoryview(buf)
    hbytes, payload = view[FIXED_SIZE:FIXED_SIZE + hlen], view[FIXED_SIZE + hlen:size - trailer]
    if _digest(view[:PREFIX.size], hbytes, payload) != buf[PREFIX.size:FIXED_SIZE]:
        raise EnvelopeError("envelope corrupted: the SHA-256 at offset 16 does not match its contents")

    try:
        header = json.loads(bytes(hbytes).decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constant)
    except EnvelopeError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: deep nesting
        raise EnvelopeError(f"header (offset {FIXED_SIZE}, {hlen} bytes) is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise EnvelopeError(f"header must be a JSON object, not {type(header).__name__}")
    _check_header(header, kind, EnvelopeError)
    codec = header["codec"]
    try:
        # 2 * max_tensors: every tensor may carry a scale companion; checked before looking at any entry
        specs = parse_specs(header["tensors"], max_specs=2 * max_tensors)
        for i, s in enumerate(specs):
            # the codec field is a promise about the encodings: hold the sender to it
            raw_float_matrix = s.encoding == "raw" and s.dtype == "float32" and len(s.shape) == 2
            if (codec == "float32" and s.encoding != "raw") or (codec == "int8" and raw_float_matrix):
                raise EnvelopeError(f"tensors[{i}] {s.name[:128]!r}: encoding {s.encoding} of a {s.dtype} "
                                    f"{len(s.shape)}-D tensor contradicts codec {codec!r}")
        tensors = decode_tensors(specs, payload, require_finite=True, max_tensors=max_tensors,
                                 max_elements=max_elements)
    except EnvelopeError:
        raise
    except CodecError as exc:  # the shared tensor checks already name the tensor and what is wrong
        raise EnvelopeError(str(exc)) from None
    return Envelope(kind=kind, device_id=header["device_id"], round=header["round"],
                          model_version=header["model_version"], strategy=header["strategy"],
                          update_id=header["update_id"], num_examples=header["num_examples"], tensors=tensors,
                          codec=codec, meta=dict(header["meta"]))
