"""The emulated MCU's end of the wire: byte pipes it reads and writes, and its UART pacing.

`Port.read` returns b"" on timeout and raises OSError when the port is gone; `write` raises TimeoutError
(or OSError) when nobody drains it. `PtyPort` is the pty plumbing behind `EmulatedMcu.on_pty`:
a fresh pty pair whose slave a stable symlink points at, so `unplug()`/`replug()` can swap the pty
under an agent that keeps opening the same path.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import tty
from collections.abc import Callable


class Port:
    """Byte pipe the emulator reads and writes; `read` returns b"" on timeout, raises OSError when gone."""

    def read(self, timeout: float) -> bytes:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FdPort(Port):
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
        fd, self.fd = self.fd, -1  # once: the number may belong to another file by the next call
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class PtyPort(FdPort):
    """The master of a new pty pair; `link` (a symlink, replaced atomically) points at its slave.

    The slave stays open on this side, so reads on the master never EIO while no agent has it open;
    `close()` closes both ends: the agent's port errors, as when a cable comes out.
    """

    def __init__(self, link: str) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line discipline, before anyone opens it
        self.slave = slave
        tmp = link + ".tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, link)
        super().__init__(master)

    def close(self) -> None:
        super().close()
        slave, self.slave = self.slave, -1
        if slave >= 0:
            try:
                os.close(slave)
            except OSError:
                pass


class SocketServerPort(Port):
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


class SerialPort(Port):
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


class BaudPacer:
    """Holds each direction's byte rate at baudrate/10 (8N1, full duplex); no baud rate = no pacing."""

    def __init__(self, baudrate: int | None) -> None:
        self.baudrate = baudrate
        now = time.monotonic()
        self._budget_t = {"tx": now, "rx": now}

    def pace(self, n: int, direction: str = "tx") -> None:
        if not self.baudrate:
            return
        now = time.monotonic()
        t = max(self._budget_t[direction], now) + n * 10.0 / self.baudrate
        self._budget_t[direction] = t
        delay = t - now
        if delay > 0:
            time.sleep(delay)
