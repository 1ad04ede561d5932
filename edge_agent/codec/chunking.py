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
partial messages (the oldest is evicted, and counted, to make room) of at most `max_message_bytes` each.
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
    chunks: dict[int, bytes] = field(default_factory=dict)
    received: int = 0  # data bytes held in `chunks`
    step: int | None = None  # data size of every chunk but the last, once a non-last chunk is seen


class Reassembler:
    """Collects chunks per message id and returns each message once its last missing chunk arrives.

    Every partial message ends exactly one way: returned by `feed` when complete, or returned by id
    from `expire` (timed out, or evicted by `feed` to make room). A caller that holds something per
    message, such as un-acknowledged QoS 1 packets, can therefore release it in those two places.
    """

    def __init__(self, *, max_message_bytes: int, max_pending: int = 64, timeout_s: float = 60.0) -> None:
        if max_message_bytes < 0 or max_pending < 1 or not timeout_s > 0:
            raise ValueError("need max_message_bytes >= 0, max_pending >= 1 and timeout_s > 0")
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.evicted = 0  # partial messages dropped so far to make room for a newer one
        self._partial: OrderedDict[bytes, _Partial] = OrderedDict()  # oldest first
        # ids evicted since the last `expire`, reported there; capped so a caller that never calls
        # `expire` cannot grow it without bound (the count above stays exact)
        self._evicted_ids: OrderedDict[bytes, None] = OrderedDict()

    @property
    def pending(self) -> int:
        """Partial messages held."""
        return len(self._partial)

    @property
    def buffered_bytes(self) -> int:
        """Data bytes held in partial messages (at most max_pending * max_message_bytes)."""
        return sum(p.received for p in self._partial.values())

    def feed(self, chunk: bytes, now: float) -> bytes | None:
        """Take one chunk; return the whole message if this chunk completed it, else None.

        A chunk already received is ignored (QoS 1 redelivers). Raises ChunkError for a malformed
        chunk, one of a message above `max_message_bytes`, or one that contradicts earlier chunks of its
        message (count, total length, chunk size, or other data for the same index). The contradicting
        chunk is dropped and the partial message kept: it completes (the envelope's digest then judges
        it) or expires, so it still ends in one of the two documented ways.
        """
        header, data = parse_chunk(chunk)
        mid = header.message_id
        where = f"chunk {header.index} of message {mid.hex()}"
        if header.total_len > self.max_message_bytes:
            raise ChunkError(f"{where}: message of {header.total_len} bytes exceeds the "
                             f"{self.max_message_bytes}-byte limit")
        p = self._partial.get(mid)
        if p is None:
            if header.count == 1:
                return data  # nothing to wait for (a redelivery is returned again: ingest dedupes by update id)
            while len(self._partial) >= self.max_pending:
                old, _ = self._partial.popitem(last=False)
                self.evicted += 1
                self._evicted_ids[old] = None
                if len(self._evicted_ids) > 16 * self.max_pending:
                    self._evicted_ids.popitem(last=False)
            p = self._partial[mid] = _Partial(now, header.count, header.total_len)
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
                    raise ChunkError(f"{where}: chunk size {len(data)} contradicts the last chunk's {len(last)} bytes")
                p.step = len(data)
            elif len(data) != p.step:
                raise ChunkError(f"{where}: {len(data)} data bytes, the message's other chunks have {p.step}")
        elif p.step is not None and len(data) != p.total_len - p.step * (p.count - 1):
            raise ChunkError(f"{where}: the last chunk has {len(data)} data bytes, chunks of {p.step} "
                             f"leave {p.total_len - p.step * (p.count - 1)}")
        # With the sizes consistent, the chunks held never add up to more than total_len.
        p.chunks[header.index] = data
        p.received += len(data)
        if len(p.chunks) < p.count:
            return None
        del self._partial[mid]
        return b"".join(p.chunks[i] for i in range(p.count))

    def expire(self, now: float) -> list[bytes]:
        """Drop partial messages whose first chunk arrived more than `timeout_s` ago; return their ids,
        followed by the ids of partial messages evicted by `feed` since the last call."""
        old = [mid for mid, p in self._partial.items() if now - p.started > self.timeout_s]
        for mid in old:
            del self._partial[mid]
        old += [mid for mid in self._evicted_ids if mid not in old]
        self._evicted_ids.clear()
        return old
