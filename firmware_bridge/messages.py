"""Typed messages of the serial protocol (PROTOCOL.md, "Messages") and their payload codecs.

`decode_message` is strict: a payload that is not exactly what the spec says raises `MessageError`,
which carries the `ErrorCode` the receiver should answer with. Floats (f32 on the wire) are rounded to
float32 when a message is built, so `decode_message(encode_message(m)) == m` holds exactly.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

import numpy as np

from .framing import MAX_PAYLOAD, PROTOCOL_VERSION, Frame, FrameError, crc32, encode_frame


class MessageType(IntEnum):
    HELLO = 0x01
    SENSOR_WINDOW = 0x02
    HEAD_BEGIN = 0x03
    HEAD_CHUNK = 0x04
    HEAD_COMMIT = 0x05
    ACK = 0x06
    INFER_RESULT = 0x07
    HEARTBEAT = 0x08
    ERROR = 0x09


class ErrorCode(IntEnum):
    BAD_VERSION = 1
    BAD_CRC = 2
    BAD_LENGTH = 3
    UNKNOWN_TYPE = 4
    HEAD_INCOMPLETE = 5
    HEAD_CRC = 6
    NO_HEAD = 7
    OUT_OF_MEMORY = 8
    BAD_MESSAGE = 9


ACK_OK = 0
HEAD_CHUNK_MAX = 1024
LABEL_NONE = -1
INT16_MIN, INT16_MAX = -32768, 32767


class MessageError(FrameError):
    """A frame that is intact but whose payload is not a valid message; `code` is the reply's code."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message, "bad_message")
        self.code = code


def error_code_for(exc: FrameError) -> ErrorCode:
    """The ERROR code that answers a rejected frame or message."""
    if isinstance(exc, MessageError):
        return exc.code
    return {"bad_crc": ErrorCode.BAD_CRC, "bad_length": ErrorCode.BAD_LENGTH}.get(exc.reason, ErrorCode.BAD_MESSAGE)


def _f32(x: float) -> float:
    return float(np.float32(x))


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise ValueError(f"{name}={value!r} must be an integer in [{lo}, {hi}]")


def _utf8_prefix(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding fits in `limit` bytes (no split characters)."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", errors="ignore")


# --- messages -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[MessageType] = MessageType.HELLO
    sensor_rate_hz: int
    free_ram: int
    arena_size: int
    board: str
    proto_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_range("proto_version", self.proto_version, 0, 0xFF)
        _check_range("sensor_rate_hz", self.sensor_rate_hz, 0, 0xFFFF)
        _check_range("free_ram", self.free_ram, 0, 0xFFFFFFFF)
        _check_range("arena_size", self.arena_size, 0, 0xFFFFFFFF)
        if len(self.board.encode("utf-8")) > 0xFF:
            raise ValueError("board name is longer than 255 UTF-8 bytes")


@dataclass(frozen=True, eq=False)
class SensorWindow:
    """One window of IMU samples: int16 (n_samples, n_channels), physical value = sample * scale."""

    TYPE: ClassVar[MessageType] = MessageType.SENSOR_WINDOW
    window_id: int
    samples: np.ndarray
    scale: float
    label: int = LABEL_NONE

    def __post_init__(self) -> None:
        _check_range("window_id", self.window_id, 0, 0xFFFFFFFF)
        _check_range("label", self.label, -128, 127)
        s = np.asarray(self.samples)
        if s.ndim != 2 or s.dtype != np.int16:
            raise ValueError(f"samples must be an int16 (n_samples, n_channels) array, got {s.dtype} {s.shape}")
        _check_range("n_samples", s.shape[0], 1, 0xFFFF)
        _check_range("n_channels", s.shape[1], 1, 0xFF)
        if 12 + 2 * s.size > MAX_PAYLOAD:
            raise ValueError(f"{s.shape[0]}x{s.shape[1]} samples do not fit in one {MAX_PAYLOAD}-byte payload")
        scale = _f32(self.scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={self.scale!r} must be finite and > 0 as float32")
        object.__setattr__(self, "scale", scale)
        # Own, read-only copy: the message is a value, the caller's buffer may be reused.
        s = np.array(s, dtype=np.int16, copy=True)
        s.flags.writeable = False
        object.__setattr__(self, "samples", s)

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.samples.shape[1])

    def to_float(self) -> np.ndarray:
        """Physical units, float32 (n_samples, n_channels)."""
        out: np.ndarray = self.samples.astype(np.float32) * np.float32(self.scale)
        return out

    @classmethod
    def from_float(cls, window_id: int, window: np.ndarray, scale: float | None = None,
                   label: int = LABEL_NONE) -> SensorWindow:
        """Quantize a float window; `scale=None` picks one that uses the full int16 range."""
        scale = choose_scale(window) if scale is None else scale
        return cls(window_id, window_to_int16(window, scale), scale, label)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SensorWindow):
            return NotImplemented
        return (self.window_id, self.scale, self.label) == (other.window_id, other.scale, other.label) and bool(
            self.samples.shape == other.samples.shape and np.array_equal(self.samples, other.samples))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking array content: not hashable


@dataclass(frozen=True)
class HeadBegin:
    TYPE: ClassVar[MessageType] = MessageType.HEAD_BEGIN
    head_id: int
    total_len: int
    n_chunks: int
    head_crc32: int

    def __post_init__(self) -> None:
        _check_range("head_id", self.head_id, 0, 0xFFFFFFFF)
        _check_range("total_len", self.total_len, 0, 0xFFFFFFFF)
        _check_range("n_chunks", self.n_chunks, 0, 0xFFFF)
        _check_range("head_crc32", self.head_crc32, 0, 0xFFFFFFFF)


@dataclass(frozen=True)
class HeadChunk:
    TYPE: ClassVar[MessageType] = MessageType.HEAD_CHUNK
    head_id: int
    index: int
    data: bytes

    def __post_init__(self) -> None:
        _check_range("head_id", self.head_id, 0, 0xFFFFFFFF)
        _check_range("index", self.index, 0, 0xFFFF)
        object.__setattr__(self, "data", bytes(self.data))
        if not 1 <= len(self.data) <= HEAD_CHUNK_MAX:
            raise ValueError(f"chunk data must be 1..{HEAD_CHUNK_MAX} bytes, got {len(self.data)}")


@dataclass(frozen=True)
class HeadCommit:
    TYPE: ClassVar[MessageType] = MessageType.HEAD_COMMIT
    head_id: int

    def __post_init__(self) -> None:
        _check_range("head_id", self.head_id, 0, 0xFFFFFFFF)


@dataclass(frozen=True)
class Ack:
    """`status` is ACK_OK (0) or an ErrorCode; `index` is the HEAD_CHUNK index, else 0."""

    TYPE: ClassVar[MessageType] = MessageType.ACK
    acked_type: int
    acked_seq: int
    status: int = ACK_OK
    index: int = 0

    def __post_init__(self) -> None:
        _check_range("acked_type", self.acked_type, 0, 0xFF)
        _check_range("acked_seq", self.acked_seq, 0, 0xFFFF)
        _check_range("status", self.status, 0, 0xFF)
        _check_range("index", self.index, 0, 0xFFFF)

    @property
    def ok(self) -> bool:
        return self.status == ACK_OK


@dataclass(frozen=True)
class InferResult:
    """`class_id` is the spec's `class` (a Python keyword); `score` its softmax probability."""

    TYPE: ClassVar[MessageType] = MessageType.INFER_RESULT
    window_id: int
    class_id: int
    score: float
    head_id: int

    def __post_init__(self) -> None:
        _check_range("window_id", self.window_id, 0, 0xFFFFFFFF)
        _check_range("class_id", self.class_id, 0, 0xFF)
        _check_range("head_id", self.head_id, 0, 0xFFFFFFFF)
        object.__setattr__(self, "score", _f32(self.score))


@dataclass(frozen=True)
class Heartbeat:
    TYPE: ClassVar[MessageType] = MessageType.HEARTBEAT
    uptime_ms: int

    def __post_init__(self) -> None:
        _check_range("uptime_ms", self.uptime_ms, 0, 0xFFFFFFFF)


@dataclass(frozen=True)
class ErrorMsg:
    """`code` is an ErrorCode when known; other values are kept as int (a newer peer's codes).

    `detail` longer than 255 UTF-8 bytes is cut at a character boundary when the message is built:
    an error report must never fail to be sent because its text is long.
    """

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: int
    detail: str = ""

    def __post_init__(self) -> None:
        _check_range("code", self.code, 0, 0xFF)
        if self.code in ErrorCode._value2member_map_:
            object.__setattr__(self, "code", ErrorCode(self.code))
        object.__setattr__(self, "detail", _utf8_prefix(self.detail, 0xFF))


Message = Hello | SensorWindow | HeadBegin | HeadChunk | HeadCommit | Ack | InferResult | Heartbeat | ErrorMsg

_HELLO = struct.Struct("<BHIIB")
_WINDOW = struct.Struct("<IHBbf")
_HEAD_BEGIN = struct.Struct("<IIHI")
_HEAD_CHUNK = struct.Struct("<IH")
_U32 = struct.Struct("<I")
_ACK = struct.Struct("<BHBH")
_INFER = struct.Struct("<IBfI")
_ERROR = struct.Struct("<BB")


def encode_message(msg: Message) -> tuple[int, bytes]:
    """(type, payload) of a message."""
    if isinstance(msg, Hello):
        board = msg.board.encode("utf-8")
        head = _HELLO.pack(msg.proto_version, msg.sensor_rate_hz, msg.free_ram, msg.arena_size, len(board))
        return msg.TYPE, head + board
    if isinstance(msg, SensorWindow):
        head = _WINDOW.pack(msg.window_id, msg.n_samples, msg.n_channels, msg.label, msg.scale)
        return msg.TYPE, head + msg.samples.astype("<i2").tobytes()  # sample-major = C order
    if isinstance(msg, HeadBegin):
        return msg.TYPE, _HEAD_BEGIN.pack(msg.head_id, msg.total_len, msg.n_chunks, msg.head_crc32)
    if isinstance(msg, HeadChunk):
        return msg.TYPE, _HEAD_CHUNK.pack(msg.head_id, msg.index) + msg.data
    if isinstance(msg, HeadCommit):
        return msg.TYPE, _U32.pack(msg.head_id)
    if isinstance(msg, Ack):
        return msg.TYPE, _ACK.pack(msg.acked_type, msg.acked_seq, msg.status, msg.index)
    if isinstance(msg, InferResult):
        return msg.TYPE, _INFER.pack(msg.window_id, msg.class_id, msg.score, msg.head_id)
    if isinstance(msg, Heartbeat):
        return msg.TYPE, _U32.pack(msg.uptime_ms)
    if isinstance(msg, ErrorMsg):
        detail = msg.detail.encode("utf-8")
        return msg.TYPE, _ERROR.pack(msg.code, len(detail)) + detail
    raise TypeError(f"not a protocol message: {type(msg).__name__}")


def to_frame(msg: Message, seq: int) -> bytes:
    """The wire bytes of `msg` as frame number `seq` (COBS-encoded, 0x00-terminated)."""
    type_, payload = encode_message(msg)
    return encode_frame(type_, seq, payload)


def _exact(name: str, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise MessageError(f"{name} payload is {len(payload)} bytes, must be {size}", ErrorCode.BAD_LENGTH)


def _at_least(name: str, payload: bytes, size: int) -> None:
    if len(payload) < size:
        raise MessageError(f"{name} payload is {len(payload)} bytes, needs at least {size}", ErrorCode.BAD_LENGTH)


def _text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        detail = f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        raise MessageError(detail, ErrorCode.BAD_MESSAGE) from None


def decode_message(frame: Frame, *, version: int = PROTOCOL_VERSION) -> Message:
    """The message a frame carries. Raises MessageError whose `code` the receiver answers with.

    `version` is the protocol version this side speaks: the emulator plays a peer of another version
    (same payloads, another version byte) to test what two mismatched peers do to each other.
    """
    if frame.version != version:
        raise MessageError(f"protocol version {frame.version}, this side speaks {version}", ErrorCode.BAD_VERSION)
    try:
        mtype = MessageType(frame.type)
    except ValueError:
        raise MessageError(f"unknown message type 0x{frame.type:02x}", ErrorCode.UNKNOWN_TYPE) from None
    p = frame.payload
    try:
        return _DECODERS[mtype](p)
    except MessageError:
        raise
    except ValueError as exc:
        # Field values the dataclasses refuse (e.g. a 0-channel window, a non-finite scale).
        raise MessageError(f"{mtype.name}: {exc}", ErrorCode.BAD_MESSAGE) from None


def _hello(p: bytes) -> Hello:
    _at_least("HELLO", p, _HELLO.size)
    proto, rate, ram, arena, board_len = _HELLO.unpack_from(p)
    _exact(f"HELLO with a {board_len}-byte board name", p, _HELLO.size + board_len)
    return Hello(rate, ram, arena, _text("HELLO board", p[_HELLO.size:]), proto_version=proto)


def _window(p: bytes) -> SensorWindow:
    _at_least("SENSOR_WINDOW", p, _WINDOW.size)
    window_id, n_samples, n_channels, label, scale = _WINDOW.unpack_from(p)
    _exact(f"SENSOR_WINDOW of {n_samples}x{n_channels} samples", p, _WINDOW.size + 2 * n_samples * n_channels)
    samples = np.frombuffer(p, dtype="<i2", offset=_WINDOW.size).astype(np.int16).reshape(n_samples, n_channels)
    return SensorWindow(window_id, samples, scale, label)


def _head_begin(p: bytes) -> HeadBegin:
    _exact("HEAD_BEGIN", p, _HEAD_BEGIN.size)
    return HeadBegin(*_HEAD_BEGIN.unpack(p))


def _head_chunk(p: bytes) -> HeadChunk:
    _at_least("HEAD_CHUNK", p, _HEAD_CHUNK.size + 1)
    data_len = len(p) - _HEAD_CHUNK.size
    if data_len > HEAD_CHUNK_MAX:
        raise MessageError(f"HEAD_CHUNK carries {data_len} bytes, at most {HEAD_CHUNK_MAX}", ErrorCode.BAD_LENGTH)
    head_id, index = _HEAD_CHUNK.unpack_from(p)
    return HeadChunk(head_id, index, p[_HEAD_CHUNK.size:])


def _head_commit(p: bytes) -> HeadCommit:
    _exact("HEAD_COMMIT", p, _U32.size)
    return HeadCommit(*_U32.unpack(p))


def _ack(p: bytes) -> Ack:
    _exact("ACK", p, _ACK.size)
    return Ack(*_ACK.unpack(p))


def _infer(p: bytes) -> InferResult:
    _exact("INFER_RESULT", p, _INFER.size)
    return InferResult(*_INFER.unpack(p))


def _heartbeat(p: bytes) -> Heartbeat:
    _exact("HEARTBEAT", p, _U32.size)
    return Heartbeat(*_U32.unpack(p))


def _error(p: bytes) -> ErrorMsg:
    _at_least("ERROR", p, _ERROR.size)
    code, detail_len = _ERROR.unpack_from(p)
    _exact(f"ERROR with a {detail_len}-byte detail", p, _ERROR.size + detail_len)
    return ErrorMsg(code, _text("ERROR detail", p[_ERROR.size:]))


_DECODERS: dict[MessageType, Callable[[bytes], Message]] = {
    MessageType.HELLO: _hello,
    MessageType.SENSOR_WINDOW: _window,
    MessageType.HEAD_BEGIN: _head_begin,
    MessageType.HEAD_CHUNK: _head_chunk,
    MessageType.HEAD_COMMIT: _head_commit,
    MessageType.ACK: _ack,
    MessageType.INFER_RESULT: _infer,
    MessageType.HEARTBEAT: _heartbeat,
    MessageType.ERROR: _error,
}


# --- head push and float windows --------------------------------------------------------------------

def head_push(head_id: int, blob: bytes,
              chunk_size: int = HEAD_CHUNK_MAX) -> tuple[HeadBegin, list[HeadChunk], HeadCommit]:
    """The messages that push `blob` as head `head_id`: BEGIN, CHUNKs (index 0..n-1), COMMIT."""
    if not 1 <= chunk_size <= HEAD_CHUNK_MAX:
        raise ValueError(f"chunk_size must be 1..{HEAD_CHUNK_MAX}")
    blob = bytes(blob)
    offsets = range(0, len(blob), chunk_size)
    chunks = [HeadChunk(head_id, i, blob[off:off + chunk_size]) for i, off in enumerate(offsets)]
    return HeadBegin(head_id, len(blob), len(chunks), crc32(blob)), chunks, HeadCommit(head_id)


def choose_scale(window: np.ndarray) -> float:
    """The float32 scale that maps the window's largest |value| to 32767 (1.0 for an all-zero window)."""
    w = np.asarray(window, np.float64)
    finite = w[np.isfinite(w)]
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    if peak == 0.0:
        return 1.0
    scale = _f32(peak / INT16_MAX)
    # float32 rounding may land just below peak/32767; nudge up so the peak does not saturate.
    while scale * INT16_MAX < peak:
        scale = float(np.nextafter(np.float32(scale), np.float32(np.inf)))
    return scale


def window_to_int16(window: np.ndarray, scale: float) -> np.ndarray:
    """round(window / scale), saturated to int16 (a clipped reading beats a wrapped one). NaN raises."""
    scale = _f32(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} must be finite and > 0")
    w = np.asarray(window, np.float64)
    if np.isnan(w).any():
        raise ValueError("window contains NaN: no int16 stands for it")
    return np.clip(np.rint(w / scale), INT16_MIN, INT16_MAX).astype(np.int16)


def int16_to_window(samples: np.ndarray, scale: float) -> np.ndarray:
    """Inverse of `window_to_int16` up to rounding: float32 physical units."""
    out: np.ndarray = np.asarray(samples, np.int16).astype(np.float32) * np.float32(scale)
    return out


__all__ = [
    "ACK_OK", "HEAD_CHUNK_MAX", "LABEL_NONE", "Ack", "ErrorCode", "ErrorMsg", "HeadBegin", "HeadChunk",
    "HeadCommit", "Heartbeat", "Hello", "InferResult", "Message", "MessageError", "MessageType",
    "SensorWindow", "choose_scale", "decode_message", "encode_message", "error_code_for", "head_push",
    "int16_to_window", "to_frame", "window_to_int16",
]
