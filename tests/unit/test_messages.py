"""Message payload codecs: round trips for every type, exact golden payloads, strict decoding."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.framing import Frame, FrameDecoder, FrameError, crc32, decode_frame, encode_frame
from firmware_bridge.messages import (
    Ack,
    ErrorCode,
    ErrorMsg,
    HeadBegin,
    HeadChunk,
    HeadCommit,
    Heartbeat,
    Hello,
    InferResult,
    Message,
    MessageError,
    MessageType,
    SensorWindow,
    choose_scale,
    decode_message,
    encode_message,
    error_code_for,
    head_push,
    to_frame,
    window_to_int16,
)

SAMPLES = np.array([[1, -2, 3, -4, 5, -6], [32767, -32768, 0, 7, 8, 9]], dtype=np.int16)
ALL: list[Message] = [
    Hello(sensor_rate_hz=50, free_ram=123456, arena_size=65536, board="nrf52840 ü"),
    SensorWindow(window_id=7, samples=SAMPLES, scale=0.01, label=3),
    SensorWindow(window_id=8, samples=np.zeros((100, 6), np.int16), scale=1.0),
    HeadBegin(head_id=2, total_len=3114, n_chunks=4, head_crc32=0xDEADBEEF),
    HeadChunk(head_id=2, index=3, data=b"\x00\x01" * 512),
    HeadCommit(head_id=2),
    Ack(acked_type=MessageType.HEAD_CHUNK, acked_seq=65535, status=0, index=3),
    InferResult(window_id=7, class_id=6, score=0.875, head_id=2),
    Heartbeat(uptime_ms=0xFFFFFFFF),
    ErrorMsg(ErrorCode.HEAD_CRC, "staged 3114 bytes, crc mismatch"),
    ErrorMsg(200, ""),  # a code from a newer peer survives as int
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_a_frame(msg: Message) -> None:
    frames = FrameDecoder().feed(to_frame(msg, seq=41))
    assert len(frames) == 1 and frames[0].seq == 41 and frames[0].type == msg.TYPE
    assert decode_message(frames[0]) == msg


def test_golden_payloads() -> None:
    assert encode_message(Heartbeat(10000)) == (0x08, bytes.fromhex("10270000"))
    assert encode_message(Ack(4, 0x0102, 6, 5)) == (0x06, bytes.fromhex("04 0201 06 0500"))
    assert encode_message(ErrorMsg(ErrorCode.NO_HEAD, "x")) == (0x09, b"\x07\x01x")
    assert encode_message(Hello(50, 1, 2, "ab")) == (0x01, bytes.fromhex("01 3200 01000000 02000000 02") + b"ab")
    assert encode_message(InferResult(1, 2, 0.5, 3)) == (0x07, bytes.fromhex("01000000 02 0000003f 03000000"))
    # SENSOR_WINDOW: id, n_samples, n_channels, label, scale f32, then sample-major s0c0 s0c1 s1c0 s1c1
    t, p = encode_message(SensorWindow(1, np.array([[1, 2], [3, -1]], np.int16), 0.5, -1))
    assert (t, p) == (0x02, bytes.fromhex("01000000 0200 02 ff 0000003f 0100 0200 0300 ffff"))


def test_floats_are_float32_at_construction_so_round_trips_are_exact() -> None:
    msg = InferResult(1, 0, 0.1, 1)
    assert msg.score == float(np.float32(0.1))
    assert decode_message(decode_frame(to_frame(msg, 0))) == msg


def _frame(type_: int, payload: bytes, version: int = 1) -> Frame:
    return Frame(version, type_, 0, payload)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_frame(0x08, b"\x00\x00\x00\x00", version=2), ErrorCode.BAD_VERSION),
        (_frame(0x42, b""), ErrorCode.UNKNOWN_TYPE),
        (_frame(0x08, b"\x00\x00\x00"), ErrorCode.BAD_LENGTH),
        (_frame(0x05, b"\x00" * 5), ErrorCode.BAD_LENGTH),
        (_frame(0x06, b"\x00" * 5), ErrorCode.BAD_LENGTH),
        (_frame(0x07, b"\x00" * 14), ErrorCode.BAD_LENGTH),
        (_frame(0x03, b"\x00" * 13), ErrorCode.BAD_LENGTH),
        (_frame(0x04, b"\x00" * 6), ErrorCode.BAD_LENGTH),  # empty chunk
        (_frame(0x04, b"\x00" * 6 + bytes(1025)), ErrorCode.BAD_LENGTH),
        (_frame(0x01, bytes.fromhex("01 3200 00000000 00000000 03") + b"ab"), ErrorCode.BAD_LENGTH),
        (_frame(0x01, bytes.fromhex("01 3200 00000000 00000000 02") + b"\xff\xfe"), ErrorCode.BAD_MESSAGE),
        (_frame(0x09, b"\x01\x02\xc3"), ErrorCode.BAD_LENGTH),
        (_frame(0x09, b"\x01\x01\xc3"), ErrorCode.BAD_MESSAGE),  # truncated UTF-8 sequence
        (_frame(0x02, struct.pack("<IHBbf", 1, 2, 3, -1, 1.0) + bytes(10)), ErrorCode.BAD_LENGTH),  # needs 12
        (_frame(0x02, struct.pack("<IHBbf", 1, 0, 3, -1, 1.0)), ErrorCode.BAD_MESSAGE),  # empty window
        (_frame(0x02, struct.pack("<IHBbf", 1, 1, 1, -1, float("nan")) + bytes(2)), ErrorCode.BAD_MESSAGE),
        (_frame(0x02, struct.pack("<IHBbf", 1, 1, 1, -1, -1.0) + bytes(2)), ErrorCode.BAD_MESSAGE),
        (_frame(0x02, b"\x01"), ErrorCode.BAD_LENGTH),
    ],
)
def test_malformed_payloads_raise_with_the_reply_code(frame: Frame, code: ErrorCode) -> None:
    with pytest.raises(MessageError) as info:
        decode_message(frame)
    assert info.value.code == code and error_code_for(info.value) == code
    assert isinstance(info.value, FrameError)


def test_error_code_for_frame_errors() -> None:
    assert error_code_for(FrameError("x", "bad_crc")) == ErrorCode.BAD_CRC
    assert error_code_for(FrameError("x", "bad_length")) == ErrorCode.BAD_LENGTH
    assert error_code_for(FrameError("x", "bad_cobs")) == ErrorCode.BAD_MESSAGE


def test_constructors_refuse_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError):
        SensorWindow(1, SAMPLES.astype(np.int32), 1.0)
    with pytest.raises(ValueError):
        SensorWindow(1, np.zeros((200, 6), np.int16), 1.0)  # 2412 bytes > 2048
    with pytest.raises(ValueError):
        HeadChunk(1, 0, b"")
    with pytest.raises(ValueError):
        Ack(1, 70000)
    with pytest.raises(ValueError):
        Hello(50, 0, 0, "x" * 256)
    long = ErrorMsg(1, "é" * 200)  # 400 UTF-8 bytes: cut at a character boundary
    assert len(long.detail.encode()) == 254 and decode_message(decode_frame(to_frame(long, 0))) == long


def test_head_push_splits_and_checksums() -> None:
    blob = bytes(range(256)) * 10
    begin, chunks, commit = head_push(9, blob)
    assert begin == HeadBegin(9, 2560, 3, crc32(blob)) and commit == HeadCommit(9)
    assert [c.index for c in chunks] == [0, 1, 2] and b"".join(c.data for c in chunks) == blob
    assert all(decode_message(decode_frame(to_frame(c, i))) == c for i, c in enumerate(chunks))


def test_float_windows_round_trip_with_saturation() -> None:
    rng = np.random.default_rng(0)
    window = (rng.standard_normal((100, 6)) * 9.81).astype(np.float32)
    msg = SensorWindow.from_float(3, window, label=2)
    assert np.abs(msg.to_float() - window).max() <= msg.scale / 2 + 1e-6
    assert np.abs(msg.samples).max() == 32767  # choose_scale uses the full range without clipping
    back = decode_message(decode_frame(to_frame(msg, 1)))
    assert isinstance(back, SensorWindow) and np.array_equal(back.to_float(), msg.to_float())
    q = window_to_int16(np.array([[1e9, -1e9, np.inf, -np.inf, 0.26, -0.26]]), 0.5)
    assert q.tolist() == [[32767, -32768, 32767, -32768, 1, -1]] and q.dtype == np.int16
    with pytest.raises(ValueError):
        window_to_int16(np.array([[np.nan]]), 1.0)
    assert choose_scale(np.zeros((2, 2))) == 1.0


@given(st.integers(0, 255), st.binary(max_size=300))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_fuzz_decode_message_raises_only_message_error(type_: int, payload: bytes) -> None:
    try:
        msg = decode_message(Frame(1, type_, 0, payload))
    except MessageError:
        return
    assert encode_message(msg) == (type_, payload)  # whatever decodes re-encodes byte for byte


def test_decode_message_checks_the_version_this_side_speaks() -> None:
    v2 = FrameDecoder().feed(encode_frame(MessageType.HEARTBEAT, 3, struct.pack("<I", 7), version=2))[0]
    assert decode_message(v2, version=2) == Heartbeat(7)
    with pytest.raises(MessageError, match="protocol version 2, this side speaks 1") as info:
        decode_message(v2)
    assert info.value.code == ErrorCode.BAD_VERSION
    v1 = FrameDecoder().feed(to_frame(Heartbeat(7), 3))[0]
    with pytest.raises(MessageError, match="protocol version 1, this side speaks 2"):
        decode_message(v1, version=2)
