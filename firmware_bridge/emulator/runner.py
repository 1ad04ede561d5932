"""EmulatedMcu: the emulated MCU's tasks and wiring (threads, sessions, ERROR replies, freeze, unplug).

Each job is elsewhere: the wire in `ports`, the head push in `staging` (pure), the sensor in `stream`,
the backbone in `inference`. This module runs them as the firmware does: a UART task that decodes
frames and answers them, and a sensor task that streams a window per interval and, once a head is
committed, runs backbone + head on it and sends INFER_RESULT.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..error_replies import ErrorReplyLimiter, answers_with_error
from ..framing import PROTOCOL_VERSION, Frame, FrameDecoder, encode_frame
from ..head_blob import HeadBlob
from ..messages import (
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
    decode_message,
    encode_message,
)
from .inference import DEFAULT_BACKBONE, McuBackbone
from .ports import BaudPacer, FdPort, Port, PtyPort, SerialPort, SocketServerPort
from .staging import MAX_HEAD_BYTES, HeadReceiver, Staging
from .stream import SensorStream, subject_windows

log = logging.getLogger("firmware_bridge.emulator")

BOARD = "edge-fl-emulator"
TOTAL_RAM = 256 * 1024  # what the emulated board pretends to have


@dataclass
class EmulatorStats:
    frames_rx: int = 0
    frames_tx: int = 0
    bytes_rx: int = 0
    bytes_handled: int = 0  # received bytes whose frames are all handled (every reply to them written)
    bytes_tx: int = 0
    hello_rx: int = 0
    errors_rx: int = 0
    errors_tx: dict[str, int] = field(default_factory=dict)
    errors_suppressed: int = 0  # ERROR replies not sent: over the rate limit (error_replies)
    errors_unanswered: int = 0  # rejected frames that were themselves ERRORs: never answered
    windows_sent: int = 0
    results_sent: int = 0
    chunks_rx: int = 0
    heads_committed: int = 0
    commits_refused: int = 0
    tx_dropped: int = 0  # frames not written (no agent draining the port)
    sessions: int = 0
    decoder: dict[str, int] = field(default_factory=dict)


class EmulatedMcu:
    """See the package docstring. Starts on construction; `stop()` (or a `with` block) ends it."""

    def __init__(self, port_url_or_fd: int | str, *, subject: int, rate_hz: int = 50, window_s: float = 2.0,
                 stride_s: float = 0.5, backbone: str | os.PathLike[str] = DEFAULT_BACKBONE, realtime: bool = True,
                 labelled: bool = True, speedup: float = 1.0, baudrate: int | None = None,
                 proto_version: int = PROTOCOL_VERSION, runtime: str = "auto", split: str = "test",
                 heartbeat_s: float = 0.0, _port: Port | None = None) -> None:
        self.subject, self.rate_hz, self.realtime = subject, rate_hz, realtime
        self.proto_version, self.baudrate = proto_version, baudrate
        self.heartbeat_s = heartbeat_s
        x, y = subject_windows(subject, split=split, window_s=window_s, stride_s=stride_s)
        self.sensor = SensorStream(x, y, interval=stride_s / speedup, labelled=labelled)
        self.backbone = McuBackbone(backbone, runtime)
        self.inference_runtime = self.backbone.runtime
        self.board = f"{BOARD} ({self.inference_runtime})"
        self.head_rx = HeadReceiver(self.backbone.embedding_dim, MAX_HEAD_BYTES)
        self.stats = EmulatorStats()
        self.decoder = FrameDecoder()
        self.sent: dict[int, tuple[int, int]] = {}  # window_id -> (index into the subject's windows, label)
        self.results: dict[int, InferResult] = {}  # window_id -> what we answered
        self.corrupt_tx = 0  # tests: corrupt this many next outgoing frames
        self.unplug_on_chunk: int | None = None  # tests: unplug when this HEAD_CHUNK index arrives
        self.replug_after_s = 0.2
        self._seq = 0
        self._session = False  # an agent said HELLO on this connection: stream
        self.error_replies = ErrorReplyLimiter()
        # freeze(): the firmware hangs. Cleared = hung; the busy locks are held while a frame is handled or
        # a window streamed, so freeze() returns only once the firmware is really still.
        self._thawed = threading.Event()
        self._thawed.set()
        self._rx_busy = threading.Lock()
        self._stream_busy = threading.Lock()
        self._pending: list[Frame] = []  # frames read but not yet handled when the firmware froze...
        self._pending_bytes = 0  # ...and the bytes they came in
        self._tx_lock = threading.Lock()
        self._stop = threading.Event()
        self._plugged = threading.Event()
        self._pacer = BaudPacer(baudrate)
        self._t0 = time.monotonic()
        self._link_dir: tempfile.TemporaryDirectory[str] | None = None
        self.port_url = ""
        self._port: Port
        if _port is not None:
            self._port = _port
        elif isinstance(port_url_or_fd, int):
            self._port = FdPort(port_url_or_fd)
        elif port_url_or_fd == "pty":
            self._link_dir = tempfile.TemporaryDirectory(prefix="edge-fl-emu-")
            self.port_url = os.path.join(self._link_dir.name, "ttyEMU0")
            self._port = PtyPort(self.port_url)
        else:
            self._port = SerialPort(port_url_or_fd, baudrate or 115200)
        self._plugged.set()
        self._threads = [threading.Thread(target=self._rx_loop, name="emu-rx", daemon=True),
                         threading.Thread(target=self._stream_loop, name="emu-stream", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("emulated MCU up: subject %d, %d windows, inference on %s, port %s", subject, len(self.sensor),
                 self.inference_runtime, self.port_url or port_url_or_fd)

    @classmethod
    def on_pty(cls, **kw: Any) -> EmulatedMcu:
        return cls("pty", **kw)

    @classmethod
    def on_socket(cls, port: int = 0, host: str = "127.0.0.1", **kw: Any) -> EmulatedMcu:
        holder: list[EmulatedMcu] = []
        server = SocketServerPort(host, port, lambda: holder[0]._new_session() if holder else None)
        emu = cls(f"socket://{host}:{server.address[1]}", _port=server, **kw)
        holder.append(emu)
        emu.port_url = f"socket://{host}:{server.address[1]}"
        return emu

    # --- what tests and benches look at ---------------------------------------------------------

    @property
    def head(self) -> HeadBlob | None:
        return self.head_rx.head

    @property
    def head_id(self) -> int | None:
        return self.head_rx.head_id

    @property
    def staging(self) -> Staging | None:
        return self.head_rx.staging

    @property
    def windows_x(self) -> Any:
        return self.sensor.windows_x

    @property
    def windows_y(self) -> Any:
        return self.sensor.windows_y

    @property
    def scale(self) -> float:
        return self.sensor.scale

    @property
    def interval(self) -> float:
        return self.sensor.interval

    @property
    def labelled(self) -> bool:
        return self.sensor.labelled

    # --- unplug / replug ------------------------------------------------------------------------

    def unplug(self) -> None:
        """The cable comes out: the agent's port errors; staging is lost, the committed head stays."""
        self._plugged.clear()
        with self._tx_lock:
            self._session = False
            self.head_rx.abandon()
            self._port.close()  # a pty's master and slave
        log.info("unplugged")

    def replug(self) -> None:
        if self._link_dir is None:
            raise RuntimeError("replug() needs a pty emulator (on_pty)")
        with self._tx_lock:
            self.decoder.reset()
            self._pending, self._pending_bytes = [], 0
            self._port = PtyPort(self.port_url)
            self.stats.sessions += 1
        self._plugged.set()
        log.info("replugged on %s", os.readlink(self.port_url))

    def _new_session(self) -> None:
        with self._tx_lock:
            self._session = False
            self.head_rx.abandon()
            self.decoder.reset()
            self._pending, self._pending_bytes = [], 0
            self.stats.sessions += 1

    def _unplug_replug(self) -> None:
        self.unplug()
        if self._stop.wait(self.replug_after_s):
            return
        self.replug()

    # --- I/O ------------------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        mtype, payload = encode_message(msg)
        with self._tx_lock:
            if not self._plugged.is_set() or not self._thawed.is_set():  # unplugged, or hung: nothing goes out
                self.stats.tx_dropped += 1
                return
            data = encode_frame(mtype, self._seq, payload, version=self.proto_version)
            self._seq = (self._seq + 1) & 0xFFFF
            if self.corrupt_tx > 0:
                self.corrupt_tx -= 1
                b = bytearray(data)
                b[len(b) // 2] = (b[len(b) // 2] % 255) + 1  # a nonzero byte: the frame stays delimited
                data = bytes(b)
            try:
                for off in range(0, len(data), 64):
                    piece = data[off:off + 64]
                    self._pacer.pace(len(piece))
                    self._port.write(piece)
            except (TimeoutError, OSError) as exc:
                self.stats.tx_dropped += 1
                log.debug("frame dropped: %s", exc)
                return
            self.stats.frames_tx += 1
            self.stats.bytes_tx += len(data)

    def _reply_error(self, frame_type: int, code: ErrorCode, detail: str) -> None:
        """Answer a rejected frame of `frame_type` with ERROR, as error_replies allows.

        Every ERROR the emulator sends answers a received frame, so every one goes through here: two
        peers of different versions must not answer each other's ERRORs forever.
        """
        if not answers_with_error(frame_type):
            self.stats.errors_unanswered += 1
            return
        if not self.error_replies.allow(time.monotonic()):
            self.stats.errors_suppressed += 1
            return
        self.stats.errors_tx[code.name] = self.stats.errors_tx.get(code.name, 0) + 1
        self.send(ErrorMsg(code, detail))

    # --- freeze / thaw --------------------------------------------------------------------------

    def freeze(self) -> None:
        """The firmware hangs: it stops reading, answering and streaming; the port stays open.

        Returns once a frame being handled or a window being streamed is done, so nothing the
        firmware does is observable after it. Bytes the agent writes meanwhile wait in the port
        (as in a UART's buffer) and are handled after `thaw()`.
        """
        self._thawed.clear()
        with self._rx_busy, self._stream_busy:
            pass
        log.info("frozen")

    def thaw(self) -> None:
        """The firmware resumes where it stopped: pending bytes are handled, streaming goes on."""
        self._thawed.set()
        log.info("thawed")

    @property
    def frozen(self) -> bool:
        return not self._thawed.is_set()

    # --- the UART task --------------------------------------------------------------------------

    def _rx_loop(self) -> None:
        while not self._stop.is_set():
            if not self._plugged.wait(0.1) or not self._thawed.wait(0.1):
                continue
            if self._pending:
                frames, n_bytes = self._pending, self._pending_bytes
                self._pending, self._pending_bytes = [], 0
                self._handle_frames(frames, n_bytes)
                continue
            port = self._port
            try:
                data = port.read(0.1)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EBADF) and not self._plugged.is_set():
                    continue
                if self._stop.is_set():
                    return
                log.debug("read failed: %s", exc)
                time.sleep(0.05)
                continue
            except (ValueError, TypeError):  # select() on a port closed by unplug()/stop()
                continue
            if not data:
                continue
            self._pacer.pace(len(data), "rx")
            self.stats.bytes_rx += len(data)
            self._handle_frames(self.decoder.feed(data), len(data))
            self.stats.decoder = self.decoder.stats.as_dict()

    def _handle_frames(self, frames: list[Frame], n_bytes: int) -> None:
        for i, frame in enumerate(frames):
            with self._rx_busy:
                if not self._thawed.is_set():  # froze mid-read: the rest waits for thaw()
                    self._pending, self._pending_bytes = frames[i:], n_bytes
                    return
                self._on_frame(frame)
        # Counted once every frame in them is handled: a test that wrote N bytes and sees
        # bytes_handled reach N knows every reply to them is already written.
        self.stats.bytes_handled += n_bytes

    def _on_frame(self, frame: Frame) -> None:
        self.stats.frames_rx += 1
        if frame.type == MessageType.ERROR:  # any version, even one we cannot decode
            self.stats.errors_rx += 1
        try:
            msg = decode_message(frame, version=self.proto_version)
        except MessageError as exc:
            self._reply_error(frame.type, exc.code, str(exc))
            return
        try:
            self._handle(msg, frame.seq)
        except Exception as exc:  # a firmware bug must not kill the UART task
            log.exception("handling %s failed", type(msg).__name__)
            self._reply_error(frame.type, ErrorCode.BAD_MESSAGE, f"{type(msg).__name__}: {exc}")

    def _handle(self, msg: Message, seq: int) -> None:
        if isinstance(msg, Hello):
            self.stats.hello_rx += 1
            if msg.proto_version != self.proto_version:
                self._reply_error(msg.TYPE, ErrorCode.BAD_VERSION, f"MCU speaks protocol version {self.proto_version}, "
                                                                   f"agent said {msg.proto_version}")
                return
            self.send(Hello(self.rate_hz, TOTAL_RAM - self.backbone.arena_size - self.head_rx.max_head_bytes,
                            self.backbone.arena_size, self.board, proto_version=self.proto_version))
            self._session = True
        elif isinstance(msg, (HeadBegin, HeadChunk, HeadCommit)):
            self._head_push(msg, seq)
        elif isinstance(msg, ErrorMsg):
            log.info("agent reports ERROR %s: %s", getattr(msg.code, "name", msg.code), msg.detail)
        elif isinstance(msg, Heartbeat):
            self.send(Heartbeat(self._uptime_ms()))
        # ACK, SENSOR_WINDOW, INFER_RESULT: known types an MCU does not act on, so not answered
        # (as the C firmware, which hands them to the application).

    def _head_push(self, msg: HeadBegin | HeadChunk | HeadCommit, seq: int) -> None:
        """The head-push rules are staging's (as edgefl_head_rx_* in the C firmware); this only wires them."""
        if (isinstance(msg, HeadChunk) and self.unplug_on_chunk is not None and msg.index == self.unplug_on_chunk
                and self.head_rx.accepts(msg)):
            # Test hook: the cable comes out while this chunk is on the wire. It arrived; it is never stored.
            self.unplug_on_chunk = None
            self.head_rx.stats.chunks_rx += 1
            self._sync_head_stats()
            threading.Thread(target=self._unplug_replug, daemon=True).start()
            return
        reply = self.head_rx.handle(msg)
        self._sync_head_stats()
        if reply.error is None:
            self.send(Ack(int(msg.TYPE), seq, 0, reply.index))
        else:
            self._reply_error(msg.TYPE, reply.error, reply.detail)

    def _sync_head_stats(self) -> None:
        st = self.head_rx.stats
        self.stats.chunks_rx, self.stats.heads_committed, self.stats.commits_refused = (
            st.chunks_rx, st.heads_committed, st.commits_refused)

    def _uptime_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000) & 0xFFFFFFFF

    # --- the sensor task ------------------------------------------------------------------------

    def _stream_loop(self) -> None:
        next_t = time.monotonic()
        last_beat = next_t
        while not self._stop.is_set():
            if self.realtime:
                delay = next_t - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                next_t = self.sensor.next_due(next_t, time.monotonic())
            if not (self._session and self._plugged.is_set() and self._thawed.is_set()):
                if not self.realtime:
                    self._stop.wait(0.01)
                continue
            with self._stream_busy:
                if not self._thawed.is_set():  # froze while we waited for the next window
                    continue
                self.stream_one()
                if self.heartbeat_s and time.monotonic() - last_beat > self.heartbeat_s:
                    last_beat = time.monotonic()
                    self.send(Heartbeat(self._uptime_ms()))

    def stream_one(self) -> SensorWindow:
        """Send the next window and, when a head is committed, its INFER_RESULT."""
        w = self.sensor.next_window()
        msg, wid = w.msg, w.msg.window_id
        self.sent[wid] = (w.index, w.label)
        self.send(msg)
        self.stats.windows_sent += 1
        active = self.head_rx.active  # one read: a commit in between must not mix two heads
        if active is not None:
            head_id, head = active
            classes, scores = head.predict(self.backbone.embed(msg.to_float()))
            res = InferResult(wid, int(classes[0]), float(scores[0]), head_id)
            self.results[wid] = res
            self.send(res)
            self.stats.results_sent += 1
        return msg

    # --- lifetime -------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self._port.close()
        if self._link_dir is not None:
            self._link_dir.cleanup()
        self.stats.decoder = self.decoder.stats.as_dict()

    def __enter__(self) -> EmulatedMcu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
