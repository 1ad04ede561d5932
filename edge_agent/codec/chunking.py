"""Split a message into chunks that fit the broker's packet limit, and put them back together.

Chunk layout (all integers little-endian), 33 bytes of header then data::

    offset  size  field
    ------  ----  --------------------------------------------------------------
         0     4  magic b"EFLC"
         4     1  version, u8 (1)
         5    16  message id (the same in every chunk of one message)
        21     4  index, u32 (0 .. count - 1)
        25     4  count, u32 (>= 1)
        29     4  total length of the message, u32
        33     -  data: bytes [index * n, index * n + len(data)) of the message, n = data size of chunk 0

Every chunk but the last carries the same number of bytes (at least one), so a chunk's place in the
message follows from its index. Chunks carry no checksum of their own: the envelope inside carries a
SHA-256 of the whole message.

`Reassembler` is pure (time is an argument, no clocks, no threads) and bounded: at most `max_pending`
partial messages of at most `max_message_bytes` each, at most `max_buffered_bytes` held in all, and limits
per source (the device a chunk's topic names); what does not fit is evicted, counted and reported.
MQTT QoS 1 delivers at least once, so a chunk already held is ignored. A redelivery that arrives after
its message completed starts a new partial message that times out; a single-chunk message is returned
again. Either way the receiver deduplicates whole messages (the envelope's update id).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from .tensor_pack import CodecError

MAGIC = b"EFLC"
VERSION = 1
HEADER = struct.Struct("<4sB16sIII")
HEADER_SIZE = HEADER.size  # 33
ID_SIZE = 16
MAX_U32 = 2**32 - 1


class ChunkError(CodecError):
    """A chunk that is malformed or contradicts earlier chunks of its message."""


@dataclass(frozen=True)
class ChunkHeader:
    message_id: bytes
    index: int
    count: int
    total_len: int


def split_message(data: bytes, *, message_id: bytes, max_chunk_bytes: int) -> list[bytes]:
    """Cut `data` into chunks of at most `max_chunk_bytes` each, header included.

    `max_chunk_bytes` is what one MQTT payload may carry: leave room for the topic and properties
    below the broker's packet limit. An empty message is one chunk with no data.
    """
    if not isinstance(message_id, bytes) or len(message_id) != ID_SIZE:
        raise ValueError(f"message_id must be {ID_SIZE} bytes")
    if max_chunk_bytes <= HEADER_SIZE:
        raise ValueError(f"max_chunk_bytes = {max_chunk_bytes} leaves no room for data after the "
                         f"{HEADER_SIZE}-byte chunk header")
    if len(data) > MAX_U32:
        raise ValueError(f"message of {len(data)} bytes exceeds the format's u32 length")
    step = max_chunk_bytes - HEADER_SIZE
    count = max(1, -(-len(data) // step))
    view = memoryview(data)
    return [HEADER.pack(MAGIC, VERSION, message_id, i, count, len(data)) + view[i * step:(i + 1) * step]
            for i in range(count)]


def parse_chunk(chunk: bytes) -> tuple[ChunkHeader, bytes]:
    """Read one chunk's header and data; raises ChunkError if it cannot belong to any valid message."""
    if not isinstance(chunk, (bytes, bytearray, memoryview)):
        raise ChunkError(f"a chunk is bytes, not {type(chunk).__name__}")
    chunk = bytes(chunk)
    if len(chunk) < HEADER_SIZE:
        raise ChunkError(f"chunk truncated: {len(chunk)} bytes, expected at least {HEADER_SIZE} (the header)")
    magic, version, message_id, index, count, total_len = HEADER.unpack_from(chunk)
    if magic != MAGIC:
        raise ChunkError(f"not a chunk: magic {magic!r} at offset 0, expected {MAGIC!r}")
    if version != VERSION:
        raise ChunkError(f"chunk version {version} (offset 4) is not supported; this build reads version {VERSION}")
    data = chunk[HEADER_SIZE:]
    where = f"chunk {index} of message {message_id.hex()}"
    if count == 0 or index >= count:
        raise ChunkError(f"{where}: index {index} is not below count {count}")
    if count > max(1, total_len):  # every chunk carries at least one byte, except the one of an empty message
        raise ChunkError(f"{where}: {count} chunks cannot carry a {total_len}-byte message")
    if count == 1:
        if len(data) != total_len:
            raise ChunkError(f"{where}: the only chunk carries {len(data)} bytes of a {total_len}-byte message")
    elif index < count - 1:
        if not data or len(data) * (count - 1) >= total_len:  # the last chunk must still get a byte
            raise ChunkError(f"{where}: {count - 1} chunks of {len(data)} bytes do not fit a "
                             f"{total_len}-byte message")
    elif not 1 <= len(data) <= total_len - (count - 1):
        raise ChunkError(f"{where}: the last chunk's {len(data)} bytes do not fit a {total_len}-byte message "
                         f"after {count - 1} chunks of at least one byte")
    return ChunkHeader(message_id, index, count, total_len), data


@dataclass
class _Partial:
    started: float
    count: int
    total_len: int
    source: str
    chunks: dict[int, bytes] = field(default_factory=dict)
    received: int = 0  # data bytes held in `chunks`
    step: int | None = None  # data size of every chunk but the last, once a non-last chunk is seen


# Why a partial message was dropped: a bounded label set (the aggregator's metrics use them as labels).
EXPIRED = "expired"  # its other chunks did not arrive within timeout_s
OVER_PENDING = "over_pending"  # more partial messages in flight than max_pending (all sources together)
OVER_BYTES = "over_bytes"  # the bytes held by all partial messages would exceed max_buffered_bytes
SOURCE_PENDING = "source_pending"  # its source has more partial messages in flight than max_pending_per_source
SOURCE_BYTES = "source_bytes"  # its source holds more partial bytes than max_bytes_per_source
DROP_REASONS = (EXPIRED, OVER_PENDING, OVER_BYTES, SOURCE_PENDING, SOURCE_BYTES)


@dataclass(frozen=True)
class Dropped:
    """A partial message given up on: what, whose, why, and how many data bytes it held."""

    message_id: bytes
    source: str
    reason: str
    held_bytes: int


class Reassembler:
    """Collects chunks per message id and returns each message once its last missing chunk arrives.

    Every partial message ends exactly one way: returned by `feed` when complete, or dropped (timed out
    in `expire`, or evicted by `feed` to keep within the limits) and then reported once by `take_dropped`
    (and, by id, by `expire`). Memory is bounded whatever arrives: at most `max_pending` partial messages
    holding at most `max_buffered_bytes` data bytes, and per source (the device its topic names) at most
    `max_pending_per_source` messages and `max_bytes_per_source` bytes. A source over its own limits
    loses its own oldest partial message, so one device flooding cannot push out another's; only the
    overall limits evict across sources (oldest first: honest messages complete within moments).
    """

    def __init__(self, *, max_message_bytes: int, max_pending: int = 64, timeout_s: float = 60.0,
                 max_buffered_bytes: int | None = None, max_pending_per_source: int | None = None,
                 max_bytes_per_source: int | None = None) -> None:
        if max_message_bytes < 0 or max_pending < 1 or not timeout_s > 0:
            raise ValueError("need max_message_bytes >= 0, max_pending >= 1 and timeout_s > 0")
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.max_buffered_bytes = max_pending * max_message_bytes if max_buffered_bytes is None else max_buffered_bytes
        self.max_pending_per_source = max_pending if max_pending_per_source is None else max_pending_per_source
        self.max_bytes_per_source = (self.max_buffered_bytes if max_bytes_per_source is None
                                     else max_bytes_per_source)
        if self.max_pending_per_source < 1 or min(self.max_buffered_bytes, self.max_bytes_per_source) < 0:
            raise ValueError("need max_pending_per_source >= 1 and byte limits >= 0")
        self.evicted = 0  # partial messages dropped so far to keep within the limits (not counting expiry)
        self._partial: OrderedDict[bytes, _Partial] = OrderedDict()  # oldest first
        self._by_source: dict[str, OrderedDict[bytes, None]] = {}  # source -> its partial messages, oldest first
        self._source_bytes: dict[str, int] = {}
        self._buffered = 0
        # drops not yet reported; capped so a caller that never asks cannot grow it without bound
        # (`evicted` and `dropped_total` stay exact)
        self._dropped: OrderedDict[bytes, Dropped] = OrderedDict()
        self._dropped_ids: OrderedDict[bytes, None] = OrderedDict()  # for `expire`
        self.dropped_total: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    @property
    def pending(self) -> int:
        """Partial messages held."""
        return len(self._partial)

    @property
    def buffered_bytes(self) -> int:
        """Data bytes held in partial messages (at most max_buffered_bytes)."""
        return self._buffered

    def _drop(self, mid: bytes, reason: str) -> None:
        p = self._partial.pop(mid)
        self._buffered -= p.received
        mine = self._by_source[p.source]
        del mine[mid]
        self._source_bytes[p.source] -= p.received
        if not mine:
            del self._by_source[p.source], self._source_bytes[p.source]
        self.dropped_total[reason] += 1
        if reason != EXPIRED:
            self.evicted += 1
        cap = 16 * self.max_pending
        self._dropped[mid] = Dropped(mid, p.source, reason, p.received)
        self._dropped_ids[mid] = None
        for log in (self._dropped, self._dropped_ids):
            while len(log) > cap:
                log.popitem(last=False)

    def take_dropped(self) -> list[Dropped]:
        """The partial messages dropped since the last call, oldest first."""
        out = list(self._dropped.values())
        self._dropped.clear()
        return out

    def _make_room(self, mid: bytes, source: str, more_bytes: int, new_message: bool) -> str | None:
        """Evict partial messages so that `more_bytes` more data bytes (for `mid`, of a new message if
        `new_message`) fit every limit; return the reason if they cannot fit even then."""
        mine = self._by_source.get(source, OrderedDict())
        if new_message:
            while len(mine) >= self.max_pending_per_source:
                self._drop(next(iter(mine)), SOURCE_PENDING)
                mine = self._by_source.get(source, OrderedDict())
            while len(self._partial) >= self.max_pending:
                self._drop(next(iter(self._partial)), OVER_PENDING)
        held_by_mid = 0 if new_message else self._partial[mid].received
        if held_by_mid + more_bytes > self.max_bytes_per_source:
            return SOURCE_BYTES
        while self._source_bytes.get(source, 0) + more_bytes > self.max_bytes_per_source:
            self._drop(next(m for m in self._by_source[source] if m != mid), SOURCE_BYTES)
        if held_by_mid + more_bytes > self.max_buffered_bytes:
            return OVER_BYTES
        while self._buffered + more_bytes > self.max_buffered_bytes:
            self._drop(next(m for m in self._partial if m != mid), OVER_BYTES)
        return None

    def feed(self, chunk: bytes, now: float, source: str = "") -> bytes | None:
        """Take one chunk from `source`; return the whole message if this chunk completed it, else None.

        A chunk already received is ignored (QoS 1 redelivers). Raises ChunkError for a malformed
        chunk, one of a message above `max_message_bytes`, or one that contradicts earlier chunks of its
        message (count, total length, chunk size, other data for the same index, another source). The
        contradicting chunk is dropped and the partial message kept: it completes (the envelope's digest
        then judges it) or expires, so it still ends in one of the documented ways. A chunk that cannot
        fit the limits even after evicting drops its whole message (reported by `take_dropped`).
        """
        header, data = parse_chunk(chunk)
        mid = header.message_id
        where = f"chunk {header.index} of message {mid.hex()}"
        if header.total_len > self.max_message_bytes:
            raise ChunkError(f"{where}: message of {header.total_len} bytes exceeds the "
                             f"{self.max_message_bytes}-byte limit")
        p = self._partial.get(mid)
        if p is None and header.count == 1:
            return data  # nothing to wait for (a redelivery is returned again: ingest dedupes by update id)
        if p is not None:
            if p.source != source:
                raise ChunkError(f"{where} from {source!r}: the message's earlier chunks came from {p.source!r}")
            if (header.count, header.total_len) != (p.count, p.total_len):
                raise ChunkError(f"{where}: count {header.count} / total length {header.total_len} contradict "
                                 f"earlier chunks ({p.count} / {p.total_len})")
            old_data = p.chunks.get(header.index)
            if old_data is not None:
                if old_data != data:
                    raise ChunkError(f"{where}: received twice with different data")
                return None  # QoS 1 redelivery
            if header.index < header.count - 1:  # all chunks but the last have the same size
                if p.step is None:
                    last = p.chunks.get(p.count - 1)
                    if last is not None and len(last) != p.total_len - len(data) * (p.count - 1):
                        raise ChunkError(f"{where}: chunk size {len(data)} contradicts the last chunk's "
                                         f"{len(last)} bytes")
                elif len(data) != p.step:
                    raise ChunkError(f"{where}: {len(data)} data bytes, the message's other chunks have {p.step}")
            elif p.step is not None and len(data) != p.total_len - p.step * (p.count - 1):
                raise ChunkError(f"{where}: the last chunk has {len(data)} data bytes, chunks of {p.step} "
                                 f"leave {p.total_len - p.step * (p.count - 1)}")
            if len(p.chunks) == p.count - 1:  # this chunk completes it: nothing more to hold
                p.chunks[header.index] = data
                self._buffered -= p.received
                self._source_bytes[source] -= p.received
                del self._partial[mid], self._by_source[source][mid]
                if not self._by_source[source]:
                    del self._by_source[source], self._source_bytes[source]
                return b"".join(p.chunks[i] for i in range(p.count))
        refused = self._make_room(mid, source, len(data), p is None)
        if refused is not None:
            if p is not None:
                self._drop(mid, refused)
            else:
                self.dropped_total[refused] += 1
                self.evicted += 1
                self._dropped[mid] = Dropped(mid, source, refused, 0)
            return None
        if p is None:
            p = self._partial[mid] = _Partial(now, header.count, header.total_len, source)
            self._by_source.setdefault(source, OrderedDict())[mid] = None
        if header.index < header.count - 1:
            p.step = len(data)
        # With the sizes consistent, the chunks held never add up to more than total_len.
        p.chunks[header.index] = data
        p.received += len(data)
        self._buffered += len(data)
        self._source_bytes[source] = self._source_bytes.get(source, 0) + len(data)
        return None

    def expire(self, now: float) -> list[bytes]:
        """Drop partial messages whose first chunk arrived more than `timeout_s` ago; return their ids,
        followed by the ids of partial messages evicted by `feed` since the last call."""
        old = [mid for mid, p in self._partial.items() if now - p.started > self.timeout_s]
        for mid in old:
            self._drop(mid, EXPIRED)
        out = list(self._dropped_ids)
        self._dropped_ids.clear()
        seen = set(old)
        return old + [m for m in out if m not in seen]
