"""Frames of the serial protocol: COBS(body) || 0x00, body = header || payload || CRC (PROTOCOL.md).

Pure: `FrameDecoder.feed(bytes) -> frames` knows nothing of ports (like pyserial's threaded `Protocol`),
so the same code runs on a real UART, a loopback, an emulator and a fuzzer.
"""

from __future__ import annotations

import binascii
import struct
import zlib
from dataclasses import dataclass, fields
from typing import Literal

PROTOCOL_VERSION = 1
MAX_PAYLOAD = 2048
HEADER_SIZE = 8
# Payloads up to this size carry CRC-16, longer ones CRC-32 (flag bit 0 says which).
CRC16_MAX_PAYLOAD = 256
FLAG_CRC32 = 0x01
DELIMITER = b"\x00"

_HEADER = struct.Struct("<BBHHBB")  # version, type, seq, length, flags, reserved

# Why a frame was dropped; the names are the `DecoderStats` counters they increment.
Reason = Literal["bad_crc", "bad_length", "bad_cobs", "bad_header", "bad_message"]


class FrameError(ValueError):
    """A malformed frame. `reason` names the `DecoderStats` counter it belongs to."""

    def __init__(self, message: str, reason: Reason = "bad_header") -> None:
        super().__init__(message)
        self.reason: Reason = reason


@dataclass(frozen=True)
class Frame:
    version: int
    type: int
    seq: int
    payload: bytes


def max_body_size(max_payload: int = MAX_PAYLOAD) -> int:
    # Counts a CRC-32 even for small limits: an upper bound is all a buffer size needs.
    return HEADER_SIZE + max_payload + 4


def max_encoded_size(max_payload: int = MAX_PAYLOAD) -> int:
    """Largest COBS(body) without the delimiter: COBS adds 1 byte per started 254-byte run (>= 1)."""
    body = max_body_size(max_payload)
    return body + max(1, -(-body // 254))


# --- COBS (Cheshire & Baker, 1999) ----------------------------------------------------------------

def cobs_encode(data: bytes) -> bytes:
    """COBS without the trailing delimiter; the output contains no 0x00 (b"" -> b"\\x01").

    Canonical form (as the paper and Wikipedia's reference code): a full 254-byte run opens a new
    run only if more data follows, so 254 non-zero bytes encode as FF + data, not FF + data + 01.
    """
    out = bytearray([0])  # placeholder for the first code byte
    code_pos, code = 0, 1
    n = len(data)
    for i, byte in enumerate(data):
        if byte == 0:
            out[code_pos] = code
            code_pos, code = len(out), 1
            out.append(0)
            continue
        out.append(byte)
        code += 1
        if code == 0xFF and i + 1 < n:
            out[code_pos] = code
            code_pos, code = len(out), 1
            out.append(0)
    out[code_pos] = code
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of `cobs_encode` (input without the delimiter). Raises FrameError(bad_cobs)."""
    if not data:
        raise FrameError("COBS: empty input (the encoding of b'' is b'\\x01')", "bad_cobs")
    out = bytearray()
    pos, n = 0, len(data)
    while pos < n:
        code = data[pos]
        if code == 0:
            raise FrameError(f"COBS: zero byte at offset {pos}", "bad_cobs")
        end = pos + code
        if end > n:
            raise FrameError(f"COBS: code {code} at offset {pos} runs past the end ({n} bytes)", "bad_cobs")
        run = data[pos + 1:end]
        if 0 in run:
            raise FrameError(f"COBS: zero byte inside the run at offset {pos}", "bad_cobs")
        out += run
        pos = end
        # Every run but the last and the full ones stood for a zero in the data.
        if code != 0xFF and pos < n:
            out.append(0)
    return bytes(out)


# --- CRCs -----------------------------------------------------------------------------------------

def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, not reflected, no xorout (check 0x29B1).

    binascii.crc_hqx is this CRC with a caller-given init; C speed, and no table of our own to get wrong.
    """
    return binascii.crc_hqx(data, 0xFFFF)


def crc32(data: bytes) -> int:
    """CRC-32/IEEE as zlib computes it (check 0xCBF43926)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def _crc_bytes(covered: bytes, use_crc32: bool) -> bytes:
    return struct.pack("<I", crc32(covered)) if use_crc32 else struct.pack("<H", crc16_ccitt(covered))


# --- frames ---------------------------------------------------------------------------------------

def encode_body(type: int, seq: int, payload: bytes, *, version: int = PROTOCOL_VERSION) -> bytes:
    """header || payload || CRC, before COBS. `seq` is taken modulo 2**16: the spec's counter wraps."""
    if not 0 <= type <= 0xFF or not 0 <= version <= 0xFF:
        raise ValueError(f"type {type} / version {version} must fit in a byte")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte maximum", "bad_length")
    use_crc32 = len(payload) > CRC16_MAX_PAYLOAD
    header = _HEADER.pack(version, type, seq & 0xFFFF, len(payload), FLAG_CRC32 if use_crc32 else 0, 0)
    return header + payload + _crc_bytes(header + payload, use_crc32)


def encode_frame(type: int, seq: int, payload: bytes, *, version: int = PROTOCOL_VERSION) -> bytes:
    """The bytes to write: COBS(body) || 0x00."""
    return cobs_encode(encode_body(type, seq, payload, version=version)) + DELIMITER


def decode_body(body: bytes, *, max_payload: int = MAX_PAYLOAD) -> Frame:
    """Validate a COBS-decoded body and return its frame; FrameError(reason) says what is wrong.

    The CRC is checked first (its size comes from flag bit 0, its place is the end of the body), so
    a corrupted frame counts as bad_crc and the header checks after it only catch sender bugs.
    The version is not checked: a frame of another version is returned intact so the caller can
    answer ERROR BAD_VERSION (`messages.decode_message` refuses it). Such a frame must still pass the
    version-1 integrity checks: a corrupted version byte must never provoke a BAD_VERSION reply.
    """
    body = bytes(body)
    if len(body) < HEADER_SIZE + 2:
        raise FrameError(f"body of {len(body)} bytes is shorter than header + CRC-16 ({HEADER_SIZE + 2})", "bad_length")
    version, type_, seq, length, flags, reserved = _HEADER.unpack_from(body)
    use_crc32 = bool(flags & FLAG_CRC32)
    crc_len = 4 if use_crc32 else 2
    if len(body) < HEADER_SIZE + crc_len:
        raise FrameError(f"body of {len(body)} bytes is shorter than header + CRC-32 ({HEADER_SIZE + 4})", "bad_length")
    covered, stored = body[:-crc_len], body[-crc_len:]
    if _crc_bytes(covered, use_crc32) != stored:
        kind = "CRC-32" if use_crc32 else "CRC-16"
        computed = _crc_bytes(covered, use_crc32).hex()
        raise FrameError(f"{kind} mismatch: frame says {stored.hex()}, computed {computed}", "bad_crc")
    if reserved != 0:
        raise FrameError(f"reserved byte is 0x{reserved:02x}, must be 0", "bad_header")
    if flags & ~FLAG_CRC32:
        raise FrameError(f"unknown flag bits 0x{flags & ~FLAG_CRC32:02x}", "bad_header")
    actual = len(covered) - HEADER_SIZE
    if length != actual:
        raise FrameError(f"length field says {length} payload bytes, body carries {actual}", "bad_length")
    if length > max_payload:
        raise FrameError(f"payload of {length} bytes exceeds the {max_payload}-byte maximum", "bad_length")
    if use_crc32 != (length > CRC16_MAX_PAYLOAD):
        want = "CRC-32" if length > CRC16_MAX_PAYLOAD else "CRC-16"
        have = "CRC-32" if use_crc32 else "CRC-16"
        raise FrameError(f"flag says {have} but a {length}-byte payload needs {want}", "bad_header")
    return Frame(version, type_, seq, covered[HEADER_SIZE:])


def decode_frame(encoded: bytes, *, max_payload: int = MAX_PAYLOAD) -> Frame:
    """One encoded frame, with or without its trailing 0x00 (tests, vectors). Raises FrameError."""
    encoded = bytes(encoded)
    if encoded.endswith(DELIMITER):
        encoded = encoded[:-1]
    return decode_body(cobs_decode(encoded), max_payload=max_payload)


@dataclass
class DecoderStats:
    frames: int = 0  # frames returned (any version)
    bad_crc: int = 0
    bad_length: int = 0
    bad_cobs: int = 0
    bad_header: int = 0
    overruns: int = 0  # runs of bytes longer than any frame without a 0x00
    bytes_discarded: int = 0  # encoded bytes of dropped frames and overruns (delimiters not counted)
    version_mismatches: int = 0  # returned frames whose version is not PROTOCOL_VERSION

    @property
    def dropped(self) -> int:
        return self.bad_crc + self.bad_length + self.bad_cobs + self.bad_header + self.overruns

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class FrameDecoder:
    """Incremental decoder: bytes in, valid frames out; never raises on input.

    - Resynchronises at the next 0x00: garbage before it becomes one dropped (counted) frame.
    - Empty frames (0x00 0x00) are ignored silently: a sender may lead with 0x00 to flush a receiver.
    - The buffer never exceeds `max_encoded_size(max_payload)` (2069 bytes for the 2048-byte maximum):
      a longer run without 0x00 cannot be a frame, so it is dropped (one overrun) and everything up to
      the next 0x00 is discarded.
    - Frames of another version are returned (see `decode_body`) and counted in
      `stats.version_mismatches`; callers answer them with ERROR BAD_VERSION as `error_replies` allows
      (never an ERROR frame, and at a bounded rate).
    - The last dropped frame's error is kept in `last_error` for logs.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.max_encoded = max_encoded_size(max_payload)
        self.stats = DecoderStats()
        self.last_error: FrameError | None = None
        self._buf = bytearray()
        self._discarding = False  # inside an overrun: drop until the next delimiter

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        """Forget a partial frame (e.g. after reopening the port); stats are kept."""
        self.stats.bytes_discarded += len(self._buf)
        self._buf.clear()
        self._discarding = False

    def feed(self, data: bytes) -> list[Frame]:
        data = bytes(data)
        frames: list[Frame] = []
        start, n = 0, len(data)
        while start < n:
            zero = data.find(0, start)
            end = n if zero < 0 else zero
            chunk_len = end - start
            if self._discarding:
                self.stats.bytes_discarded += chunk_len
            elif len(self._buf) + chunk_len > self.max_encoded:
                self.stats.overruns += 1
                self.stats.bytes_discarded += len(self._buf) + chunk_len
                self._buf.clear()
                self._discarding = True
            else:
                self._buf += data[start:end]
            if zero < 0:
                break
            if self._discarding:
                self._discarding = False
            elif self._buf:
                frame = self._complete(bytes(self._buf))
                self._buf.clear()
                if frame is not None:
                    frames.append(frame)
            start = zero + 1
        return frames

    def _complete(self, encoded: bytes) -> Frame | None:
        try:
            frame = decode_body(cobs_decode(encoded), max_payload=self.max_payload)
        except FrameError as exc:
            reason = exc.reason if exc.reason in ("bad_crc", "bad_length", "bad_cobs", "bad_header") else "bad_header"
            setattr(self.stats, reason, getattr(self.stats, reason) + 1)
            self.stats.bytes_discarded += len(encoded)
            self.last_error = exc
            return None
        self.stats.frames += 1
        if frame.version != PROTOCOL_VERSION:
            self.stats.version_mismatches += 1
        return frame
