"""A private Mosquitto broker on a free loopback port, for tests and ``edge-fl demo``.

Works the way Mosquitto tests itself (``test/mosq_test.py``): render a config into a work
directory, start the real broker with ``Popen``, poll until it accepts TCP connections, always
terminate it, and keep its log to show when something failed. The free port comes from binding
port 0, as in paho's own test support.

Never touches a system broker: every ``LocalBroker`` has its own port, password file,
persistence directory and log.

Run one by hand (prints the port and the generated passwords, Ctrl-C stops it)::

    .venv/bin/python -m edge_agent.broker [--port N]
"""

from __future__ import annotations

import atexit
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from .resources import broker_config

__all__ = ["BrokerError", "LocalBroker", "DEV_CONFIG", "find_mosquitto"]

#: The development configuration the package ships (broker_config/ in the repository).
DEV_CONFIG = broker_config("mosquitto-dev.conf")

# Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
_FALLBACK_BINARIES: tuple[str, ...] = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")

_NOT_FOUND = ("mosquitto not found: run scripts/setup (installs the Debian package) "
              "or point --broker at a running broker")

# Directives that name a port or a path: LocalBroker replaces them (only the first listener is
# kept, on our port and loopback address); everything else is kept as written.
_REWRITTEN = {"listener", "password_file", "persistence_location", "log_dest", "user", "port",
              "bind_address", "pid_file"}

_ADDRESS_IN_USE = "Address already in use"
_RUNNING = " running"  # "mosquitto version 2.0.11 running", logged once the listeners are open
_PORT_ATTEMPTS = 3  # fresh ports tried when another process wins the race for the chosen one


class BrokerError(RuntimeError):
    """The broker could not be found, configured or started (the message includes its log)."""


def find_mosquitto(explicit: str | None = None) -> str:
    """Return the path of the mosquitto binary.

    Parameters
    ----------
    explicit
        A path or command name to use instead of searching ``PATH`` and ``/usr/sbin``.

    Raises
    ------
    BrokerError
        When no executable is found.
    """
    candidates = [explicit] if explicit else ["mosquitto", *_FALLBACK_BINARIES]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    raise BrokerError(_NOT_FOUND if not explicit else f"{_NOT_FOUND} (tried {explicit})")


def _find_passwd_tool(mosquitto: str) -> str:
    # Debian puts mosquitto_passwd in /usr/bin and the broker in /usr/sbin; a source build puts
    # both in one directory.
    sibling = Path(mosquitto).with_name("mosquitto_passwd")
    for candidate in ("mosquitto_passwd", str(sibling), "/usr/bin/mosquitto_passwd"):
        found = shutil.which(candidate)
        if found:
            return found
    raise BrokerError("mosquitto_passwd not found (it ships with the mosquitto package): "
                      "run scripts/setup")


def _die_with_parent() -> list[str]:
    """Command prefix that makes the broker get SIGTERM if we die without cleaning up.

    atexit covers normal exits and exceptions, not a SIGKILL or an unhandled SIGTERM of the
    Python process (a CI timeout). util-linux's setpriv sets the parent-death signal and execs
    mosquitto in the same process (same pid). Linux sends it when the *thread* that started the
    broker ends, so start brokers from a long-lived thread (the main one).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class LocalBroker:
    """A Mosquitto process of our own on a loopback port, with generated users.

    Parameters
    ----------
    workdir
        Directory for the rendered config, password file, persistence database and log. By
        default a temporary directory, removed by :meth:`stop`.
    users
        ``{username: password}``; default ``{"aggregator": <random>, "device": <random>}``.
    config
        Config to render; the listener, password file, persistence location and log
        destination are replaced, every other line (limits, ACL, TLS) is kept.
    port
        A fixed port; default a free one, chosen at the first start and kept by
        :meth:`restart` (and by :meth:`start` after :meth:`kill`).
    mosquitto
        Path of the broker binary; default ``mosquitto`` on ``PATH``, then ``/usr/sbin``.

    Attributes
    ----------
    host, port
        Where clients connect (``127.0.0.1`` and the chosen port).
    users
        ``{username: password}`` written to the password file.
    returncode
        Exit status of the last broker process (0 after a clean :meth:`stop`).

    Examples
    --------
    >>> with LocalBroker() as broker:                      # doctest: +SKIP
    ...     link = MqttLink("dev-1", broker.host, broker.port,
    ...                     username="device", password=broker.users["device"])
    """

    host: str
    port: int
    users: dict[str, str]

    def __init__(self, workdir: Path | None = None, *, users: Mapping[str, str] | None = None,
                 config: Path = DEV_CONFIG, port: int | None = None,
                 mosquitto: str | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else 0
        self.users = dict(users) if users is not None else {
            "aggregator": secrets.token_urlsafe(16), "device": secrets.token_urlsafe(16)}
        self.config = Path(config)
        self.returncode: int | None = None  # exit status of the last broker process
        self._fixed_port = port is not None
        self._mosquitto = mosquitto
        self._workdir: Path | None = Path(workdir) if workdir is not None else None
        self._owns_workdir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._last_log = ""
        self._marks: dict[Path, int] = {}
        self._atexit_registered = False

    # -- paths -----------------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        """The work directory (created on first use)."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="edgefl-broker-"))
            self._owns_workdir = True
        self._workdir.mkdir(parents=True, exist_ok=True)
        return self._workdir

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, or None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _log_files(self) -> list[Path]:
        if self._workdir is None:
            return []
        return [self._workdir / "mosquitto.stderr", self._workdir / "mosquitto.log"]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> LocalBroker:
        """Render the config, start mosquitto and wait until it accepts connections.

        Parameters
        ----------
        timeout
            Seconds to wait for the listener.

        Returns
        -------
        LocalBroker
            ``self``, so ``broker = LocalBroker().start()`` works.

        Raises
        ------
        BrokerError
            Binary or config missing, or the broker exited or did not listen in time (the
            message ends with the broker's log).
        """
        if self.running:
            return self
        binary = find_mosquitto(self._mosquitto)
        if not self.config.is_file():
            raise BrokerError(f"broker config not found: {self.config}")
        self._write_password_file(binary)
        for attempt in range(_PORT_ATTEMPTS):
            if self.port == 0:
                self.port = _free_port(self.host)
            try:
                self._launch(binary, timeout)
                return self
            except BrokerError as err:
                # Another process may have taken the free port between our probe and
                # mosquitto's bind: pick another one, unless the caller fixed the port.
                lost_race = _ADDRESS_IN_USE in str(err)
                if not lost_race or self._fixed_port or attempt == _PORT_ATTEMPTS - 1:
                    raise
                self.port = 0
        raise AssertionError("unreachable")

    def _launch(self, binary: str, timeout: float) -> None:
        conf = self._render_config()
        # Logs accumulate over restarts (a failing test shows the whole story); errors at this
        # start are reported from what was written since.
        self._marks = {p: p.stat().st_size if p.exists() else 0 for p in self._log_files()}
        stderr = open(self.workdir / "mosquitto.stderr", "ab")
        try:
            self._proc = subprocess.Popen(
                [*_die_with_parent(), binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                stdout=stderr, stderr=subprocess.STDOUT, cwd=self.workdir)
        finally:
            stderr.close()  # the child has its own descriptor
        if not self._atexit_registered:
            # A test run that dies (Ctrl-C, failed assertion outside a fixture) must not leave
            # a broker behind.
            atexit.register(self._at_exit)
            self._atexit_registered = True
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self.returncode = code
                self._proc = None
                raise BrokerError(f"mosquitto exited with status {code} while starting on "
                                  f"{self.host}:{self.port}\n{self._tail()}")
            # Ready when OUR process says it runs (it logs that after opening its listeners)
            # and the port accepts: a connection alone might reach whoever else holds the port.
            if (_RUNNING in self._since_start()
                    and _accepts(self.host, self.port) and self._proc.poll() is None):
                return
            if time.monotonic() > deadline:
                self._terminate()
                raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within "
                                  f"{timeout:g} s\n{self._tail()}")
            time.sleep(0.02)

    def _write_password_file(self, binary: str) -> None:
        tool = _find_passwd_tool(binary)
        path = self.workdir / "passwd"
        path.unlink(missing_ok=True)
        path.touch(mode=0o600)  # 2.1 warns about (and may refuse) readable password files
        for user, password in self.users.items():
            # -b puts the password on a command line, visible to `ps` for a moment: acceptable
            # for throw-away development passwords only.
            done = subprocess.run([tool, "-b", str(path), user, password],
                                  capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise BrokerError(f"mosquitto_passwd failed for user {user!r}: "
                                  f"{(done.stderr or done.stdout).strip()}")

    def _render_config(self) -> Path:
        persistence = self.workdir / "data"
        persistence.mkdir(exist_ok=True)
        listener = f"listener {self.port} {self.host}"
        out: list[str] = []
        have_listener = False
        for line in self.config.read_text().splitlines():
            words = line.split(maxsplit=1)
            key = words[0] if words else ""
            if key == "listener" and not have_listener:
                # Our listener takes the place of the first one, so that options following it
                # (TLS files in the production config) still apply to it.
                out.append(listener)
                have_listener = True
            elif key not in _REWRITTEN:
                out.append(line)
        if not have_listener:
            out.insert(0, listener)
        out += [
            "",
            "# --- rendered by edge_agent.broker.LocalBroker ---",
            f"password_file {self.workdir / 'passwd'}",
            f"persistence_location {persistence}/",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type notice",  # start() waits for the notice that the broker is running
            # As root, mosquitto would switch to the `mosquitto` user, which cannot read our
            # private work directory; for anyone else this line has no effect.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
        ]
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(out) + "\n")
        return path

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL) and remove a temporary work directory.

        Idempotent. Mosquitto saves its persistence database on SIGTERM; use
        :meth:`restart` to keep it (``stop`` deletes a directory it created).
        """
        self._terminate(timeout)
        if self._atexit_registered:
            atexit.unregister(self._at_exit)
            self._atexit_registered = False
        if self._owns_workdir and self._workdir is not None:
            self._last_log = self.log()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._owns_workdir = False

    def _at_exit(self) -> None:
        self._atexit_registered = False  # we are being called from atexit: no unregistering
        self.stop()

    def _terminate(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.returncode = proc.returncode

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would (state since the last autosave is lost).

        The work directory and port are kept: :meth:`start` brings the broker back there.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self.returncode = proc.returncode

    def restart(self) -> None:
        """Stop the broker cleanly and start it again on the same port with the same state."""
        self._terminate()
        self.start()

    def log(self) -> str:
        """The broker's log so far (stderr first, then its log file)."""
        parts = []
        for path in self._log_files():
            try:
                parts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(parts) if parts else self._last_log

    def _since_start(self) -> str:
        """What the broker wrote since the current start."""
        parts = []
        for path in self._log_files():
            try:
                with open(path, "rb") as f:
                    f.seek(self._marks.get(path, 0))
                    parts.append(f.read().decode(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(parts)

    def _tail(self, lines: int = 30) -> str:
        text = self._since_start()
        return "\n".join(text.splitlines()[-lines:]) or "(broker wrote no log)"

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"LocalBroker({self.host}:{self.port}, {state})"


def main(argv: list[str] | None = None) -> int:
    """Run a development broker in the foreground until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edge_agent.broker", description=main.__doc__)
    parser.add_argument("--port", type=int, default=None, help="fixed port (default: a free one)")
    parser.add_argument("--config", type=Path, default=DEV_CONFIG)
    args = parser.parse_args(argv)
    # `kill` (SIGTERM) stops us like Ctrl-C does, so the broker is stopped and cleaned up too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with LocalBroker(port=args.port, config=args.config) as broker:
        print(f"mosquitto listening on {broker.host}:{broker.port} (work dir {broker.workdir})")
        for user, password in broker.users.items():
            print(f"  user {user!r} password {password!r}")
        try:
            while broker.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
