"""The agent side of the serial link: a pyserial port, one link thread, request/response helpers.

Any pyserial URL works: `/dev/ttyACM0`, a pty path, `socket://host:port`, `loop://`.

One thread owns the port for its whole life. It opens it (the constructor does the first open, so a
wrong path fails loudly), reads and parses frames, sends heartbeats, notices a lost or silent device,
closes the port, waits with backoff and opens it again. Nothing hands a port from one thread to
another, so there is no window in which a connection exists without its reader: `connected` is true
exactly while that thread is reading an open port. Every exception inside the thread ends at most the
current connection, never supervision (pyserial's `ReaderThread` hand-over could do both).

Liveness: a device that stops talking without closing the port (a hung MCU, a USB-serial adapter whose
board lost power) is only visible as silence. The link sends HEARTBEAT after `heartbeat_s` without a
frame; a device answers every HEARTBEAT; after `liveness_s` without any intact frame the link closes
the port and reconnects (PROTOCOL.md, "Heartbeats"). Detection time: at most `liveness_s` plus one
poll (`POLL_S`).

Other threads write through `_tx_lock` (sequence numbers leave in order); the link thread calls
`on_message` for every message (keep it short: it delays the next read) and `on_state` on every
connect and disconnect.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import serial
from serial.urlhandler.protocol_socket import Serial as _PyserialSocket

from .error_replies import ErrorReplyLimiter
from .framing import PROTOCOL_VERSION, Frame, FrameDecoder, crc32
from .messages import (
    Ack,
    ErrorCode,
    ErrorMsg,
    Heartbeat,
    Hello,
    InferResult,
    Message,
    MessageError,
    MessageType,
    SensorWindow,
    decode_message,
    head_push,
    to_frame,
)

log = logging.getLogger("firmware_bridge.link")

AGENT_BOARD = "edge-fl-agent"
WINDOW_QUEUE = 256
POLL_S = 0.05  # how often the link thread looks up from a quiet port (close, heartbeat, liveness)
READ_MAX = 8192  # bytes taken per read: whatever is there, up to this
WRITE_TIMEOUT_S = 2.0  # a device that stops draining its port blocks a write at most this long
HEARTBEAT_S = 1.0
LIVENESS_S = 3.0
STILL_DOWN_LOG_S = 60.0
PEER_LOG_BURST = 5  # while a device stays away, say so again this often


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
    reads: int = 0  # reads that returned bytes (a socket:// link takes what is there, not one byte per read)
    message_errors: int = 0  # intact frames whose payload is not a valid message
    errors_rx: int = 0  # ERROR messages received
    error_replies_suppressed: int = 0  # ERROR replies not sent (to an ERROR, or over the rate limit)
    callback_errors: int = 0  # exceptions raised by on_message / on_state
    internal_errors: int = 0  # bugs caught in the link thread (logged with a traceback)
    windows: int = 0
    windows_dropped: int = 0  # windows() queue full: oldest dropped
    infer_results: int = 0
    connects: int = 0
    disconnects: int = 0
    open_failures: int = 0  # reopen attempts that failed (device away)
    heartbeats_tx: int = 0
    liveness_timeouts: int = 0  # connections dropped because the device fell silent
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


class _SocketPort(_PyserialSocket):
    """pyserial's `socket://` port minus the 0.3 s sleep its close() adds "for quick reconnects": the
    link's backoff already spaces reconnects, and the sleep would hold the link thread on every loss.
    TCP_NODELAY, as on a UART: a small frame (an ACK, an ERROR) leaves now, not after Nagle's wait."""

    _socket: socket.socket | None

    def open(self) -> None:
        super().open()
        if self._socket is not None:
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.is_open:
            sock, self._socket = self._socket, None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # the peer has gone already
                sock.close()
            self.is_open = False


def _fileno(port: serial.SerialBase) -> int | None:
    """The descriptor to select() on, for ports that have one (posix serial, pty, socket://)."""
    try:
        fd = port.fileno()  # loop:// has none: AttributeError
    except (AttributeError, OSError, ValueError, serial.SerialException):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


class SerialLink:
    """One agent <-> MCU link over any pyserial URL. Use as a context manager or call `close()`.

    `require_port=False` starts even when the port is not there yet (a gateway that boots before its
    USB device enumerates) and keeps trying in the background; the default raises `LinkOpenError`
    on a first open that fails, because at a prompt a wrong path should fail loudly.
    `heartbeat_s` / `liveness_s` of 0 switch heartbeats / the liveness check off.
    """

    def __init__(self, url: str, *, baudrate: int = 115200, on_message: Callable[[Message], None] | None = None,
                 on_state: Callable[[bool, str], None] | None = None, reconnect: bool = True,
                 announce: bool = True, board: str = AGENT_BOARD, backoff: tuple[float, float] = (0.05, 2.0),
                 window_queue: int = WINDOW_QUEUE, heartbeat_s: float = HEARTBEAT_S,
                 liveness_s: float = LIVENESS_S, require_port: bool = True) -> None:
        if liveness_s and heartbeat_s and liveness_s <= heartbeat_s:
            raise ValueError(f"liveness_s={liveness_s} must exceed heartbeat_s={heartbeat_s}: a device needs a "
                             "heartbeat to answer before it can be called silent")
        self.url, self.baudrate, self.on_message, self.on_state = url, baudrate, on_message, on_state
        self.reconnect, self.announce, self.board, self.backoff = reconnect, announce, board, backoff
        self.heartbeat_s, self.liveness_s = heartbeat_s, liveness_s
        self.decoder = FrameDecoder()
        self.stats = LinkStats()
        self.peer: Hello | None = None  # the MCU's last HELLO
        self.peer_generation = -1  # connection generation in which `peer` arrived
        self.version_error: ProtocolVersionError | None = None
        self._windows: queue.Queue[SensorWindow] = queue.Queue(window_queue)
        self._results: queue.Queue[InferResult] = queue.Queue(window_queue)
        self._seq = itertools.count(random.randrange(1 << 16))
        self._head_ids = itertools.count(random.randrange(1 << 31))
        self._error_replies = ErrorReplyLimiter()
        self._peer_log = ErrorReplyLimiter(rate=1.0, burst=PEER_LOG_BURST)  # the same token bucket, for log lines
        self._peer_log_skipped = 0
        # Lock order: _tx_lock before _cv, never the reverse.
        self._tx_lock = threading.Lock()  # seq allocation + write, and swapping the port
        self._cv = threading.Condition()  # state below, waiters
        self._port: serial.SerialBase | None = None
        self._generation = 0
        self._closing = False
        self._last_rx = 0.0  # monotonic time of the last intact frame on this connection
        self._waiters: list[_Waiter] = []
        # Tests / fault injection: called with (message, wire bytes) before a write; return the bytes to
        # write (e.g. corrupted) or None to drop the frame as if the wire lost it.
        self.tx_filter: Callable[[Message, bytes], bytes | None] | None = None
        port: serial.SerialBase | None = None
        try:
            port = self._open_port()
        except LinkOpenError as exc:
            if require_port or not reconnect:
                raise
            self.stats.open_failures += 1
            log.warning("%s; the device may not be attached yet, retrying in the background", exc)
        if port is not None:
            self._attach(port)
        self._thread = threading.Thread(target=self._run, args=(port,), name=f"serial-link {url}", daemon=True)
        self._thread.start()
        if port is not None:
            self._announce()

    # --- the link thread -------------------------------------------------------------------------

    def _open_port(self) -> serial.SerialBase:
        port: serial.SerialBase
        try:
            if self.url.startswith("socket://"):
                port = _SocketPort(self.url, baudrate=self.baudrate, timeout=POLL_S, write_timeout=WRITE_TIMEOUT_S)
            else:
                port = serial.serial_for_url(self.url, baudrate=self.baudrate, timeout=POLL_S,
                                             write_timeout=WRITE_TIMEOUT_S)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkOpenError(f"cannot open serial port {self.url!r}: {exc}") from exc
        if _fileno(port) is not None:
            port.timeout = 0  # select() waits; a read then takes whatever is there (socket:// read byte by byte)
        return port

    def _attach(self, port: serial.SerialBase, *, quiet: bool = False) -> None:
        self.decoder.reset()
        with self._tx_lock, self._cv:
            self._port = port
            self._generation += 1
            self._last_rx = time.monotonic()
            self.stats.connects += 1
            gen = self._generation
            self._cv.notify_all()
        log.log(logging.DEBUG if quiet else logging.INFO, "connected to %s (connection %d)", self.url, gen)
        self._notify_state(True, f"connected (connection {gen})")

    def _detach(self, port: serial.SerialBase, reason: str, *, loud: bool = True) -> None:
        with self._tx_lock:
            with self._cv:
                self._port = None
                self.stats.disconnects += 1
                waiters, self._waiters = self._waiters, []
                closing = self._closing
                self._cv.notify_all()
            try:
                port.close()
            except Exception as exc:  # closing a vanished port may itself fail; the port is gone either way
                log.debug("closing %s: %s", self.url, exc)
        error = LinkClosedError("link closed" if closing else reason)
        for w in waiters:
            w.error = error
            w.event.set()
        if not closing:
            log.log(logging.WARNING if loud else logging.DEBUG, "%s", reason)
            self._notify_state(False, reason)

    def _announce(self) -> None:
        if self.announce:
            try:
                self.send(self._hello_msg())
            except LinkError as exc:
                log.warning("HELLO on connect failed: %s", exc)

    def _run(self, port: serial.SerialBase | None) -> None:
        delay = self.backoff[0]
        down_since = time.monotonic()
        last_down_log = down_since
        flapping = False  # the last connection ended before the device said anything
        try:
            while not self._closing:
                heard = False
                reason = ""
                try:
                    if port is None:
                        try:
                            port = self._open_port()
                        except LinkOpenError as exc:
                            self.stats.open_failures += 1
                            now = time.monotonic()
                            if now - last_down_log >= STILL_DOWN_LOG_S:
                                last_down_log = now
                                log.warning("still no device on %s after %.0f s (%d attempts): %s", self.url,
                                            now - down_since, self.stats.open_failures, exc)
                            else:
                                log.debug("reconnect failed (%s); retrying in %.2f s", exc, delay)
                        else:
                            self._attach(port, quiet=flapping)
                            self._announce()
                    if port is not None:
                        reason, heard = self._serve(port)
                except Exception as exc:  # a bug here may end this connection, never the supervision
                    self.stats.internal_errors += 1
                    log.exception("serial link %s: internal error", self.url)
                    reason = f"port {self.url} dropped after an internal error: {exc!r}"
                if port is not None:
                    # A peer that drops every connection before saying anything (a board in a boot loop)
                    # is reported once, then again every STILL_DOWN_LOG_S, not once per attempt.
                    loud = heard or not flapping
                    self._detach(port, reason or f"port {self.url} closed", loud=loud)
                    port = None
                    now = time.monotonic()
                    if loud:
                        down_since = last_down_log = now
                    elif now - last_down_log >= STILL_DOWN_LOG_S:
                        last_down_log = now
                        log.warning("the device on %s keeps dropping the connection before it says anything "
                                    "(%.0f s, %d connections so far); still retrying", self.url, now - down_since,
                                    self.stats.connects)
                    flapping = not heard
                if not self.reconnect or self._closing:
                    break
                if heard:  # the device talked on that connection: it was a real session, start over fast
                    delay = self.backoff[0]
                with self._cv:
                    self._cv.wait_for(lambda: self._closing, timeout=delay)
                delay = min(delay * 2, self.backoff[1])
        finally:
            if port is not None:  # only reached through a BaseException: leave no port behind
                self._detach(port, f"port {self.url}: link thread ended")

    def _serve(self, port: serial.SerialBase) -> tuple[str, bool]:
        """Read, parse and watch one connection until it fails, falls silent or the link closes."""
        fd = _fileno(port)
        heard = False
        last_beat = 0.0
        while not self._closing:
            try:
                if fd is not None:
                    ready, _, _ = select.select([fd], [], [], POLL_S)
                    data = port.read(READ_MAX) if ready else b""
                else:
                    data = port.read(getattr(port, "in_waiting", 0) or 1)  # loop://, spy:// and the like
            except (serial.SerialException, OSError, ValueError, TypeError) as exc:
                return f"port {self.url} lost: {exc}", heard
            if data:
                self.stats.reads += 1
                self.stats.bytes_rx += len(data)
                for frame in self.decoder.feed(data):
                    self._last_rx = time.monotonic()
                    heard = True
                    try:
                        self._on_frame(frame)
                    except Exception:  # one bad message must not cost the connection
                        self.stats.internal_errors += 1
                        log.exception("serial link %s: handling frame type 0x%02x failed", self.url, frame.type)
            now = time.monotonic()
            silent = now - self._last_rx
            if self.liveness_s and silent > self.liveness_s:
                self.stats.liveness_timeouts += 1
                return (f"no frame from the device on {self.url} for {silent:.1f} s (limit {self.liveness_s} s): "
                        "it looks hung; reopening the port"), heard
            if self.heartbeat_s and silent >= self.heartbeat_s and now - last_beat >= self.heartbeat_s:
                last_beat = now
                try:
                    self.send(Heartbeat(int(now * 1000) & 0xFFFFFFFF))
                    self.stats.heartbeats_tx += 1
                except LinkError as exc:  # a stalled write: the liveness check will decide
                    log.debug("heartbeat not sent: %s", exc)
        return "link closed", heard

    def _notify_state(self, up: bool, detail: str) -> None:
        if self.on_state is not None:
            try:
                self.on_state(up, detail)
            except Exception:
                self.stats.callback_errors += 1
                log.exception("on_state callback failed")

    # --- state -----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """The port is open and the link thread is reading it."""
        return self._port is not None

    @property
    def supervising(self) -> bool:
        """The link thread runs: the link will notice a loss and reconnect (until `close()`)."""
        return self._thread.is_alive()

    @property
    def peer_alive(self) -> bool:
        """Connected, and the device sent an intact frame within `liveness_s` (or HEARTBEAT_S x 3)."""
        limit = self.liveness_s or 3 * HEARTBEAT_S
        return self.connected and time.monotonic() - self._last_rx <= limit

    @property
    def generation(self) -> int:
        """Increments on every (re)connection."""
        return self._generation

    def wait_connected(self, timeout: float, *, after: int = 0) -> int:
        """Wait until connected with a generation > `after`; returns the generation."""
        with self._cv:
            if not self._cv.wait_for(lambda: (self._port is not None and self._generation > after) or self._closing,
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
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(POLL_S * 20 + WRITE_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("serial link %s: link thread did not stop", self.url)
        self.stats.decoder = self.decoder.stats.as_dict()

    def __enter__(self) -> SerialLink:
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
            self._warn_peer("dropped frame type 0x%02x seq %d: %s", frame.type, frame.seq, exc)
            if exc.code == ErrorCode.BAD_VERSION:
                err = ProtocolVersionError(
                    f"device on {self.url} sends serial protocol version {frame.version} frames, this agent "
                    f"speaks version {PROTOCOL_VERSION}: update the firmware or the agent so they match")
                self.version_error = err
                self._answer_error(frame.type, ErrorCode.BAD_VERSION,
                                   f"agent speaks protocol version {PROTOCOL_VERSION}")
                with self._cv:  # no request can succeed against a peer of another version
                    waiters, self._waiters = self._waiters, []
                for w in waiters:
                    w.error = err
                    w.event.set()
            return
        self._dispatch(msg)

    def _warn_peer(self, fmt: str, *args: object) -> None:
        """Log what the device did wrong, at most PEER_LOG_BURST lines then one a second: a device of
        another version or a noisy line must not flood the journal."""
        if not self._peer_log.allow(time.monotonic()):
            return
        skipped, self._peer_log_skipped = self._peer_log.suppressed - self._peer_log_skipped, self._peer_log.suppressed
        log.warning(fmt + (f" ({skipped} similar lines suppressed)" if skipped else ""), *args)

    def _answer_error(self, frame_type: int, code: ErrorCode, detail: str) -> None:
        """Answer a rejected frame, never an ERROR and within the rate limit (error_replies.py)."""
        if not self._error_replies.should_reply(frame_type, time.monotonic()):
            self.stats.error_replies_suppressed += 1
            return
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
                self._answer_error(int(MessageType.HELLO), ErrorCode.BAD_VERSION,
                                   f"agent speaks protocol version {PROTOCOL_VERSION}")
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
            self._warn_peer("device reports ERROR %s: %s", getattr(msg.code, "name", msg.code), msg.detail)
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

    def _put(self, q: queue.Queue[Any], item: Any) -> None:
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
        with self._tx_lock:
            self._write(data)

    def _write(self, data: bytes) -> None:
        """Write under _tx_lock (held by the caller)."""
        port = self._port
        if port is None:
            raise LinkClosedError(f"{self.url}: not connected")
        try:
            port.write(data)
        except serial.SerialTimeoutException as exc:
            raise LinkClosedError(f"{self.url}: write stalled for {WRITE_TIMEOUT_S} s: the device is not reading "
                                  "its port") from exc
        except (serial.SerialException, OSError, ValueError, TypeError) as exc:
            raise LinkClosedError(f"{self.url}: write failed: {exc}") from exc
        self.stats.bytes_tx += len(data)

    def _send(self, msg: Message, waiter_for: Callable[[int], _Waiter] | None) -> int:
        with self._tx_lock:
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
            with self._tx_lock:
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
