"""The MCU's head-push receiver: staging, chunk rules and the atomic commit (PROTOCOL.md, "Head push").

The Python twin of the C firmware's `edgefl_head_rx_*`: pure, no I/O, threads or clock. Messages go
in, a `HeadReply` (ACK with an index, or an ERROR code and detail) comes out, and the committed head is
`active`. Whoever owns the wire sends the reply (the emulator's runner applies the ERROR-reply rule);
the conformance scenarios (firmware/conformance/mcu.txt) drive it directly in tests/unit/test_staging.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..framing import crc32
from ..head_blob import HeadBlob, HeadBlobError, decode_head
from ..messages import HEAD_CHUNK_MAX, ErrorCode, HeadBegin, HeadChunk, HeadCommit

MAX_HEAD_BYTES = 32 * 1024  # staging buffer: a HEAD_BEGIN announcing more is refused OUT_OF_MEMORY


@dataclass
class Staging:
    """A head push in progress."""

    head_id: int
    total_len: int
    n_chunks: int
    crc: int
    chunk_size: int = 0  # 0 until the first chunk to arrive fixes it
    received: set[int] = field(default_factory=set)
    data: bytearray = field(default_factory=bytearray)

    def expected_len(self, index: int) -> int:
        return self.chunk_size if index + 1 < self.n_chunks else self.total_len - (self.n_chunks - 1) * self.chunk_size

    def fix_chunk_size(self, index: int, length: int) -> bool:
        """Derive the chunk size from the first chunk to arrive; False if no size fits total_len."""
        n, total = self.n_chunks, self.total_len
        if n == 1 or index + 1 < n:
            size = length
        elif length < total and (total - length) % (n - 1) == 0:
            size = (total - length) // (n - 1)  # the last chunk came first: the others share the rest
        else:
            return False
        # Every chunk but the last is full; the last holds 1..size bytes.
        if not 1 <= size <= HEAD_CHUNK_MAX or (n - 1) * size >= total or total - (n - 1) * size > size:
            return False
        self.chunk_size = size
        return True


@dataclass(frozen=True)
class HeadReply:
    """What the MCU answers a HEAD_* message with: ACK (`error` None; a chunk's carries its index) or ERROR."""

    error: ErrorCode | None = None
    detail: str = ""
    index: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class HeadRxStats:
    chunks_rx: int = 0  # chunks for the push in progress, with a valid index (stored or not)
    heads_committed: int = 0
    commits_refused: int = 0


def _ack(index: int = 0) -> HeadReply:
    return HeadReply(index=index)


class HeadReceiver:
    """Head pushes in, the head to run out. `embedding_dim`: what the backbone gives (other heads are refused)."""

    def __init__(self, embedding_dim: int, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self.embedding_dim = embedding_dim
        self.max_head_bytes = max_head_bytes
        self.staging: Staging | None = None
        # (head_id, head), replaced as one: a reader in another thread never sees one head's id with another head
        self.active: tuple[int, HeadBlob] | None = None
        self.stats = HeadRxStats()

    @property
    def head_id(self) -> int | None:
        active = self.active
        return None if active is None else active[0]

    @property
    def head(self) -> HeadBlob | None:
        active = self.active
        return None if active is None else active[1]

    def abandon(self) -> None:
        """The link went away (unplug, a new session): the push in progress is lost, the committed head stays."""
        self.staging = None

    def handle(self, msg: HeadBegin | HeadChunk | HeadCommit) -> HeadReply:
        if isinstance(msg, HeadBegin):
            return self.begin(msg)
        if isinstance(msg, HeadChunk):
            return self.chunk(msg)
        return self.commit(msg)

    def accepts(self, msg: HeadChunk) -> bool:
        """Is this a chunk of the push in progress, with a valid index (whatever its length)?"""
        st = self.staging
        return st is not None and st.head_id == msg.head_id and msg.index < st.n_chunks

    def begin(self, msg: HeadBegin) -> HeadReply:
        self.staging = None  # a new BEGIN abandons an unfinished push, even when it is refused itself
        if (msg.total_len == 0 or msg.n_chunks == 0 or msg.n_chunks > msg.total_len
                or msg.total_len > msg.n_chunks * HEAD_CHUNK_MAX):
            return HeadReply(ErrorCode.BAD_MESSAGE, f"HEAD_BEGIN: {msg.total_len} bytes cannot be "
                             f"{msg.n_chunks} chunks of 1..{HEAD_CHUNK_MAX} bytes")
        if msg.total_len > self.max_head_bytes:
            return HeadReply(ErrorCode.OUT_OF_MEMORY, f"head of {msg.total_len} bytes, staging holds "
                             f"{self.max_head_bytes}")
        self.staging = Staging(msg.head_id, msg.total_len, msg.n_chunks, msg.head_crc32,
                               data=bytearray(msg.total_len))
        return _ack()

    def chunk(self, msg: HeadChunk) -> HeadReply:
        st = self.staging
        if st is None or st.head_id != msg.head_id:
            return HeadReply(ErrorCode.BAD_MESSAGE, f"HEAD_CHUNK for head {msg.head_id:#x} without its HEAD_BEGIN")
        if msg.index >= st.n_chunks:
            return HeadReply(ErrorCode.BAD_MESSAGE, f"chunk index {msg.index} >= n_chunks {st.n_chunks}")
        self.stats.chunks_rx += 1
        if st.chunk_size == 0 and not st.fix_chunk_size(msg.index, len(msg.data)):
            return HeadReply(ErrorCode.BAD_LENGTH, f"chunk {msg.index} of {len(msg.data)} bytes: no chunk size "
                             f"splits {st.total_len} bytes into {st.n_chunks} chunks with it")
        if len(msg.data) != st.expected_len(msg.index):
            return HeadReply(ErrorCode.BAD_LENGTH, f"chunk {msg.index} has {len(msg.data)} bytes, must have "
                             f"{st.expected_len(msg.index)} (chunk size {st.chunk_size})")
        off = msg.index * st.chunk_size
        st.data[off:off + len(msg.data)] = msg.data  # a resend of a chunk whose ACK got lost just overwrites
        st.received.add(msg.index)
        return _ack(msg.index)

    def commit(self, msg: HeadCommit) -> HeadReply:
        st = self.staging
        if st is None or st.head_id != msg.head_id:
            if msg.head_id == self.head_id:
                return _ack()  # a resent COMMIT whose ACK got lost
            return self._refuse(ErrorCode.HEAD_INCOMPLETE,
                                f"head {msg.head_id:#x} was not staged; keeping head {self.head_id}")
        if len(st.received) != st.n_chunks:
            # Staging is kept: on a flaky link the agent resends the missing chunks and commits again.
            missing = [i for i in range(st.n_chunks) if i not in st.received]
            return self._refuse(ErrorCode.HEAD_INCOMPLETE, f"head {st.head_id:#x}: missing chunks {missing[:8]}"
                                f"{'...' if len(missing) > 8 else ''} of {st.n_chunks}")
        self.staging = None  # complete: from here on the push is over, committed or refused
        blob = bytes(st.data)
        if crc32(blob) != st.crc:
            return self._refuse(ErrorCode.HEAD_CRC,
                                f"head {st.head_id:#x}: CRC-32 {crc32(blob):#010x}, announced {st.crc:#010x}")
        try:
            head = decode_head(blob)  # finite values, std > 0, scales > 0: PROTOCOL.md, "Head blob"
            if head.embedding_dim != self.embedding_dim:
                raise HeadBlobError(f"embedding_dim {head.embedding_dim}, the backbone gives {self.embedding_dim}")
        except HeadBlobError as exc:
            return self._refuse(ErrorCode.BAD_MESSAGE, f"head {st.head_id:#x} refused, keeping head "
                                f"{self.head_id}: {exc}")
        self.active = (st.head_id, head)
        self.stats.heads_committed += 1
        return _ack()

    def _refuse(self, code: ErrorCode, detail: str) -> HeadReply:
        self.stats.commits_refused += 1
        return HeadReply(code, detail)
