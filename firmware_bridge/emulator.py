"""An emulated MCU that speaks PROTOCOL.md: the other end of the link for tests, benches and demos.

It does what the firmware does: answers HELLO, streams a subject's real IMU windows (int16 + scale) at
the sensor rate, receives head pushes into a staging buffer (ACK per chunk, atomic commit only when
complete and CRC-32-correct), and for every window streamed after a commit runs backbone + head and
sends INFER_RESULT. The backbone runs under TensorFlow Lite Micro (`tflite-micro`) when it imports,
as on an MCU; otherwise under the regular interpreter with reference kernels. `inference_runtime` (and
the HELLO board string suffix) says which.

Its rules are the C firmware's, checked against the same conformance scenarios
(firmware_bridge/firmware/conformance/mcu.txt): head-push staging and chunk sizes, head validation, and
the ERROR-reply rule of `error_replies` (an ERROR is never answered; ERROR replies are rate-limited).
`freeze()` / `thaw()` make the firmware hang and resume with the port left open.

Ports: `EmulatedMcu.on_pty()` (a pty pair; agents open `port_url`, a stable symlink to the slave, so
`unplug()`/`replug()` can swap the pty under it), `EmulatedMcu.on_socket(port)` (serves
`socket://127.0.0.1:PORT`, one agent at a time), or an fd / pyserial URL given to the constructor.

    python -m firmware_bridge.emulator --pty            # prints the pty path, runs until killed
    python -m firmware_bridge.emulator --socket 5555    # serves socket://127.0.0.1:5555
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .error_replies import ErrorReplyLimiter, answers_with_error
from .framing import PROTOCOL_VERSION, Frame, FrameDecoder, crc32, encode_frame
from .head_blob import HeadBlob, HeadBlobError, decode_head
from .messages import (
    HEAD_CHUNK_MAX,
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
    window_to_int16,
)

log = logging.getLogger("firmware_bridge.emulator")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BACKBONE = ROOT / "models" / "backbone_int8.tflite"
BOARD = "edge-fl-emulator"
TOTAL_RAM = 256 * 1024  # what the emulated board pretends to have
ARENA_SIZE = 64 * 1024  # tflite-micro tensor arena (the backbone needs ~30 KiB; measured with print_allocations)
MAX_HEAD_BYTES = 32 * 1024  # staging buffer: a HEAD_BEGIN announcing more is refused OUT_OF_MEMORY
EMBEDDING_DIM = 64  # what the backbone gives: a head for another width is refused BAD_MESSAGE


# --- ports ----------------------------------------------------------------------------------------

class _Port:
    """Byte pipe the emulator reads and writes; `read` returns b"" on timeout, raises OSError when gone."""

    def read(self, timeout: float) -> bytes:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FdPort(_Port):
    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)

    def read(self, timeout: float) -> bytes:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return b""
        try:
            return os.read(self.fd, 4096)
        except BlockingIOError:
            return b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 1.0
        while view:
            _, w, _ = select.select([], [self.fd], [], 0.1)
            if w:
                try:
                    n = os.write(self.fd, view)
                    view = view[n:]
                    continue
                except BlockingIOError:
                    pass
            if time.monotonic() > deadline:  # nobody drains the pty: like a UART into the void
                raise TimeoutError("port write stalled")

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class _SocketServerPort(_Port):
    """Serves one TCP client at a time (pyserial `socket://`); no client = bytes go nowhere."""

    def __init__(self, host: str, port: int, on_new_client: Callable[[], None]) -> None:
        self.server = socket.create_server((host, port), reuse_port=False)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.address = self.server.getsockname()
        self.client: socket.socket | None = None
        self.on_new_client = on_new_client
        self._lock = threading.Lock()

    def read(self, timeout: float) -> bytes:
        if self.client is None:
            r, _, _ = select.select([self.server], [], [], timeout)
            if r:
                client, _ = self.server.accept()
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    self.client = client
                self.on_new_client()
            return b""
        client = self.client  # the stream thread may drop it concurrently
        if client is None:
            return b""
        try:
            r, _, _ = select.select([client], [], [], timeout)
            if not r:
                return b""
            data = client.recv(4096)
        except (OSError, ValueError):
            data = b""
        if not data:  # the agent went away: wait for the next one
            self._drop_client()
        return data

    def _drop_client(self) -> None:
        with self._lock:
            client, self.client = self.client, None
        if client is not None:
            client.close()

    def write(self, data: bytes) -> None:
        client = self.client
        if client is None:
            raise TimeoutError("no agent connected")
        try:
            client.sendall(data)
        except OSError as exc:
            self._drop_client()
            raise TimeoutError(f"agent went away: {exc}") from exc

    def close(self) -> None:
        self._drop_client()
        self.server.close()


class _SerialPort(_Port):
    def __init__(self, url: str, baudrate: int) -> None:
        import serial  # only this port kind needs pyserial

        self.ser = serial.serial_for_url(url, baudrate=baudrate, timeout=0.1)

    def read(self, timeout: float) -> bytes:
        self.ser.timeout = timeout
        return bytes(self.ser.read(self.ser.in_waiting or 1))

    def write(self, data: bytes) -> None:
        self.ser.write(data)

    def close(self) -> None:
        self.ser.close()


# --- inference ------------------------------------------------------------------------------------

class _Backbone:
    """int8 backbone as an MCU runs it: one window at a time; tflite-micro when it imports.

    One interpreter, one input and one output buffer: `embed` is serialized by a lock, because the
    stream thread and a caller (tests, benches) may embed at the same time. Without it, a thread
    switch between set_input, invoke and get_output hands one caller the other's window (measured:
    154 of 23994 embeddings wrong while the stream ran and two busy loops loaded the 2 cores).
    """

    def __init__(self, path: Path, runtime: str = "auto", arena_size: int = ARENA_SIZE) -> None:
        import json

        meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
        stats = meta.get("input", {})
        self.mean = np.asarray(stats.get("channel_mean", 0.0), np.float32)
        self.std = np.asarray(stats.get("channel_std", 1.0), np.float32)
        self.runtime = ""
        self._tfm: Any = None
        self._fallback: Any = None
        self._lock = threading.Lock()  # set_input -> invoke -> get_output must not interleave
        errors = []
        if runtime in ("auto", "tflite-micro"):
            try:
                from tflite_micro import runtime as tfm_runtime

                self._tfm = tfm_runtime.Interpreter.from_file(str(path), arena_size=arena_size)
                inp = self._tfm.get_input_details(0)
                self._in_scale = float(inp["quantization_parameters"]["scales"][0])
                self._in_zp = int(inp["quantization_parameters"]["zero_points"][0])
                self._in_shape = tuple(int(d) for d in inp["shape"])
                outs = [self._tfm.get_output_details(i) for i in range(2)]
                dim = meta.get("embedding_dim", 64)
                self._out_index = next(i for i, o in enumerate(outs) if int(np.prod(o["shape"][1:])) == dim)
                q = outs[self._out_index]["quantization_parameters"]
                self._out_scale, self._out_zp = float(q["scales"][0]), int(q["zero_points"][0])
                self.runtime = "tflite-micro"
            except Exception as exc:  # not installed, or no wheel for this platform
                errors.append(f"tflite-micro: {exc}")
                if runtime == "tflite-micro":
                    raise
        if self._tfm is None:
            from edge_agent.backbone import FrozenBackbone

            # The builtin kernels without XNNPACK: closest to an MCU's, yet not bit-identical to tflite-micro
            # (the last FULLY_CONNECTED requantizes ties differently: 1 LSB on ~0.07 % of the values).
            self._fallback = FrozenBackbone(path, reference_kernels=True, batch_size=1)
            self.runtime = f"{self._fallback.runtime} (reference kernels)"
            log.info("tflite-micro unavailable (%s); using %s", "; ".join(errors), self.runtime)
        self.arena_size = arena_size if self._tfm is not None else 0

    @property
    def embedding_lsb(self) -> float:
        """One step of the int8 embedding (its output quantization scale), in embedding units."""
        return float(self._fallback._out_scale if self._fallback is not None else self._out_scale)

    def embed(self, window: np.ndarray) -> np.ndarray:
        """One float window (n_samples, channels) -> float32 (1, dim), quantized exactly as FrozenBackbone does."""
        if self._fallback is not None:
            with self._lock:
                return np.asarray(self._fallback.embed(window[None]))
        x = (np.asarray(window, np.float32)[None] - self.mean) / self.std
        x = np.clip(np.round(x / self._in_scale) + self._in_zp, -128, 127).astype(np.int8)
        with self._lock:
            self._tfm.set_input(x.reshape(self._in_shape), 0)
            self._tfm.invoke()
            y = np.array(self._tfm.get_output(self._out_index)).reshape(1, -1).astype(np.float32)
        out = np.empty_like(y)
        out[:] = (y - self._out_zp) * self._out_scale
        return out


# --- the MCU --------------------------------------------------------------------------------------

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


@dataclass
class _Staging:
    """A head push in progress, with the C firmware's rules (PROTOCOL.md, "Head push")."""

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


class EmulatedMcu:
    """See the module docstring. Starts on construction; `stop()` (or a `with` block) ends it."""

    def __init__(self, port_url_or_fd: int | str, *, subject: int, rate_hz: int = 50, window_s: float = 2.0,
                 stride_s: float = 0.5, backbone: str | os.PathLike[str] = DEFAULT_BACKBONE, realtime: bool = True,
                 labelled: bool = True, speedup: float = 1.0, baudrate: int | None = None,
                 proto_version: int = PROTOCOL_VERSION, runtime: str = "auto", split: str = "test",
                 heartbeat_s: float = 0.0, _port: _Port | None = None) -> None:
        from edge_agent.data.watch import load_watch_dataset
        from edge_agent.data.windows import WindowConfig, split_and_window

        self.subject, self.rate_hz, self.realtime, self.labelled = subject, rate_hz, realtime, labelled
        self.proto_version, self.baudrate = proto_version, baudrate
        self.interval = stride_s / speedup
        self.heartbeat_s = heartbeat_s
        train, test = split_and_window(load_watch_dataset(), WindowConfig(length_s=window_s, stride_s=stride_s))
        ws = test if split == "test" else train
        ws = ws.select(ws.subject == subject)
        if len(ws) == 0:
            raise ValueError(f"subject {subject} has no {split} windows")
        self.windows_x, self.windows_y = ws.x, ws.y
        # One fixed scale for the whole stream, as an IMU's full-scale range is fixed.
        self.scale = choose_scale(ws.x)
        self.backbone = _Backbone(Path(backbone), runtime)
        self.inference_runtime = self.backbone.runtime
        self.board = f"{BOARD} ({self.inference_runtime})"
        self.stats = EmulatorStats()
        self.decoder = FrameDecoder()
        self.head: HeadBlob | None = None
        self.head_id: int | None = None
        self.staging: _Staging | None = None
        self.sent: dict[int, tuple[int, int]] = {}  # window_id -> (index into the subject's windows, label)
        self.results: dict[int, InferResult] = {}  # window_id -> what we answered
        self.corrupt_tx = 0  # tests: corrupt this many next outgoing frames
        self.unplug_on_chunk: int | None = None  # tests: unplug when this HEAD_CHUNK index arrives
        self.replug_after_s = 0.2
        self._seq = 0
        self._window_id = 0
        self._next_window = 0
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
        self._budget_t = {"tx": time.monotonic(), "rx": time.monotonic()}
        self._t0 = time.monotonic()
        self._link_dir: tempfile.TemporaryDirectory[str] | None = None
        self.port_url = ""
        self._pty_fds: tuple[int, int] | None = None
        if _port is not None:
            self._port = _port
        elif isinstance(port_url_or_fd, int):
            self._port = _FdPort(port_url_or_fd)
        elif port_url_or_fd == "pty":
            self._link_dir = tempfile.TemporaryDirectory(prefix="edge-fl-emu-")
            self.port_url = os.path.join(self._link_dir.name, "ttyEMU0")
            self._port = self._open_pty()
        else:
            self._port = _SerialPort(port_url_or_fd, baudrate or 115200)
        self._plugged.set()
        self._threads = [threading.Thread(target=self._rx_loop, name="emu-rx", daemon=True),
                         threading.Thread(target=self._stream_loop, name="emu-stream", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("emulated MCU up: subject %d, %d windows, inference on %s, port %s", subject, len(ws),
                 self.inference_runtime, self.port_url or port_url_or_fd)

    @classmethod
    def on_pty(cls, **kw: Any) -> EmulatedMcu:
        return cls("pty", **kw)

    @classmethod
    def on_socket(cls, port: int = 0, host: str = "127.0.0.1", **kw: Any) -> EmulatedMcu:
        holder: list[EmulatedMcu] = []
        server = _SocketServerPort(host, port, lambda: holder[0]._new_session() if holder else None)
        emu = cls(f"socket://{host}:{server.address[1]}", _port=server, **kw)
        holder.append(emu)
        emu.port_url = f"socket://{host}:{server.address[1]}"
        return emu

    # --- pty plumbing (unplug / replug) ---------------------------------------------------------

    def _open_pty(self) -> _Port:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line discipline, before anyone opens it
        self._pty_fds = (master, slave)  # keep the slave open: reads on the master then never EIO
        tmp = self.port_url + ".tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.port_url)
        return _FdPort(master)

    def unplug(self) -> None:
        """The cable comes out: the agent's port errors; staging is lost, the committed head stays."""
        self._plugged.clear()
        with self._tx_lock:
            self._session = False
            self.staging = None
            self._port.close()
            if self._pty_fds is not None:
                try:
                    os.close(self._pty_fds[1])
                except OSError:
                    pass
        log.info("unplugged")

    def replug(self) -> None:
        if self._link_dir is None:
            raise RuntimeError("replug() needs a pty emulator (on_pty)")
        with self._tx_lock:
            self.decoder.reset()
            self._pending, self._pending_bytes = [], 0
            self._port = self._open_pty()
            self.stats.sessions += 1
        self._plugged.set()
        log.info("replugged on %s", os.readlink(self.port_url))

    def _new_session(self) -> None:
        with self._tx_lock:
            self._session = False
            self.staging = None
            self.decoder.reset()
            self._pending, self._pending_bytes = [], 0
            self.stats.sessions += 1

    # --- I/O ------------------------------------------------------------------------------------

    def _pace(self, n: int, direction: str = "tx") -> None:
        """Hold each direction's byte rate at baudrate/10 (8N1, full duplex) when a baud rate is set."""
        if not self.baudrate:
            return
        now = time.monotonic()
        t = max(self._budget_t[direction], now) + n * 10.0 / self.baudrate
        self._budget_t[direction] = t
        delay = t - now
        if delay > 0:
            time.sleep(delay)

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
                    self._pace(len(piece))
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

    # --- receive --------------------------------------------------------------------------------

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
            self._pace(len(data), "rx")
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
            self.send(Hello(self.rate_hz, TOTAL_RAM - self.backbone.arena_size - MAX_HEAD_BYTES,
                            self.backbone.arena_size, self.board, proto_version=self.proto_version))
            self._session = True
        elif isinstance(msg, HeadBegin):
            self._begin(msg, seq)
        elif isinstance(msg, HeadChunk):
            self._chunk(msg, seq)
        elif isinstance(msg, HeadCommit):
            self._commit(msg, seq)
        elif isinstance(msg, ErrorMsg):
            log.info("agent reports ERROR %s: %s", getattr(msg.code, "name", msg.code), msg.detail)
        elif isinstance(msg, Heartbeat):
            self.send(Heartbeat(self._uptime_ms()))
        # ACK, SENSOR_WINDOW, INFER_RESULT: known types an MCU does not act on, so not answered
        # (as the C firmware, which hands them to the application).

    def _unplug_replug(self) -> None:
        self.unplug()
        if self._stop.wait(self.replug_after_s):
            return
        self.replug()

    # --- head push: the same rules as edgefl_head_rx_* in the C firmware (PROTOCOL.md, "Head push") ---

    def _begin(self, msg: HeadBegin, seq: int) -> None:
        self.staging = None  # a new BEGIN abandons an unfinished push, even when it is refused itself
        if (msg.total_len == 0 or msg.n_chunks == 0 or msg.n_chunks > msg.total_len
                or msg.total_len > msg.n_chunks * HEAD_CHUNK_MAX):
            self._reply_error(msg.TYPE, ErrorCode.BAD_MESSAGE, f"HEAD_BEGIN: {msg.total_len} bytes cannot be "
                              f"{msg.n_chunks} chunks of 1..{HEAD_CHUNK_MAX} bytes")
            return
        if msg.total_len > MAX_HEAD_BYTES:
            self._reply_error(msg.TYPE, ErrorCode.OUT_OF_MEMORY,
                              f"head of {msg.total_len} bytes, staging holds {MAX_HEAD_BYTES}")
            return
        self.staging = _Staging(msg.head_id, msg.total_len, msg.n_chunks, msg.head_crc32,
                                data=bytearray(msg.total_len))
        self.send(Ack(int(msg.TYPE), seq))

    def _chunk(self, msg: HeadChunk, seq: int) -> None:
        st = self.staging
        if st is None or st.head_id != msg.head_id:
            self._reply_error(msg.TYPE, ErrorCode.BAD_MESSAGE,
                              f"HEAD_CHUNK for head {msg.head_id:#x} without its HEAD_BEGIN")
            return
        if msg.index >= st.n_chunks:
            self._reply_error(msg.TYPE, ErrorCode.BAD_MESSAGE, f"chunk index {msg.index} >= n_chunks {st.n_chunks}")
            return
        self.stats.chunks_rx += 1
        if self.unplug_on_chunk is not None and msg.index == self.unplug_on_chunk:
            self.unplug_on_chunk = None
            threading.Thread(target=self._unplug_replug, daemon=True).start()
            return
        if st.chunk_size == 0 and not st.fix_chunk_size(msg.index, len(msg.data)):
            self._reply_error(msg.TYPE, ErrorCode.BAD_LENGTH, f"chunk {msg.index} of {len(msg.data)} bytes: no chunk "
                              f"size splits {st.total_len} bytes into {st.n_chunks} chunks with it")
            return
        if len(msg.data) != st.expected_len(msg.index):
            self._reply_error(msg.TYPE, ErrorCode.BAD_LENGTH, f"chunk {msg.index} has {len(msg.data)} bytes, "
                              f"must have {st.expected_len(msg.index)} (chunk size {st.chunk_size})")
            return
        off = msg.index * st.chunk_size
        st.data[off:off + len(msg.data)] = msg.data  # a resend of a chunk whose ACK got lost just overwrites
        st.received.add(msg.index)
        self.send(Ack(int(msg.TYPE), seq, 0, msg.index))

    def _commit(self, msg: HeadCommit, seq: int) -> None:
        st = self.staging
        if st is None or st.head_id != msg.head_id:
            if msg.head_id == self.head_id:
                self.send(Ack(int(msg.TYPE), seq))  # a resent COMMIT whose ACK got lost
            else:
                self.stats.commits_refused += 1
                self._reply_error(msg.TYPE, ErrorCode.HEAD_INCOMPLETE,
                                  f"head {msg.head_id:#x} was not staged; keeping head {self.head_id}")
            return
        if len(st.received) != st.n_chunks:
            # Staging is kept: on a flaky link the agent resends the missing chunks and commits again.
            missing = [i for i in range(st.n_chunks) if i not in st.received]
            self.stats.commits_refused += 1
            self._reply_error(msg.TYPE, ErrorCode.HEAD_INCOMPLETE, f"head {st.head_id:#x}: missing chunks {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''} of {st.n_chunks}")
            return
        self.staging = None  # complete: from here on the push is over, committed or refused
        blob = bytes(st.data)
        if crc32(blob) != st.crc:
            self.stats.commits_refused += 1
            self._reply_error(msg.TYPE, ErrorCode.HEAD_CRC,
                              f"head {st.head_id:#x}: CRC-32 {crc32(blob):#010x}, announced {st.crc:#010x}")
            return
        try:
            head = decode_head(blob)  # finite values, std > 0, scales > 0: PROTOCOL.md, "Head blob"
            if head.embedding_dim != EMBEDDING_DIM:
                raise HeadBlobError(f"embedding_dim {head.embedding_dim}, the backbone gives {EMBEDDING_DIM}")
        except HeadBlobError as exc:
            self.stats.commits_refused += 1
            self._reply_error(msg.TYPE, ErrorCode.BAD_MESSAGE, f"head {st.head_id:#x} refused, keeping head "
                              f"{self.head_id}: {exc}")
            return
        self.head, self.head_id = head, st.head_id
        self.stats.heads_committed += 1
        self.send(Ack(int(msg.TYPE), seq))

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
                next_t = max(next_t + self.interval, time.monotonic() - self.interval)
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
        i = self._next_window
        self._next_window = (i + 1) % len(self.windows_x)
        wid = self._window_id
        self._window_id = (wid + 1) & 0xFFFFFFFF
        label = int(self.windows_y[i]) if self.labelled else -1
        msg = SensorWindow(wid, window_to_int16(self.windows_x[i], self.scale), self.scale, label)
        self.sent[wid] = (i, label)
        self.send(msg)
        self.stats.windows_sent += 1
        head, head_id = self.head, self.head_id
        if head is not None and head_id is not None:
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
        if self._pty_fds is not None:
            try:
                os.close(self._pty_fds[1])
            except OSError:
                pass
        if self._link_dir is not None:
            self._link_dir.cleanup()
        self.stats.decoder = self.decoder.stats.as_dict()

    def __enter__(self) -> EmulatedMcu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m firmware_bridge.emulator", description="An emulated edge-fl MCU.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true", help="create a pty pair and print the path to open")
    where.add_argument("--socket", type=int, metavar="PORT", help="serve socket://127.0.0.1:PORT")
    p.add_argument("--subject", type=int, default=7)
    p.add_argument("--speedup", type=float, default=1.0, help="stream windows this many times faster than real time")
    p.add_argument("--baud", type=int, default=None, help="pace the emulator's bytes at BAUD/10 B/s")
    p.add_argument("--unlabelled", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    kw: dict[str, Any] = dict(subject=args.subject, speedup=args.speedup, baudrate=args.baud,
                              labelled=not args.unlabelled)
    emu = EmulatedMcu.on_pty(**kw) if args.pty else EmulatedMcu.on_socket(args.socket, **kw)
    print(emu.port_url, flush=True)
    print(f"inference: {emu.inference_runtime}", file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
