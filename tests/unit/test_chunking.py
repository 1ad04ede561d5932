"""Chunking: split, parse, reassemble out of order with duplicates; bounded memory; fuzzing."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.codec.chunking import (
    HEADER_SIZE,
    ChunkError,
    ChunkHeader,
    Reassembler,
    parse_chunk,
    split_message,
)
from edge_agent.codec.tensor_pack import CodecError

ID_A, ID_B, ID_C = b"A" * 16, b"B" * 16, b"C" * 16


def _chunk(mid: bytes, index: int, count: int, total: int, data: bytes, *, magic: bytes = b"EFLC",
           version: int = 1) -> bytes:
    return magic + struct.pack("<B16sIII", version, mid, index, count, total) + data


def test_golden_chunk_layout() -> None:
    chunks = split_message(b"hello world", message_id=ID_A, max_chunk_bytes=HEADER_SIZE + 4)
    assert HEADER_SIZE == 33
    assert chunks[0] == b"EFLC\x01" + ID_A + bytes.fromhex("00000000" "03000000" "0b000000") + b"hell"
    assert [c[HEADER_SIZE:] for c in chunks] == [b"hell", b"o wo", b"rld"]
    assert parse_chunk(chunks[2]) == (ChunkHeader(ID_A, 2, 3, 11), b"rld")


@pytest.mark.parametrize("size", [0, 1, 67, 100, 101, 1000])
def test_chunks_fit_the_limit_and_reassemble_shuffled_and_duplicated(size: int) -> None:
    data = random.Random(size).randbytes(size)
    chunks = split_message(data, message_id=ID_A, max_chunk_bytes=100)
    assert all(len(c) <= 100 for c in chunks)
    assert len(chunks) == max(1, -(-size // (100 - HEADER_SIZE)))
    delivery = chunks + chunks[: len(chunks) // 2]  # QoS 1 redelivers some
    random.Random(1).shuffle(delivery)
    r = Reassembler(max_message_bytes=size)
    results = [r.feed(c, now=0.0) for c in delivery]
    assert [m for m in results if m is not None] == [data]  # exactly once, even with redeliveries after it
    r.expire(now=61.0)  # redeliveries after completion started a partial message that times out
    assert r.pending == 0 and r.buffered_bytes == 0


def test_single_chunk_message_is_returned_at_once_and_holds_nothing() -> None:
    (chunk,) = split_message(b"tiny", message_id=ID_A, max_chunk_bytes=1000)
    r = Reassembler(max_message_bytes=100)
    assert r.feed(chunk, now=0.0) == b"tiny"
    assert r.feed(chunk, now=1.0) == b"tiny"  # a redelivery: the receiver dedupes whole messages by update id
    assert r.pending == 0


def test_a_redelivery_after_completion_starts_a_partial_that_expires() -> None:
    chunks = split_message(b"x" * 20, message_id=ID_A, max_chunk_bytes=HEADER_SIZE + 10)
    r = Reassembler(max_message_bytes=100, timeout_s=5.0)
    assert [r.feed(c, now=0.0) for c in chunks] == [None, b"x" * 20]
    assert r.feed(chunks[0], now=1.0) is None and r.pending == 1
    assert r.expire(now=7.0) == [ID_A] and r.pending == 0


def test_interleaved_messages() -> None:
    a, b = b"a" * 250, b"b" * 180
    ca = split_message(a, message_id=ID_A, max_chunk_bytes=HEADER_SIZE + 50)
    cb = split_message(b, message_id=ID_B, max_chunk_bytes=HEADER_SIZE + 60)
    r = Reassembler(max_message_bytes=1000)
    out = [r.feed(c, now=0.0) for pair in zip(ca, cb + [cb[0]] * 2) for c in pair]
    assert [m for m in out if m is not None] == [b, a]
    assert r.pending == 1  # cb[0] redelivered after b completed: a partial message, until it expires
    assert r.expire(now=61.0) == [ID_B]


def test_eviction_keeps_at_most_max_pending_and_counts() -> None:
    r = Reassembler(max_message_bytes=100, max_pending=2)
    firsts = [split_message(b"x" * 20, message_id=bytes([i]) * 16, max_chunk_bytes=HEADER_SIZE + 10)
              for i in range(3)]
    for t, chunks in enumerate(firsts):
        assert r.feed(chunks[0], now=float(t)) is None
    assert (r.pending, r.evicted, r.buffered_bytes) == (2, 1, 20)
    assert r.feed(firsts[0][1], now=3.0) is None  # message 0 was the oldest: evicted, starts over
    assert (r.pending, r.evicted) == (2, 2)
    assert r.feed(firsts[2][1], now=4.0) == b"x" * 20  # the newest survived
    assert r.expire(now=4.0) == [bytes([0]) * 16, bytes([1]) * 16]  # evicted ids are reported once
    assert r.expire(now=4.0) == []


def test_expiry_drops_old_partial_messages() -> None:
    r = Reassembler(max_message_bytes=100, timeout_s=10.0)
    ca = split_message(b"a" * 30, message_id=ID_A, max_chunk_bytes=HEADER_SIZE + 10)
    cb = split_message(b"b" * 30, message_id=ID_B, max_chunk_bytes=HEADER_SIZE + 10)
    r.feed(ca[0], now=0.0)
    r.feed(cb[0], now=5.0)
    assert r.expire(now=10.0) == []  # not older than timeout_s yet
    assert r.expire(now=10.5) == [ID_A]
    assert r.pending == 1
    assert r.feed(cb[1], now=11.0) is None and r.feed(cb[2], now=11.0) == b"b" * 30
    assert r.expire(now=100.0) == [] and r.pending == 0


def test_bounds_message_size() -> None:
    r = Reassembler(max_message_bytes=99)
    chunks = split_message(b"z" * 100, message_id=ID_A, max_chunk_bytes=60)
    with pytest.raises(ChunkError, match="message of 100 bytes exceeds the 99-byte limit"):
        r.feed(chunks[0], now=0.0)
    assert r.pending == 0


@pytest.mark.parametrize("chunk, message", [
    (b"EFLC\x01", "truncated: 5 bytes, expected at least 33"),
    (_chunk(ID_A, 0, 1, 1, b"x", magic=b"EFLX"), "magic"),
    (_chunk(ID_A, 0, 1, 1, b"x", version=2), "version 2"),
    (_chunk(ID_A, 3, 3, 9, b"xxx"), "index 3 is not below count 3"),
    (_chunk(ID_A, 0, 0, 9, b"xxx"), "index 0 is not below count 0"),
    (_chunk(ID_A, 0, 5, 4, b"x"), "5 chunks cannot carry a 4-byte message"),
    (_chunk(ID_A, 0, 1, 4, b"xyz"), "the only chunk carries 3 bytes of a 4-byte message"),
    (_chunk(ID_A, 0, 2, 4, b"wxyz"), "1 chunks of 4 bytes do not fit a 4-byte message"),
    (_chunk(ID_A, 0, 2, 4, b""), "1 chunks of 0 bytes"),
    (_chunk(ID_A, 1, 2, 4, b"wxyz"), "the last chunk's 4 bytes do not fit"),
])
def test_malformed_chunks(chunk: bytes, message: str) -> None:
    with pytest.raises(ChunkError, match=message):
        parse_chunk(chunk)
    with pytest.raises(ChunkError, match=message):
        Reassembler(max_message_bytes=100).feed(chunk, now=0.0)


@pytest.mark.parametrize("second, message", [
    (_chunk(ID_A, 1, 4, 10, b"abc"), "count 4 / total length 10 contradict earlier chunks \\(3 / 10\\)"),
    (_chunk(ID_A, 1, 3, 11, b"abc"), "contradict earlier chunks"),
    (_chunk(ID_A, 0, 3, 10, b"abX"), "received twice with different data"),
    (_chunk(ID_A, 0, 3, 10, b"abcd"), "received twice with different data"),
    (_chunk(ID_A, 1, 3, 10, b"ab"), "2 data bytes, the message's other chunks have 3"),
    (_chunk(ID_A, 2, 3, 10, b"ab"), "the last chunk has 2 data bytes, chunks of 3 leave 4"),
])
def test_chunks_contradicting_earlier_ones_are_refused_and_the_message_kept(second: bytes, message: str) -> None:
    r = Reassembler(max_message_bytes=100)
    assert r.feed(_chunk(ID_A, 0, 3, 10, b"abc"), now=0.0) is None
    with pytest.raises(ChunkError, match=message):
        r.feed(second, now=0.0)
    assert (r.pending, r.buffered_bytes) == (1, 3)
    assert r.feed(_chunk(ID_A, 1, 3, 10, b"def"), now=0.0) is None
    assert r.feed(_chunk(ID_A, 2, 3, 10, b"ghij"), now=0.0) == b"abcdefghij"


def test_last_chunk_first_is_checked_when_the_chunk_size_becomes_known() -> None:
    r = Reassembler(max_message_bytes=100)
    assert r.feed(_chunk(ID_A, 2, 3, 10, b"ab"), now=0.0) is None  # fits some chunk size? not yet known
    with pytest.raises(ChunkError, match="chunk size 3 contradicts the last chunk's 2 bytes"):
        r.feed(_chunk(ID_A, 0, 3, 10, b"abc"), now=0.0)
    assert r.feed(_chunk(ID_A, 0, 3, 10, b"abcd"), now=0.0) is None
    assert r.feed(_chunk(ID_A, 1, 3, 10, b"efgh"), now=0.0) == b"abcdefghab"


def test_split_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        split_message(b"x", message_id=b"short", max_chunk_bytes=100)
    with pytest.raises(ValueError, match="no room"):
        split_message(b"x", message_id=ID_A, max_chunk_bytes=HEADER_SIZE)
    with pytest.raises(ValueError):
        Reassembler(max_message_bytes=10, max_pending=0)


def test_chunk_error_is_a_codec_error() -> None:
    assert issubclass(ChunkError, CodecError) and issubclass(ChunkError, ValueError)


# --- fuzzing --------------------------------------------------------------------------------------

MAX_MESSAGE, MAX_PENDING = 300, 4


def _good_chunks(draw: st.DrawFn) -> list[bytes]:
    size = draw(st.integers(0, 400))
    mid = draw(st.sampled_from([ID_A, ID_B, ID_C, b"D" * 16, b"E" * 16]))
    return split_message(bytes(size), message_id=mid, max_chunk_bytes=draw(st.integers(HEADER_SIZE + 1, 120)))


@st.composite
def _deliveries(draw: st.DrawFn) -> list[bytes]:
    """Valid chunks of several messages, some damaged, plus plausible forgeries and raw noise, in any order."""
    out: list[bytes] = []
    for _ in range(draw(st.integers(1, 4))):
        out += _good_chunks(draw)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 2))
        if kind == 0:  # a damaged valid chunk
            c = bytearray(draw(st.sampled_from([c for c in out if c])))
            c[draw(st.integers(0, len(c) - 1))] ^= draw(st.integers(1, 255))
            out.append(bytes(c))
        elif kind == 1:  # a well-formed header with arbitrary numbers
            out.append(_chunk(draw(st.sampled_from([ID_A, ID_B])), draw(st.integers(0, 5)), draw(st.integers(0, 5)),
                              draw(st.integers(0, 500)), draw(st.binary(max_size=80))))
        else:
            out.append(draw(st.binary(max_size=80)))
    return draw(st.permutations(out))


@settings(max_examples=300, deadline=None)
@given(_deliveries(), st.lists(st.floats(0, 5), min_size=1, max_size=5))
def test_fuzz_feed_raises_only_chunk_error_and_stays_bounded(deliveries: list[bytes], steps: list[float]) -> None:
    r = Reassembler(max_message_bytes=MAX_MESSAGE, max_pending=MAX_PENDING, timeout_s=3.0)
    now = 0.0
    for i, chunk in enumerate(deliveries):
        now += steps[i % len(steps)]
        try:
            message = r.feed(chunk, now)
        except ChunkError:
            message = None
        assert message is None or len(message) <= MAX_MESSAGE
        assert r.pending <= MAX_PENDING
        assert r.buffered_bytes <= MAX_PENDING * MAX_MESSAGE
        if i % 3 == 2:
            r.expire(now)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(noise: bytes) -> None:
    r = Reassembler(max_message_bytes=100, max_pending=2)
    for data in (noise, b"EFLC\x01" + noise):
        try:
            assert r.feed(data, now=0.0) is None or len(data) <= 100 + HEADER_SIZE
        except ChunkError:
            pass
    assert r.pending <= 2


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=500), st.integers(HEADER_SIZE + 1, 200), st.randoms(use_true_random=False))
def test_fuzz_round_trip(data: bytes, limit: int, rnd: random.Random) -> None:
    chunks = split_message(data, message_id=ID_A, max_chunk_bytes=limit)
    assert all(len(c) <= limit for c in chunks)
    rnd.shuffle(chunks)
    r = Reassembler(max_message_bytes=len(data))
    out = [m for c in chunks if (m := r.feed(c, now=0.0)) is not None]
    assert out == [data]


# --- limits per source and overall ----------------------------------------------------------------------

def _first_halves(n: int, size: int = 20) -> list[tuple[bytes, list[bytes]]]:
    return [(bytes([i]) * 16, split_message(bytes([i]) * size, message_id=bytes([i]) * 16,
                                            max_chunk_bytes=HEADER_SIZE + size // 2)) for i in range(n)]


def test_a_source_over_its_pending_limit_loses_its_own_oldest_not_anothers() -> None:
    r = Reassembler(max_message_bytes=100, max_pending_per_source=2)
    msgs = _first_halves(4)
    r.feed(msgs[0][1][0], now=0.0, source="honest")
    for _, chunks in msgs[1:]:
        r.feed(chunks[0], now=1.0, source="flooder")
    dropped = r.take_dropped()
    assert [(d.message_id, d.source, d.reason, d.held_bytes) for d in dropped] == [
        (msgs[1][0], "flooder", "source_pending", 10)]
    assert r.take_dropped() == [] and r.dropped_total["source_pending"] == 1
    assert r.feed(msgs[0][1][1], now=2.0, source="honest") == bytes([0]) * 20  # the honest message survived


def test_a_source_over_its_byte_limit_and_the_overall_cap_drop_and_count() -> None:
    r = Reassembler(max_message_bytes=100, max_bytes_per_source=25, max_buffered_bytes=40)
    msgs = _first_halves(6)
    for _, chunks in msgs[:3]:
        r.feed(chunks[0], now=0.0, source="a")  # 10 bytes each: the third pushes "a" past 25
    assert [d.reason for d in r.take_dropped()] == ["source_bytes"] and r.buffered_bytes == 20
    for mid, chunks in msgs[3:]:
        r.feed(chunks[0], now=1.0, source=mid.hex())  # three other sources: 50 bytes > 40 overall
    assert [d.reason for d in r.take_dropped()] == ["over_bytes"] and r.buffered_bytes == 40
    assert r.buffered_bytes <= r.max_buffered_bytes and r.evicted == 2


def test_a_message_larger_than_a_sources_limit_is_dropped_whole() -> None:
    r = Reassembler(max_message_bytes=100, max_bytes_per_source=15)
    chunks = split_message(b"q" * 30, message_id=ID_A, max_chunk_bytes=HEADER_SIZE + 10)
    assert r.feed(chunks[0], now=0.0, source="a") is None and r.pending == 1
    assert r.feed(chunks[1], now=0.0, source="a") is None  # would hold 20 > 15: the message goes
    assert r.pending == 0 and [d.reason for d in r.take_dropped()] == ["source_bytes"]


def test_chunks_of_one_message_from_two_sources_are_refused() -> None:
    r = Reassembler(max_message_bytes=100)
    chunks = split_message(b"q" * 30, message_id=ID_A, max_chunk_bytes=HEADER_SIZE + 10)
    r.feed(chunks[0], now=0.0, source="a")
    with pytest.raises(ChunkError, match="earlier chunks came from 'a'"):
        r.feed(chunks[1], now=0.0, source="b")


@settings(max_examples=200, deadline=None)
@given(_deliveries(), st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5))
def test_fuzz_limits_hold_with_many_sources(deliveries: list[bytes], sources: list[str]) -> None:
    r = Reassembler(max_message_bytes=MAX_MESSAGE, max_pending=MAX_PENDING, timeout_s=3.0, max_buffered_bytes=150,
                    max_pending_per_source=2, max_bytes_per_source=100)
    for i, chunk in enumerate(deliveries):
        try:
            r.feed(chunk, float(i), source=sources[i % len(sources)])
        except ChunkError:
            pass
        assert r.buffered_bytes <= 150 and r.pending <= MAX_PENDING
        assert r.buffered_bytes == sum(p.received for p in r._partial.values())
        assert all(len(m) <= 2 for m in r._by_source.values())
