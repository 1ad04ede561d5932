"""The agent side of the serial link: a pyserial port, a reader thread, request/response helpers.

Shaped like pyserial's `serial.threaded`: `_FrameProtocol` only parses (bytes -> FrameDecoder ->
messages -> dispatch), a `ReaderThread` owns the port and its read loop, writes go through its lock.
Any pyserial URL works: `/dev/ttyACM0`, a pty path, `socket://host:port`, `loop://`.

Threads: the reader thread calls `on_message` (keep it short: it delays the next read); a supervisor
thread reopens the port with backoff after an I/O error when `reconnect=True` and re-announces (HELLO).
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import serial
import serial.threaded

from .framing import PROTOCOL_VERSION, Frame, FrameDecoder, crc32
from .messages import (
    Ack, ErrorCode, ErrorMsg, HeadBegin, HeadChunk, HeadCommit, Hello, InferResult, Message, MessageError,
    MessageType, SensorWindow, decode_message, head_push, to_frame,
)

log = logging.getLogger("firmware_bridge.link")

AGENT_BOARD = "edge-fl-agent"
WINDOW_QUEUE = 256


class LinkError(RuntimeError):
    """The link cannot do what was asked."""


class LinkOpenError(LinkError):
    """The port cannot be opened (wrong path, busy, no permission)."""


class LinkClosedError(LinkError):
    """The link is closed, or the port went away while waiting for a reply."""


class LinkTimeout(LinkError, TimeoutError):
    """No reply in time."""


class ProtocolVersionError(LinkError):
    """The peer speaks another protocol version."""


class HeadPushError(LinkError):
    """A head push failed; the MCU keeps running its previous head. `chunk` / `code` say where and why."""

    def __init__(self, message: str, *, head_id: int, chunk: int | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.head_id, self.chunk, self.code = head_id, chunk, code


@dataclass
class LinkStats:
    frames_rx: int = 0
    frames_tx: int = 0
    bytes_rx: int = 0
    bytes_tx: int = 0
    message_errors: int = 0  # intact frames whose payload is not a valid message
    errors_rx: int = 0  # ERROR messages received
    callback_errors: int = 0  # exceptions raised by on_message
    windows: int = 0
    windows_dropped: int = 0  # windows() queue full: oldest dropped
    infer_results: int = 0
    connects: int = 0
    disconnects: int = 0
    retries: int = 0  # head-push resends after an ACK timeout
    decoder: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Waiter:
    def __init__(self, match: Callable[[Message], bool]) -> None:
        self.match = match
        self.event = threading.Event()
        self.result: Message | None = None
        self.error: BaseException | None = None


class _FrameProtocol(serial.threaded.Protocol):
    """Parses only: bytes -> frames -> messages, handed to the link. Never raises into the read loop."""

    def __init__(self, link: "SerialLink", generation: int) -> None:
        self.link, self.generation = link, generation

    def data_received(self, data: bytes) -> None:
        self.link.stats.bytes_rx += len(data)
        for frame in self.link.decoder.feed(data):
            self.link._on_frame(frame)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.link._on_connection_lost(self.generation, exc)


class SerialLink:
    """One agent <-> MCU link over any pyserial URL. Use as a context manager or call `close()`."""

    def __init__(self, url: str, *, baudrate: int = 115200, on_message: Callable[[Message], None] | None = None,
                 reconnect: bool = True, announce: bool = True, board: str = AGENT_BOARD,
                 backoff: tuple[float, float] = (0.05, 2.0), window_queue: int = WINDOW_QUEUE) -> None:
        self.url, self.baudrate, self.on_message = url, baudrate, on_message
        self.reconnect, self.announce, self.board, self.backoff = reconnect, announce, board, backoff
        self.decoder = FrameDecoder()
        self.stats = LinkStats()
        self.peer: Hello | None = None  # the MCU's last HELLO
        self.peer_generation = -1  # connection generation in which `peer` arrived
        self.version_error: ProtocolVersionError | None = None
        self._windows: queue.Queue[SensorWindow] = queue.Queue(window_queue)
        self._results: queue.Queue[InferResult] = queue.Queue(window_queue)
        self._seq = itertools.count(random.randrange(1 << 16))
        self._head_ids = itertools.count(random.randrange(1 << 31))
        self._send_lock = threading.Lock()
        self._cv = threading.Condition()
        self._waiters: list[_Waiter] = []
        self._reader: serial.threaded.ReaderThread | None = None
        self._generation = 0
        self._closing = False
        self._lost = threading.Event()
        # Tests / fault injection: called with (message, wire bytes) before a write; return the bytes to
        # write (e.g. corrupted) or None to drop the frame as if the wire lost it.
        self.tx_filter: Callable[[Message, bytes], bytes | None] | None = None
        self._open()  # the first open raises LinkOpenError: a wrong path should fail loudly, not retry
        self._supervisor: threading.Thread | None = None
        if reconnect:
            self._supervisor = threading.Thread(target=self._supervise, name=f"link-supervisor {url}", daemon=True)
            self._supervisor.start()

    # --- connection ------------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            port = serial.serial_for_url(self.url, baudrate=self.baudrate, timeout=1)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkOpenError(f"cannot open serial port {self.url!r}: {exc}") from exc
        with self._cv:
            self._generation += 1
            gen = self._generation
        self.decoder.reset()
        reader = serial.threaded.ReaderThread(port, lambda: _FrameProtocol(self, gen))
        reader.name = f"link-reader {self.url}"
        reader.start()
        reader.connect()
        with self._cv:
            self._reader = reader
            self.stats.connects += 1
            self._cv.notify_all()
        log.info("connected to %s (connection %d)", self.url, gen)
        if self.announce:
            try:
                self.send(self._hello_msg())
            except LinkError as exc:
                log.warning("HELLO on connect failed: %s", exc)

    def _on_connection_lost(self, generation: int, exc: BaseException | None) -> None:
        with self._cv:
            if generation != self._generation or self._reader is None:
                return
            self._reader = None
            self.stats.disconnects += 1
            waiters, self._waiters = self._waiters, []
            self._cv.notify_all()
        reason = f"port {self.url} lost: {exc}" if exc else f"port {self.url} closed"
        for w in waiters:
            w.error = LinkClosedError(reason)
            w.event.set()
        if not self._closing:
            log.warning("%s", reason)
            self._lost.set()

    def _supervise(self) -> None:
        while not self._closing:
            self._lost.wait()
            if self._closing:
                return
            self._lost.clear()
            delay = self.backoff[0]
            while not self._closing:
                try:
                    self._open()
                    log.info("reconnected to %s", self.url)
                    break
                except LinkOpenError as exc:
                    log.debug("reconnect failed (%s); retrying in %.2f s", exc, delay)
                    with self._cv:
                        self._cv.wait_for(lambda: self._closing, timeout=delay)
                    delay = min(delay * 2, self.backoff[1])

    @property
    def connected(self) -> bool:
        return self._reader is not None

    @property
    def generation(self) -> int:
        """Increments on every (re)connection."""
        return self._generation

    def wait_connected(self, timeout: float, *, after: int = 0) -> int:
        """Wait until connected with a generation > `after`; returns the generation."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._reader is not None and self._generation > after or self._closing,
                                     timeout=timeout):
                raise LinkTimeout(f"{self.url}: not reconnected within {timeout} s")
            if self._closing:
                raise LinkClosedError("link closed")
            return self._generation

    def wait_peer_hello(self, timeout: float, *, after: int = 0) -> Hello:
        """Wait for a HELLO from the peer received on a connection with generation > `after`."""
        with self._cv:
            if not self._cv.wait_for(lambda: self.peer is not None and self.peer_generation > after, timeout=timeout):
                raise LinkTimeout(f"{self.url}: no HELLO from the device within {timeout} s")
            assert self.peer is not None
            return self.peer

    def close(self) -> None:
        with self._cv:
            self._closing = True
            reader, self._reader = self._reader, None
            waiters, self._waiters = self._waiters, []
            self._cv.notify_all()
        self._lost.set()
        for w in waiters:
            w.error = LinkClosedError("link closed")
            w.event.set()
        if reader is not None:
            try:
                reader.close()
            except Exception as exc:  # closing a vanished port may itself fail
                log.debug("closing %s: %s", self.url, exc)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(5)
        self.stats.decoder = self.decoder.stats.as_dict()

    def __enter__(self) -> "SerialLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- receive ---------------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        self.stats.frames_rx += 1
        try:
            msg = decode_message(frame)
        except MessageError as exc:
            self.stats.message_errors += 1
            log.warning("dropped frame type 0x%02x seq %d: %s", frame.type, frame.seq, exc)
            if exc.code == ErrorCode.BAD_VERSION:
                err = ProtocolVersionError(
                    f"device on {self.url} sends serial protocol version {frame.version} frames, this agent "
                    f"speaks version {PROTOCOL_VERSION}: update the firmware or the agent so they match")
                self.version_error = err
                self._answer_error(ErrorCode.BAD_VERSION, f"agent speaks protocol version {PROTOCOL_VERSION}")
                with self._cv:  # no request can succeed against a peer of another version
                    waiters, self._waiters = self._waiters, []
                for w in waiters:
                    w.error = err
                    w.event.set()
            return
        self._dispatch(msg)

    def _answer_error(self, code: ErrorCode, detail: str) -> None:
        try:
            self.send(ErrorMsg(code, detail))
        except LinkError as exc:
            log.debug("could not send ERROR %s: %s", code.name, exc)

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, Hello):
            if msg.proto_version != PROTOCOL_VERSION:
                err = ProtocolVersionError(
                    f"device on {self.url} ({msg.board!r}) speaks serial protocol version {msg.proto_version}, "
                    f"this agent speaks version {PROTOCOL_VERSION}: update the firmware or the agent so they match")
                self.version_error = err
                log.error("%s", err)
                self._answer_error(ErrorCode.BAD_VERSION, f"agent speaks protocol version {PROTOCOL_VERSION}")
            with self._cv:
                self.peer, self.peer_generation = msg, self._generation
                self._cv.notify_all()
        elif isinstance(msg, SensorWindow):
            self.stats.windows += 1
            self._put(self._windows, msg)
        elif isinstance(msg, InferResult):
            self.stats.infer_results += 1
            self._put(self._results, msg)
        elif isinstance(msg, ErrorMsg):
            self.stats.errors_rx += 1
            log.warning("device reports ERROR %s: %s", getattr(msg.code, "name", msg.code), msg.detail)
        with self._cv:
            for w in list(self._waiters):
                if w.match(msg):
                    w.result = msg
                    self._waiters.remove(w)
                    w.event.set()
        if self.on_message is not None:
            try:
                self.on_message(msg)
            except Exception:  # a user bug must not end the read loop
                self.stats.callback_errors += 1
                log.exception("on_message callback failed on %s", type(msg).__name__)

    def _put(self, q: "queue.Queue[Any]", item: Any) -> None:
        while True:
            try:
                q.put_nowait(item)
                return
            except queue.Full:
                try:
                    q.get_nowait()
                    self.stats.windows_dropped += 1
                except queue.Empty:
                    pass

    def windows(self, timeout: float | None = None) -> Iterator[SensorWindow]:
        """SensorWindows as they arrive; stops after `timeout` s without one (None: forever)."""
        while True:
            try:
                yield self._windows.get(timeout=timeout)
            except queue.Empty:
                return

    def get_window(self, timeout: float) -> SensorWindow:
        try:
            return self._windows.get(timeout=timeout)
        except queue.Empty:
            raise LinkTimeout(f"{self.url}: no SENSOR_WINDOW within {timeout} s") from None

    def get_result(self, timeout: float) -> InferResult:
        try:
            return self._results.get(timeout=timeout)
        except queue.Empty:
            raise LinkTimeout(f"{self.url}: no INFER_RESULT within {timeout} s") from None

    def drain(self) -> None:
        """Forget queued windows and results (e.g. before a measurement)."""
        for q in (self._windows, self._results):
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break

    def snapshot(self) -> dict[str, Any]:
        self.stats.decoder = self.decoder.stats.as_dict()
        return self.stats.as_dict()

    # --- send ------------------------------------------------------------------------------------

    def _hello_msg(self) -> Hello:
        return Hello(0, 0, 0, self.board)

    def send(self, msg: Message) -> int:
        """Send one message; returns its seq. Raises LinkClosedError when disconnected."""
        return self._send(msg, None)

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the wire (tests: corrupted frames)."""
        self._write(data)

    def _write(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            raise LinkClosedError(f"{self.url}: not connected")
        try:
            reader.write(data)
        except (serial.SerialException, OSError) as exc:
            raise LinkClosedError(f"{self.url}: write failed: {exc}") from exc
        self.stats.bytes_tx += len(data)

    def _send(self, msg: Message, waiter_for: Callable[[int], _Waiter] | None) -> int:
        with self._send_lock:
            seq = next(self._seq) & 0xFFFF
            data = to_frame(msg, seq)
            if waiter_for is not None:  # registered before the bytes leave: a fast reply is never missed
                with self._cv:
                    self._waiters.append(waiter_for(seq))
            if self.tx_filter is not None:
                filtered = self.tx_filter(msg, data)
                if filtered is None:
                    return seq
                data = filtered
            self._write(data)
            self.stats.frames_tx += 1
            return seq

    def request(self, msg: Message, match: Callable[[int, Message], bool], timeout: float) -> Message:
        """Send `msg` and wait for the first reply with `match(seq, reply)`; LinkTimeout if none."""
        holder: list[_Waiter] = []

        def make(seq: int) -> _Waiter:
            holder.append(_Waiter(lambda m: match(seq, m)))
            return holder[0]

        try:
            self._send(msg, make)
        except LinkError:
            self._forget(holder)
            raise
        w = holder[0]
        if not w.event.wait(timeout):
            self._forget(holder)
            raise LinkTimeout(f"{self.url}: no reply to {type(msg).__name__} within {timeout} s")
        if w.error is not None:
            raise w.error
        assert w.result is not None
        return w.result

    def request_raw(self, data: bytes, match: Callable[[Message], bool], timeout: float) -> Message:
        """Write raw bytes and wait for the first message with `match(msg)` (tests, fault injection)."""
        w = _Waiter(match)
        with self._cv:
            self._waiters.append(w)
        try:
            self._write(data)
        except LinkError:
            self._forget([w])
            raise
        if not w.event.wait(timeout):
            self._forget([w])
            raise LinkTimeout(f"{self.url}: no matching reply within {timeout} s")
        if w.error is not None:
            raise w.error
        assert w.result is not None
        return w.result

    def _forget(self, holder: list[_Waiter]) -> None:
        with self._cv:
            for w in holder:
                if w in self._waiters:
                    self._waiters.remove(w)

    def ack_or_error(self, msg: Message, timeout: float, *, index: int | None = None) -> Ack | ErrorMsg:
        """Send and wait for its ACK (by seq, or by chunk index) or any ERROR."""
        mtype = int(msg.TYPE)

        def match(seq: int, m: Message) -> bool:
            if isinstance(m, ErrorMsg):
                return True
            return isinstance(m, Ack) and m.acked_type == mtype and (
                m.index == index if index is not None else m.acked_seq == seq)

        reply = self.request(msg, match, timeout)
        assert isinstance(reply, (Ack, ErrorMsg))
        return reply

    def hello(self, timeout: float = 2.0) -> Hello:
        """HELLO handshake: returns the device's HELLO; ProtocolVersionError on a version mismatch."""
        def match(_seq: int, m: Message) -> bool:
            return isinstance(m, Hello) or (isinstance(m, ErrorMsg) and m.code == ErrorCode.BAD_VERSION)

        reply = self.request(self._hello_msg(), match, timeout)
        if isinstance(reply, ErrorMsg):
            raise ProtocolVersionError(f"device on {self.url} refused our HELLO (protocol version "
                                       f"{PROTOCOL_VERSION}): {reply.detail}")
        assert isinstance(reply, Hello)
        if reply.proto_version != PROTOCOL_VERSION:
            assert self.version_error is not None
            raise self.version_error
        return reply

    def push_head(self, blob: bytes, *, chunk_size: int = 512, retries: int = 3, ack_timeout: float = 1.0,
                  head_id: int | None = None, commit: bool = True) -> int:
        """Push a head blob: HEAD_BEGIN, ACKed HEAD_CHUNKs (resent on ACK timeout), HEAD_COMMIT.

        Returns the head_id (INFER_RESULTs carry it). Raises HeadPushError naming the step, chunk and
        ERROR code; on any failure the device keeps its previous head (it only switches on a valid COMMIT).
        """
        hid = next(self._head_ids) & 0xFFFFFFFF if head_id is None else head_id
        begin, chunks, commit_msg = head_push(hid, blob, chunk_size)
        steps: list[tuple[str, Message, int | None]] = [("HEAD_BEGIN", begin, None)]
        steps += [(f"chunk {c.index}/{len(chunks)}", c, c.index) for c in chunks]
        if commit:
            steps.append(("HEAD_COMMIT", commit_msg, None))
        for what, msg, index in steps:
            for attempt in range(retries + 1):
                try:
                    reply = self.ack_or_error(msg, ack_timeout, index=index)
                except LinkTimeout:
                    if attempt == retries:
                        raise HeadPushError(f"head {hid:#010x}: {what}: no ACK after {retries + 1} attempts "
                                            f"({ack_timeout} s each); the device keeps its previous head",
                                            head_id=hid, chunk=index) from None
                    self.stats.retries += 1
                    log.info("head %#010x: %s: ACK timeout, resending (%d/%d)", hid, what, attempt + 1, retries)
                    continue
                except LinkClosedError as exc:
                    raise HeadPushError(f"head {hid:#010x}: link lost during {what} ({exc}); the device keeps "
                                        "its previous head", head_id=hid, chunk=index) from exc
                if isinstance(reply, ErrorMsg) or reply.status != 0:
                    code = reply.code if isinstance(reply, ErrorMsg) else reply.status
                    name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
                    detail = f": {reply.detail}" if isinstance(reply, ErrorMsg) and reply.detail else ""
                    raise HeadPushError(f"head {hid:#010x}: {what} refused with ERROR {name}{detail}; the device "
                                        "keeps its previous head", head_id=hid, chunk=index, code=code)
                break
        return hid


def head_crc(blob: bytes) -> int:
    return crc32(blob)


__all__ = ["HeadPushError", "LinkClosedError", "LinkError", "LinkOpenError", "LinkStats", "LinkTimeout",
           "MessageType", "ProtocolVersionError", "SerialLink"]
