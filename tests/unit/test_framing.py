"""Serial framing: golden vectors, every drop reason, resync, bounded buffer, bit flips, fuzz."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge.framing import (
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameError,
    cobs_decode,
    cobs_encode,
    crc16_ccitt,
    crc32,
    decode_body,
    decode_frame,
    encode_body,
    encode_frame,
    max_encoded_size,
)

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Wikipedia "Consistent Overhead Byte Stuffing", encoding examples 1-10 (delimiter not included).
COBS_VECTORS = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
    (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255))),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    (bytes(range(3, 256)) + b"\x00\x01", b"\xfe" + bytes(range(3, 256)) + b"\x02\x01"),
]


@pytest.mark.parametrize(("raw", "encoded"), COBS_VECTORS)
def test_cobs_matches_the_reference_examples(raw: bytes, encoded: bytes) -> None:
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


def test_cobs_empty_and_invalid() -> None:
    assert cobs_encode(b"") == b"\x01"
    assert cobs_decode(b"\x01") == b""
    for bad in (b"", b"\x05\x11", b"\x02\x00", b"\x03\x11\x00"):
        with pytest.raises(FrameError) as info:
            cobs_decode(bad)
        assert info.value.reason == "bad_cobs"


def test_crc_check_values() -> None:
    assert crc16_ccitt(b"123456789") == 0x29B1
    assert crc32(b"123456789") == 0xCBF43926
    assert crc16_ccitt(b"") == 0xFFFF


def _crc16_bitwise(data: bytes) -> int:
    """CRC-16/CCITT-FALSE straight from its definition, bit by bit (as the C firmware computes it)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


@given(st.binary(max_size=600))
@FUZZ
def test_crc16_agrees_with_an_independent_implementation(data: bytes) -> None:
    # crc16_ccitt is binascii.crc_hqx(data, 0xFFFF); this checks that it is the CRC the spec defines.
    assert crc16_ccitt(data) == _crc16_bitwise(data)


def test_golden_frame_bytes() -> None:
    # HEARTBEAT (0x08), seq 0x0102, payload uptime_ms = 10000 (10 27 00 00).
    # body = 01 08 02 01 04 00 00 00 | 10 27 00 00 | CRC-16 0x0737 as 37 07
    # COBS runs: [01 08 02 01 04]0 []0 []0 [10 27]0 []0 [37 07]  -> codes 06 01 01 03 01 03
    frame = encode_frame(0x08, 0x0102, bytes.fromhex("10270000"))
    assert frame == bytes.fromhex("06 01 08 02 01 04 01 01 03 10 27 01 03 37 07 00")
    assert decode_frame(frame) == Frame(1, 0x08, 0x0102, bytes.fromhex("10270000"))


@pytest.mark.parametrize(("length", "crc_len"), [(0, 2), (255, 2), (256, 2), (257, 4), (MAX_PAYLOAD, 4)])
def test_crc16_up_to_256_bytes_then_crc32(length: int, crc_len: int) -> None:
    payload = bytes((i * 7 + 1) % 256 for i in range(length))
    body = encode_body(0x02, 9, payload)
    assert len(body) == 8 + length + crc_len
    assert body[6] == (1 if crc_len == 4 else 0)
    covered = body[:-crc_len]
    expected = struct.pack("<I", crc32(covered)) if crc_len == 4 else struct.pack("<H", crc16_ccitt(covered))
    assert body[-crc_len:] == expected
    assert decode_frame(encode_frame(0x02, 9, payload)).payload == payload


def test_encoder_refuses_oversized_payload_and_wraps_seq() -> None:
    with pytest.raises(FrameError):
        encode_frame(1, 0, bytes(MAX_PAYLOAD + 1))
    assert decode_frame(encode_frame(1, 0x10005, b"")).seq == 5


def test_largest_frame_fits_the_decoder_buffer() -> None:
    frame = encode_frame(0x02, 1, b"\x01" * MAX_PAYLOAD)  # no zeros: maximal COBS overhead in payload
    assert len(frame) - 1 <= max_encoded_size()
    assert FrameDecoder().feed(frame)[0].payload == b"\x01" * MAX_PAYLOAD


def _with_crc(header_and_payload: bytes, use_crc32: bool) -> bytes:
    if use_crc32:
        return header_and_payload + struct.pack("<I", crc32(header_and_payload))
    return header_and_payload + struct.pack("<H", crc16_ccitt(header_and_payload))


@pytest.mark.parametrize(
    ("body", "reason", "text"),
    [
        (b"\x01\x08\x00", "bad_length", "shorter than header"),
        (b"\x01" * 9 + b"\x00", "bad_length", "shorter than header"),
        (encode_body(1, 1, b"abc")[:-1] + b"\x00", "bad_crc", "CRC-16 mismatch"),
        (encode_body(1, 1, bytes(300))[:-1] + b"\x00", "bad_crc", "CRC-32 mismatch"),
        (_with_crc(struct.pack("<BBHHBB", 1, 1, 0, 3, 0, 7) + b"abc", False), "bad_header", "reserved"),
        (_with_crc(struct.pack("<BBHHBB", 1, 1, 0, 3, 2, 0) + b"abc", False), "bad_header", "unknown flag"),
        (_with_crc(struct.pack("<BBHHBB", 1, 1, 0, 4, 0, 0) + b"abc", False), "bad_length", "says 4"),
        (_with_crc(struct.pack("<BBHHBB", 1, 1, 0, 3, 1, 0) + b"abc", True), "bad_header", "needs CRC-16"),
        (_with_crc(struct.pack("<BBHHBB", 1, 1, 0, 300, 0, 0) + bytes(300), False), "bad_header", "needs CRC-32"),
        (_with_crc(struct.pack("<BBHHBB", 1, 1, 0, 2049, 1, 0) + bytes(2049), True), "bad_length", "exceeds"),
    ],
)
def test_decode_body_names_the_reason(body: bytes, reason: str, text: str) -> None:
    with pytest.raises(FrameError, match=text) as info:
        decode_body(body)
    assert info.value.reason == reason
    decoder = FrameDecoder()
    assert decoder.feed(cobs_encode(body) + b"\x00") == []
    assert getattr(decoder.stats, reason) == 1 and decoder.stats.frames == 0
    assert decoder.stats.bytes_discarded == len(cobs_encode(body))


def test_other_versions_are_returned_and_counted_not_dropped() -> None:
    decoder = FrameDecoder()
    frames = decoder.feed(encode_frame(1, 3, b"hi", version=2))
    assert frames == [Frame(2, 1, 3, b"hi")]
    assert decoder.stats.version_mismatches == 1 and decoder.stats.frames == 1


def test_byte_by_byte_feeding_and_empty_frames() -> None:
    stream = b"\x00\x00" + encode_frame(1, 1, b"a") + b"\x00" + encode_frame(2, 2, bytes(400))
    decoder = FrameDecoder()
    out = [f for i in range(len(stream)) for f in decoder.feed(stream[i:i + 1])]
    assert [(f.type, f.seq) for f in out] == [(1, 1), (2, 2)]
    assert decoder.stats.dropped == 0 and decoder.buffered == 0


def test_resync_after_garbage_and_truncation() -> None:
    good = encode_frame(8, 5, b"\x01\x02\x03\x04")
    truncated = encode_frame(8, 4, b"\x09\x09\x09\x09")[:6]  # sender reset mid-frame
    decoder = FrameDecoder()
    frames = decoder.feed(b"\xde\xad\xbe\xef" + b"\x00" + truncated + good + good)
    # truncated + good form one corrupt frame (no delimiter between them): dropped, then we are in sync.
    assert [f.seq for f in frames] == [5]
    assert decoder.stats.frames == 1 and decoder.stats.dropped == 2


def test_the_protocol_states_the_real_buffer_bound() -> None:
    # 8-byte header + 2048-byte payload + 4-byte CRC-32 = 2060 bytes, + 9 COBS code bytes (one per
    # started 254-byte run) = 2069: the longest run without 0x00 that can still be a frame.
    assert max_encoded_size() == 2069 == FrameDecoder().max_encoded
    spec = (ROOT / "firmware_bridge" / "PROTOCOL.md").read_text(encoding="utf-8")
    assert "holds at most 2069 encoded bytes" in spec
    decoder = FrameDecoder()
    assert decoder.feed(b"\x01" * 2069) == [] and decoder.buffered == 2069 and decoder.stats.overruns == 0
    assert decoder.feed(b"\x01") == [] and decoder.buffered == 0 and decoder.stats.overruns == 1


def test_buffer_is_bounded_and_overrun_counted() -> None:
    decoder = FrameDecoder()
    junk = b"\x55" * 10_000
    for i in range(0, len(junk), 777):
        assert decoder.feed(junk[i:i + 777]) == []
        assert decoder.buffered <= max_encoded_size()
    assert decoder.stats.overruns == 1
    # The tail of an overrun is not mistaken for a frame start: the 0x00 ends the discard...
    assert decoder.feed(b"\x00") == [] and decoder.stats.dropped == 1
    assert decoder.stats.bytes_discarded == len(junk)
    # ...and the next frame decodes.
    assert decoder.feed(encode_frame(8, 1, b"\x00" * 4))[0].seq == 1


def _check_every_bit_flip_is_rejected(frame: bytes, original: Frame) -> None:
    for pos in range(len(frame) - 1):  # the delimiter's own flips are covered by merging below
        for bit in range(8):
            mangled = bytearray(frame)
            mangled[pos] ^= 1 << bit
            decoder = FrameDecoder()
            got = decoder.feed(b"\x00" + bytes(mangled) + b"\x00")
            assert got in ([], [original]), f"bit {bit} of byte {pos} gave {got}"
            assert got == [] and decoder.stats.dropped >= 1  # a flipped frame is never accepted


@pytest.mark.parametrize("length", [0, 4, 200, 256, 257, 600])
def test_single_bit_flips_are_never_accepted(length: int) -> None:
    payload = bytes((i * 37) % 256 for i in range(length))  # has zeros: COBS code bytes get flipped too
    frame = encode_frame(0x04, 77, payload)
    _check_every_bit_flip_is_rejected(frame, Frame(1, 0x04, 77, payload))


def _check_frames_are_genuine(frames: list[Frame]) -> None:
    for f in frames:
        # A returned frame re-encodes to a body whose CRC verifies: never a frame with a wrong CRC.
        assert decode_body(encode_body(f.type, f.seq, f.payload, version=f.version)) == f
        assert len(f.payload) <= MAX_PAYLOAD


@given(st.lists(st.binary(max_size=3000), max_size=6))
@FUZZ
def test_fuzz_random_bytes_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        _check_frames_are_genuine(decoder.feed(chunk))
        assert decoder.buffered <= max_encoded_size()


frames_st = st.tuples(st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=700))


@given(st.lists(st.tuples(frames_st, st.binary(max_size=40)), min_size=1, max_size=5), st.integers(1, 64))
@FUZZ
def test_fuzz_frames_between_junk_are_all_recovered(items: list[tuple[tuple[int, int, bytes], bytes]],
                                                    step: int) -> None:
    # Junk, then 0x00, then a frame: every frame must come out, whatever the junk and the chunking.
    stream = b"".join(junk + b"\x00" + encode_frame(t, s, p) for (t, s, p), junk in items)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(0, len(stream), step):
        out += decoder.feed(stream[i:i + step])
    expected = [Frame(PROTOCOL_VERSION, t, s, p) for (t, s, p), _ in items]
    # Junk may, with negligible probability, itself decode; the real frames must be there in order.
    it = iter(out)
    assert all(any(f == e for f in it) for e in expected)
    _check_frames_are_genuine(out)


@given(frames_st, st.data())
@FUZZ
def test_fuzz_truncations_and_bit_flips(frame_args: tuple[int, int, bytes], data: st.DataObject) -> None:
    t, s, p = frame_args
    frame = encode_frame(t, s, p)
    original = Frame(PROTOCOL_VERSION, t, s, p)
    cut = data.draw(st.integers(0, len(frame) - 2))
    decoder = FrameDecoder()
    assert decoder.feed(frame[:cut] + b"\x00") == []  # a truncated frame is dropped...
    assert decoder.feed(frame) == [original]  # ...and the decoder is back in sync
    flips = data.draw(st.lists(st.integers(0, 8 * (len(frame) - 1) - 1), min_size=1, max_size=3, unique=True))
    mangled = bytearray(frame)
    for f in flips:
        mangled[f // 8] ^= 1 << (f % 8)
    got = FrameDecoder().feed(b"\x00" + bytes(mangled) + b"\x00")
    _check_frames_are_genuine(got)
    if len(flips) == 1:  # CRC-16/32 detect every 1-bit error; COBS damage is caught by CRC or length
        assert got == []
