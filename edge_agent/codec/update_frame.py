"""The compact binary frame of an update (device -> aggregator): a 52-byte header, then the tensors' codec bytes.

The JSON envelope (`codec.envelope`) repeats in every update what both sides already know from the round's task:
the device (it is in the topic), the strategy, every tensor's name, shape, dtype and offset. For a small head
that header was a quarter of the bytes (795 of an int8 update's 3,427). A frame carries only what changes from
one update to the next; the receiver supplies the rest (`device_id`, `strategy`, and `shapes`: the names and
shapes of the tensors the round's task asks for). Tasks and global models keep the envelope.

Layout (all integers little-endian)::

    offset  size  field
    ------  ----  -------------------------------------------------------------------------------------------
         0     2  magic b"EU" (an envelope starts with b"EFLE": the first bytes tell the two apart)
         2     1  format version, u8 (1)
         3     1  flags, u8: 0, or FLAG_SIGNED (0x01); other bits are refused
         4     1  codec, u8: its index in `compression.CODECS`
         5     1  options, u8: bit 0 +rot, bit 1 +sr; other bits, or a bit the codec does not take, are refused
         6     2  fraction, u16, in units of 1/65535 (topk and subsample: 1..65535; every other codec: 0)
         8     4  round, u32
        12     4  model_version, u32: the global version the update was trained from
        16     4  num_examples, u32: the aggregation weight
        20    16  update_id: 16 raw bytes (its text form is their 32 lowercase hex digits)
        36    16  digest: the first 16 bytes of SHA-256 over bytes [0, 36) + the body
        52     -  body: one entry per tensor of `shapes`, in ascending order of the names (see below)
       end    64  only with FLAG_SIGNED: an Ed25519 signature of a context string + every byte before it
                  (made and checked by `codec.signing`; `decode_update_frame` does not check it)

The fixed overhead is HEADER_SIZE = 52 bytes (116 signed), against the envelope's 48 + ~800.

Body. Each tensor's entry is `compression.encode_tensor`'s bytes, with no length in front of them when their
length follows from the shape, the codec and their first byte, as it does for every codec but topk:
a tensor of no elements has no bytes; float32 has exactly 4 n; the others start with a mode byte, and
MODE_ZERO is 1 byte, MODE_CONSTANT 5 and MODE_CODED `compression.tensor_bytes(shape, codec)`. A topk tensor's
length varies with its content (varint-coded indices), so it is preceded by its length as a canonical LEB128
varint (1 to 2 bytes for a head's tensors, at most `tensor_bytes`). This drops the 4 bytes a u32 length per tensor
would cost (16 of a 509-byte sign1 update of the default head) without losing any check: every length is still
known before the digest is computed and must fit exactly. Tensors go in the sorted order of their names, not the
order of a mapping, so a sender that built its shapes from the head and a receiver that built them from the
task's JSON (sorted keys) agree.

Fraction rounding. A topk or subsample fraction F is sent as q = floor(F * 65535 + 0.5). The receiver takes, as F,
the decimal with the fewest places that maps back to q (`fraction_from_wire`); the sender refuses (ValueError) a
fraction that does not come back exactly, so both sides always use the same CodecSpec (str(spec) round-trips).
Every fraction with at most 4 decimal places (0.05, 0.1, 0.0125 ...) comes back exactly; 0.123456 does not.

Decoding checks, cheapest first, so a hostile sender costs little: size cap (before anything else), magic,
version, flags, codec index, option bits and fraction against the codec, every tensor's length and that the body
ends exactly where the frame (or its signature) begins, then the digest, then `compression.decode_tensor` for each
tensor, and finally that no value is NaN or inf. Every failure is an `EnvelopeError` (the envelope's error type,
so a receiver handles both formats alike) whose message says which field, offset or tensor is wrong. As in the
envelope, the digest detects corruption; it is not a signature (anyone can recompute it).

Seeds. The lossy codecs' randomness (rounding noise, subsample masks, sign1 rotations) comes from a seed both
sides derive per tensor: `frame_seeds(device_id)` gives the `seed_of` both sides pass, which calls `frame_seed`
with the round of the frame, so every device, round and tensor gets its own. Not the fleet's name nor the random
update id: a fleet over MQTT then computes exactly what `edge-fl simulate` computes for the same devices, and a
device sends one update per round (a resend is the same bytes).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .compression import (
    CODECS,
    MODE_CODED,
    MODE_CONSTANT,
    MODE_ZERO,
    CodecSpec,
    decode_tensor,
    encode_tensor,
    tensor_bytes,
)
from .digest import sha256
from .envelope import AGGREGATOR_ID, EnvelopeError
from .tensor_pack import CodecError

MAGIC = b"EU"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
# magic, version, flags, codec, options, fraction, round, model_version, num_examples, update_id
HEADER = struct.Struct("<2sBBBBHIII16s")
DIGEST_SIZE = 16
DIGEST_OFFSET = HEADER.size  # 36
HEADER_SIZE = HEADER.size + DIGEST_SIZE  # 52: bytes before the body
FLAG_SIGNED = 0x01  # a SIGNATURE_SIZE-byte signature trailer follows the body
SIGNATURE_SIZE = 64  # Ed25519
OPTION_ROTATE = 0x01
OPTION_STOCHASTIC = 0x02
FRACTION_UNITS = 65535
MAX_U32 = 2**32
_MAX_VARINT_BYTES = 5  # a u32

_UPDATE_ID = re.compile(r"[0-9a-f]{32}")
# The envelope's rules for the fields a frame leaves to the receiver, so a decoded update looks the same either way
_DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_STRATEGY = re.compile(r"[A-Za-z0-9._-]{1,32}")

Float32Array = npt.NDArray[np.float32]
Shapes = Mapping[str, Sequence[int]]
SeedOf = Callable[[int, str, str], bytes]  # (round, update_id, tensor name) -> that tensor's codec seed


@dataclass(frozen=True)
class UpdateFrame:
    """One update, as the sender encodes it and the receiver gets it back (its tensors then decoded)."""

    device_id: str  # NOT in the bytes: the receiver passes the device its topic names
    round: int  # 0 <= round < 2**32
    model_version: int  # the global version the delta is against, 0 <= v < 2**32
    strategy: str  # NOT in the bytes: the receiver passes the round's strategy (from its task)
    update_id: str  # exactly 32 lowercase hex digits (uuid4().hex): 16 raw bytes on the wire
    num_examples: int  # aggregation weight, 0 <= n < 2**32
    codec: CodecSpec
    tensors: Mapping[str, np.ndarray]  # decoded: float32, one per name of the shapes, in sorted name order


# --- seeds ---------------------------------------------------------------------------------------------------------


def frame_seed(device_id: str, round_no: int, tensor: str) -> bytes:
    """The codec seed of one tensor of one update: 32 bytes, distinct per device, round and tensor.

    SHA-256 of b"edge-fl/update-seed/v1" then each field as a u16 length and its UTF-8 bytes (the round as its
    decimal text), so no two field lists give the same input. Distinct devices must not share rounding noise or
    subsample masks, or their errors stop averaging out (see `codec.compression`)."""
    h = sha256()
    h.update(b"edge-fl/update-seed/v1")
    for part in (device_id, str(int(round_no)), tensor):
        raw = part.encode()
        if len(raw) > 0xFFFF:
            raise ValueError(f"seed field {part[:40]!r}... is longer than 65535 bytes")
        h.update(struct.pack("<H", len(raw)) + raw)
    return bytes(h.digest())


def frame_seeds(device_id: str) -> SeedOf:
    """The `seed_of` argument of `encode_update_frame` and `decode_update_frame` for updates of `device_id`: both
    sides pass the same, the receiver with the device its topic names. (The update id is not part of the seed.)"""
    return lambda round_no, update_id, tensor: frame_seed(device_id, round_no, tensor)


# --- the codec byte, the options byte and the fraction -------------------------------------------------------------


def fraction_to_wire(fraction: float) -> int:
    """The u16 of a fraction: floor(F * 65535 + 0.5)."""
    return math.floor(fraction * FRACTION_UNITS + 0.5)


def fraction_from_wire(units: int) -> float:
    """The fraction a u16 stands for: the decimal with the fewest places that `fraction_to_wire` maps to `units`
    (1..65535). With 4 places the step, 1e-4, is wider than one unit (1/65535), so an interval holds at most one
    4-place decimal: that is why every fraction of at most 4 places round-trips."""
    for places in range(1, 18):
        candidate = round(units / FRACTION_UNITS, places)  # the nearest decimal of that many places
        if fraction_to_wire(candidate) == units:
            return candidate
    return units / FRACTION_UNITS  # not reached: 5 places (a step of 1e-5 < 1/65535) always find one


def _spec_fields(spec: CodecSpec) -> tuple[int, int, int]:
    """(codec index, options, fraction units) of `spec`; ValueError if the fraction would not round-trip."""
    if not isinstance(spec, CodecSpec):
        raise ValueError(f"codec must be a CodecSpec, not {type(spec).__name__}")
    options = (OPTION_ROTATE if spec.rotate else 0) | (OPTION_STOCHASTIC if spec.stochastic else 0)
    units = 0
    if spec.fraction is not None:
        units = fraction_to_wire(spec.fraction)
        if not 1 <= units <= FRACTION_UNITS or fraction_from_wire(units) != spec.fraction:
            nearest = fraction_from_wire(min(max(units, 1), FRACTION_UNITS))
            raise ValueError(f"codec {spec}: fraction {spec.fraction!r} is not exactly representable in 1/65535 "
                             f"units (nearest: {nearest!r}); fractions of at most 4 decimal places are")
    return CODECS.index(spec.name), options, units


def _spec_from_fields(codec: int, options: int, units: int) -> CodecSpec:
    if codec >= len(CODECS):
        raise EnvelopeError(f"unknown codec index {codec} at offset 4 (known: "
                            + ", ".join(f"{i} {name}" for i, name in enumerate(CODECS)) + ")")
    name = CODECS[codec]
    if options & ~(OPTION_ROTATE | OPTION_STOCHASTIC):
        raise EnvelopeError(f"options 0x{options:02x} at offset 5 are not supported (known: "
                            f"0x{OPTION_ROTATE:02x} +rot, 0x{OPTION_STOCHASTIC:02x} +sr)")
    fraction: float | None = None
    if name in ("topk", "subsample"):
        if units == 0:
            raise EnvelopeError(f"fraction 0 at offset 6: codec {name} needs a fraction in (0, 1]")
        fraction = fraction_from_wire(units)
    elif units:
        raise EnvelopeError(f"fraction {units}/65535 at offset 6: codec {name} takes no fraction (must be 0)")
    try:
        return CodecSpec(name, fraction, bool(options & OPTION_ROTATE), bool(options & OPTION_STOCHASTIC))
    except CodecError as exc:
        raise EnvelopeError(f"options 0x{options:02x} at offset 5: {exc}") from None


# --- the body: where each tensor's bytes are -----------------------------------------------------------------------


def _sorted_shapes(shapes: Shapes) -> list[tuple[str, tuple[int, ...]]]:
    """The shapes in wire order (sorted names), checked: a caller's mistake is a ValueError, not bad bytes."""
    if not isinstance(shapes, Mapping):
        raise ValueError(f"shapes must be a mapping of tensor name to shape, not {type(shapes).__name__}")
    out = []
    for name in sorted(shapes):
        if not isinstance(name, str):
            raise ValueError(f"tensor name {name!r:.60} is not a string")
        dims = tuple(shapes[name])
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise ValueError(f"tensor {name!r}: shape {dims!r:.60} must be non-negative integers")
        out.append((name, tuple(int(d) for d in dims)))
    return out


def _read_varint(data: bytes, pos: int, end: int, where: str) -> tuple[int, int]:
    """(value, position after it) of a canonical LEB128 varint at `pos`; EnvelopeError otherwise."""
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= end:
            raise EnvelopeError(f"frame truncated: {where}: its length varint at offset {pos} is cut off")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise EnvelopeError(f"{where}: the length varint at offset {pos} is not in its shortest form")
            return value, pos + i + 1
    raise EnvelopeError(f"{where}: the length varint at offset {pos} is longer than {_MAX_VARINT_BYTES} bytes")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _entry(data: bytes, pos: int, end: int, name: str, shape: tuple[int, ...], spec: CodecSpec) -> tuple[int, int]:
    """(start, length) of the codec bytes of tensor `name`, whose entry begins at `pos`; checks that they fit
    before `end` and that their length is one the codec can produce for this shape."""
    where = f"tensor {name[:128]!r} of shape {shape}"
    n = math.prod(shape)
    if n == 0:
        return pos, 0
    if spec.name == "float32":
        length = 4 * n
    elif spec.name == "topk":
        at = pos
        length, pos = _read_varint(data, pos, end, where)
        bound = tensor_bytes(shape, spec)
        if not 1 <= length <= bound:
            raise EnvelopeError(f"{where}: length {length} at offset {at} is not in 1..{bound} ({spec})")
    else:
        if pos >= end:
            raise EnvelopeError(f"frame truncated: {where} should start at offset {pos}, the body ends at {end}")
        mode = data[pos]
        lengths = {MODE_ZERO: 1, MODE_CONSTANT: 5, MODE_CODED: tensor_bytes(shape, spec)}
        if mode not in lengths:
            raise EnvelopeError(f"{where}: unknown mode byte {mode} at offset {pos} (known: {MODE_CODED} coded, "
                                f"{MODE_ZERO} zero, {MODE_CONSTANT} constant)")
        length = lengths[mode]
    if pos + length > end:
        raise EnvelopeError(f"frame truncated: {where} needs {length} bytes from offset {pos}, "
                            f"{max(end - pos, 0)} are left before offset {end}")
    return pos, length


def _layout(data: bytes, end: int, shapes: list[tuple[str, tuple[int, ...]]],
            spec: CodecSpec) -> list[tuple[int, int]]:
    """(start, length) of every tensor's codec bytes in the body [HEADER_SIZE, end), which they must fill."""
    pos, spans = HEADER_SIZE, []
    for name, shape in shapes:
        start, length = _entry(data, pos, end, name, shape, spec)
        spans.append((start, length))
        pos = start + length
    if pos != end:
        raise EnvelopeError(f"frame has {end - pos} bytes after its last tensor (offset {pos}; "
                            f"{len(shapes)} tensors expected{', then a signature' if end < len(data) else ''})")
    return spans


# --- encoding ------------------------------------------------------------------------------------------------------


def _check_fields(round_no: int, model_version: int, num_examples: int, update_id: str) -> None:
    for name, value in (("round", round_no), ("model_version", model_version), ("num_examples", num_examples)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
        if not 0 <= value < MAX_U32:
            raise ValueError(f"{name} = {value} is out of range (0 <= {name} < 2**32)")
    if not isinstance(update_id, str) or not _UPDATE_ID.fullmatch(update_id):
        raise ValueError(f"update_id {update_id!r:.80} must be exactly 32 lowercase hex digits (uuid4().hex)")


def pack_update_frame(*, round_no: int, model_version: int, update_id: str, num_examples: int, codec: CodecSpec,
                      encoded: Mapping[str, bytes], shapes: Shapes,
                      sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """A frame around tensors already encoded with `compression.encode_tensor` (what `ErrorFeedback.compress`
    returns), one per name of `shapes`; ValueError for anything `decode_update_frame` would refuse in the layout
    (the codec bytes themselves are compression's, and not decoded again here).

    With `sign` (see `codec.signing.signer`), the frame is flagged FLAG_SIGNED and `sign(bytes before the
    trailer)` is appended: the signature covers header, digest and body."""
    _check_fields(round_no, model_version, num_examples, update_id)
    codec_index, options, units = _spec_fields(codec)
    order = _sorted_shapes(shapes)
    if not isinstance(encoded, Mapping) or set(encoded) != {name for name, _ in order}:
        got = sorted(encoded) if isinstance(encoded, Mapping) else type(encoded).__name__
        raise ValueError(f"tensors {got} do not match the shapes' names {[name for name, _ in order]}")
    parts = []
    for name, shape in order:
        raw = bytes(encoded[name])
        entry = _varint(len(raw)) + raw if codec.name == "topk" and math.prod(shape) > 0 else raw
        try:  # the same check the receiver makes, on this tensor alone so the error names the right one
            start, length = _entry(entry, 0, len(entry), name, shape, codec)
        except EnvelopeError as exc:
            raise ValueError(str(exc)) from None
        if start + length != len(entry):
            raise ValueError(f"tensor {name!r} of shape {shape}: {len(raw)} bytes are not a {codec} encoding "
                             f"({start + length - (len(entry) - len(raw))} expected)")
        parts.append(entry)
    body = b"".join(parts)
    header = HEADER.pack(MAGIC, VERSION, 0 if sign is None else FLAG_SIGNED, codec_index, options, units,
                         int(round_no), int(model_version), int(num_examples), bytes.fromhex(update_id))
    frame = header + _digest(header, body) + body
    if sign is None:
        return frame
    signature = sign(frame)
    if len(signature) != SIGNATURE_SIZE:
        raise ValueError(f"the signer returned {len(signature)} bytes, a signature has {SIGNATURE_SIZE}")
    return frame + signature


def encode_update_frame(frame: UpdateFrame, shapes: Shapes, seed_of: SeedOf, *,
                        sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """Encode `frame.tensors` (one per name of `shapes`, of that shape) with `frame.codec` and frame them; the seed
    of each tensor is seed_of(frame.round, frame.update_id, name). ValueError for bad input (see
    `pack_update_frame`); frame.device_id and frame.strategy are not sent."""
    _check_fields(frame.round, frame.model_version, frame.num_examples, frame.update_id)
    _spec_fields(frame.codec)  # before encoding anything
    order = _sorted_shapes(shapes)
    if not isinstance(frame.tensors, Mapping) or set(frame.tensors) != {name for name, _ in order}:
        got = sorted(frame.tensors) if isinstance(frame.tensors, Mapping) else type(frame.tensors).__name__
        raise ValueError(f"tensors {got} do not match the shapes' names {[name for name, _ in order]}")
    encoded = {}
    for name, shape in order:
        value = frame.tensors[name]
        if np.shape(value) != shape:
            raise ValueError(f"tensor {name!r} has shape {np.shape(value)}, the shapes say {shape}")
        try:
            seed = seed_of(frame.round, frame.update_id, name) if frame.codec.seeded else b""
            encoded[name] = encode_tensor(value, frame.codec, seed)
        except CodecError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
    return pack_update_frame(round_no=frame.round, model_version=frame.model_version, update_id=frame.update_id,
                             num_examples=frame.num_examples, codec=frame.codec, encoded=encoded, shapes=shapes,
                             sign=sign)


# --- decoding ------------------------------------------------------------------------------------------------------


def _digest(header: bytes | memoryview, body: bytes | memoryview) -> bytes:
    h = sha256()
    h.update(header)
    h.update(body)
    return bytes(h.digest()[:DIGEST_SIZE])


def is_update_frame(data: bytes | bytearray | memoryview) -> bool:
    """Does `data` start with a frame's magic (and not an envelope's)? Looks at 2 bytes, checks nothing else."""
    view = memoryview(data).cast("B")
    return view.nbytes >= len(MAGIC) and bytes(view[:len(MAGIC)]) == MAGIC


def signed_parts(data: bytes | bytearray | memoryview) -> tuple[memoryview, bytes | None]:
    """(the bytes a signature covers, the signature) of a frame, or (all of it, None) when it is not signed.
    Only the magic, flags and size are checked: cheap enough to run before anything else on a hostile input."""
    view = memoryview(data).cast("B")
    if view.nbytes < HEADER_SIZE:
        raise EnvelopeError(f"frame truncated: {view.nbytes} bytes, expected at least {HEADER_SIZE}")
    if bytes(view[:len(MAGIC)]) != MAGIC:
        raise EnvelopeError(f"not an update frame: magic {bytes(view[:len(MAGIC)])!r} at offset 0, expected {MAGIC!r}")
    flags = view[3]
    if flags & ~FLAG_SIGNED:
        raise EnvelopeError(f"flags 0x{flags:02x} at offset 3 are not supported (known: 0x{FLAG_SIGNED:02x} signed)")
    if not flags & FLAG_SIGNED:
        return view, None
    if view.nbytes < HEADER_SIZE + SIGNATURE_SIZE:
        raise EnvelopeError(f"signed frame truncated: {view.nbytes} bytes, expected at least "
                            f"{HEADER_SIZE} + a {SIGNATURE_SIZE}-byte signature")
    end = view.nbytes - SIGNATURE_SIZE
    return view[:end], bytes(view[end:])


def digest_matches(body: bytes | bytearray | memoryview) -> bool:
    """Does the digest at offset 36 match the rest of `body` (a frame without its signature trailer)? Tells a
    damaged frame from an intact one signed with another key."""
    view = memoryview(body).cast("B")
    if view.nbytes < HEADER_SIZE:
        return False
    return _digest(view[:DIGEST_OFFSET], view[HEADER_SIZE:]) == bytes(view[DIGEST_OFFSET:HEADER_SIZE])


def decode_update_frame(data: bytes | bytearray | memoryview, *, device_id: str, strategy: str, shapes: Shapes,
                        seed_of: SeedOf, max_bytes: int = 1 << 20) -> UpdateFrame:
    """Parse and fully check a frame from `device_id` for a round of `strategy` whose task names `shapes`.

    EnvelopeError, and only that, for any bad bytes (see the module docstring for the order of the checks);
    ValueError for bad arguments (an invalid device_id or strategy, malformed shapes). A signed frame is accepted
    without checking its signature: whoever requires one checks it with `codec.signing.verify` first."""
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id) or device_id == AGGREGATOR_ID:
        raise ValueError(f"device_id {device_id!r:.80} is invalid: must be {_DEVICE_ID.pattern}, not "
                         f"{AGGREGATOR_ID!r}")
    if not isinstance(strategy, str) or not _STRATEGY.fullmatch(strategy):
        raise ValueError(f"strategy {strategy!r:.80} is invalid: must be {_STRATEGY.pattern}")
    order = _sorted_shapes(shapes)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EnvelopeError(f"a frame is bytes, not {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise EnvelopeError(f"frame oversized: {size} bytes, at most {max_bytes} accepted")
    buf = bytes(data)
    if size < HEADER_SIZE:
        raise EnvelopeError(f"frame truncated: {size} bytes, expected at least {HEADER_SIZE} (header and digest)")
    magic, version, flags, codec, options, units, round_no, model_version, num_examples, uid = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise EnvelopeError(f"not an update frame: magic {magic!r} at offset 0, expected {MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        raise EnvelopeError(f"frame format version {version} (offset 2) is not supported; "
                            f"this build reads version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}")
    if flags & ~FLAG_SIGNED:
        raise EnvelopeError(f"flags 0x{flags:02x} at offset 3 are not supported by format version {VERSION} "
                            f"(known: 0x{FLAG_SIGNED:02x} signed)")
    spec = _spec_from_fields(codec, options, units)
    end = size - (SIGNATURE_SIZE if flags & FLAG_SIGNED else 0)  # the signature is codec.signing's to check
    if end < HEADER_SIZE:
        raise EnvelopeError(f"signed frame truncated: {size} bytes, expected at least {HEADER_SIZE} "
                            f"+ a {SIGNATURE_SIZE}-byte signature")
    spans = _layout(buf, end, order, spec)
    view = memoryview(buf)
    if _digest(view[:DIGEST_OFFSET], view[HEADER_SIZE:end]) != buf[DIGEST_OFFSET:HEADER_SIZE]:
        raise EnvelopeError(f"frame corrupted: the digest at offset {DIGEST_OFFSET} does not match its contents")
    update_id = uid.hex()
    tensors: dict[str, Float32Array] = {}
    for (name, shape), (start, length) in zip(order, spans, strict=True):
        try:
            # hostile floats (a signalling-NaN scale) must end as the CodecError below, whatever the caller's
            # numpy error settings: a warning turned into an error, or np.seterr(all="raise"), would escape it
            with np.errstate(all="ignore"):
                seed = seed_of(round_no, update_id, name) if spec.seeded else b""  # a SHA-256 each, when needed
                value = decode_tensor(view[start:start + length], shape, spec, seed)
        except CodecError as exc:
            raise EnvelopeError(f"tensor {name[:128]!r} at offset {start}: {exc}") from None
        if not np.all(np.isfinite(value)):  # compression promises this; a poisoned update must never pass
            raise EnvelopeError(f"tensor {name[:128]!r} at offset {start} decodes to NaN or inf")
        tensors[name] = value
    return UpdateFrame(device_id=device_id, round=round_no, model_version=model_version, strategy=strategy,
                       update_id=update_id, num_examples=num_examples, codec=spec, tensors=tensors)
