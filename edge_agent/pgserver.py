"""A private PostgreSQL server on a free loopback port, for tests, benchmarks and ``edge-fl demo``.

Works the way :mod:`edge_agent.broker` runs Mosquitto: ``initdb`` a cluster into a work
directory, start the real ``postgres`` with ``Popen``, wait until it says it is ready, always stop
it, and keep its log to show when something failed. The aggregator's PostgreSQL store (several
aggregator worker processes sharing one database) is tested against it.

Never touches the machine's PostgreSQL: every ``LocalPostgres`` has its own cluster, port, unix
socket directory and log. Authentication is ``trust`` for one superuser role, ``edgefl``, on
127.0.0.1 only: any local user can connect as that superuser while it runs. Fine for tests on a
machine of one's own, never for anything that holds real data.

PostgreSQL refuses to run as root. As root (CI), ``initdb`` and ``postgres`` run as the
``postgres`` system user that Debian's ``postgresql`` package creates; anyone else runs them as
themselves.

Run one by hand (prints the DSN, Ctrl-C stops it)::

    .venv/bin/python -m edge_agent.pgserver [--port N]
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresError", "LocalPostgres", "find_postgres_bindir"]

# Debian and Ubuntu install each major version side by side here, off PATH.
_DEBIAN_ROOT = Path("/usr/lib/postgresql")

_NOT_FOUND = ("PostgreSQL server binaries (initdb, postgres) not found: run scripts/setup --dev "
              "or `apt install postgresql`")

_SYSTEM_USER = "postgres"  # who runs the server when we are root
_ROLE = "edgefl"  # the cluster's only role, its superuser
_DATABASE = "edgefl"

# A database name becomes both an SQL identifier and the path of a DSN: keep it to characters that
# need no escaping in either (63 bytes is PostgreSQL's limit on identifiers).
_DATABASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_ADDRESS_IN_USE = "Address already in use"
_PORT_ATTEMPTS = 3  # fresh ports tried when another process wins the race for the chosen one

# Sun socket paths are limited to 107 bytes; postgres puts ".s.PGSQL.<port>" in the socket dir.
_SOCKET_PATH_MAX = 107 - len("/.s.PGSQL.65535")

# Crash-safety settings switched off by durable=False: a test server loses nothing it needs if the
# machine crashes, and skipping the flushes makes commits several times faster.
_NOT_DURABLE = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class PostgresError(RuntimeError):
    """The server could not be found, initialised or started (the message includes its log)."""


def find_postgres_bindir(explicit: str | Path | None = None) -> Path:
    """Return the directory that holds PostgreSQL's ``initdb`` and ``postgres``.

    Looks in Debian's ``/usr/lib/postgresql/<version>/bin`` (newest version first), then in
    ``pg_config --bindir``, then next to an ``initdb`` on ``PATH``.

    Parameters
    ----------
    explicit
        A directory to use instead of searching.

    Raises
    ------
    PostgresError
        When no directory has both programs (the message says what to install).
    """
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        candidates = [*_debian_bindirs(), *_pg_config_bindir(), *_path_bindir()]
    for bindir in candidates:
        if _has_server(bindir):
            return bindir
    tried = f" (tried {', '.join(str(c) for c in candidates)})" if candidates else ""
    raise PostgresError(_NOT_FOUND + tried)


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres"))


def _debian_bindirs() -> list[Path]:
    def major(path: Path) -> tuple[int, ...]:
        # "15" or "9.6": compare numerically so that 10 sorts above 9.6.
        return tuple(int(part) for part in path.parent.name.split(".") if part.isdigit())

    return sorted(_DEBIAN_ROOT.glob("*/bin"), key=major, reverse=True)


def _pg_config_bindir() -> list[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return []
    try:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [Path(done.stdout.strip())] if done.returncode == 0 and done.stdout.strip() else []


def _path_bindir() -> list[Path]:
    initdb = shutil.which("initdb")
    # resolve(): /usr/local/bin/initdb may be a symlink into the real bindir, where postgres is.
    return [Path(initdb).resolve().parent] if initdb else []


def _require_psycopg() -> None:
    # Checked before anything starts: start() creates the `edgefl` database through it.
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise PostgresError("psycopg is not installed: pip install 'edge-fl[postgres]'") from None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _server_account() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: the ``postgres`` user when we are root, else None (us)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        raise PostgresError(f"PostgreSQL refuses to run as root and there is no {_SYSTEM_USER!r} "
                            "user to run it as: `apt install postgresql` creates it") from None


def _command_prefix(account: pwd.struct_passwd | None) -> list[str]:
    """``setpriv`` that runs the program as ``account`` and signals it when we die.

    atexit covers normal exits and exceptions, not a SIGKILL or an unhandled SIGTERM of the
    Python process (a CI timeout): the parent-death signal does. SIGINT asks postgres for a
    *fast* shutdown (SIGTERM would wait for clients to disconnect). setpriv sets it after
    switching user (a user switch clears it) and execs the program in the same process, so the
    pid we hold is the postmaster's. Linux sends it when the *thread* that started the server
    ends: start servers from a long-lived thread (the main one).
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if account is not None:
            raise PostgresError("running as root needs util-linux's setpriv to start PostgreSQL "
                                f"as the {_SYSTEM_USER!r} user")
        return []
    prefix = [setpriv]
    if account is not None:
        prefix += ["--reuid", str(account.pw_uid), "--regid", str(account.pw_gid), "--init-groups"]
    return [*prefix, "--pdeathsig", "INT", "--"]


def _child_environment() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST... from the caller's shell must not redirect our server or tools.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _check_reachable(path: Path, account: pwd.struct_passwd) -> None:
    """Fail clearly when ``account`` cannot traverse every parent of ``path``.

    As root the work directory belongs to the ``postgres`` user, who must also get through its
    parents: pytest's ``/tmp/pytest-of-root`` (0700) or ``/root`` would make initdb fail with a
    bare "permission denied".
    """
    groups = {account.pw_gid, *os.getgrouplist(account.pw_name, account.pw_gid)}
    for parent in path.resolve().parents:
        st = parent.stat()
        if st.st_uid == account.pw_uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in groups:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            raise PostgresError(f"the {account.pw_name!r} user cannot reach {path}: {parent} is not "
                                "searchable for it; use a work directory under /tmp")


def _process_state(pid: int) -> str | None:
    """The state letter of a process ("R", "S", "Z"...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may contain spaces: the state follows its ")".
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    # A zombie has released its memory and shared memory attachments: it counts as gone (no
    # one reaps orphans in some containers, whose PID 1 is not an init).
    while any(_process_state(pid) not in (None, "Z") for pid in pids):
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)


class LocalPostgres:
    """A PostgreSQL server of our own on a loopback port, with role and database ``edgefl``.

    Parameters
    ----------
    workdir
        Directory for the cluster (``data/``), the unix socket (``socket/``) and the logs. By
        default a temporary directory, removed by :meth:`stop`. As root it is handed to the
        ``postgres`` user, who must be able to reach it (so not under ``/root`` or pytest's
        ``tmp_path``).
    port
        A fixed port; default a free one, chosen at the first start and kept by :meth:`restart`
        (and by :meth:`start` after :meth:`kill`).
    durable
        ``False`` starts the server with ``fsync``, ``synchronous_commit`` and
        ``full_page_writes`` off: several times faster commits, but a machine crash can corrupt
        the cluster. For tests only. A :meth:`kill` (a process crash, not a machine crash) loses
        no commit when durable, and those of the last fraction of a second when not.
    settings
        More server settings, passed as ``-c name=value`` (for example
        ``{"max_connections": "200"}``); they win over ``durable``'s.
    bindir
        Directory of ``initdb`` and ``postgres``; default :func:`find_postgres_bindir`.

    Attributes
    ----------
    host, port
        Where clients connect (``127.0.0.1`` and the chosen port).
    user
        The superuser role, ``edgefl`` (trust authentication: no password).
    returncode
        Exit status of the last server process (0 after a clean :meth:`stop`).

    Examples
    --------
    >>> with LocalPostgres(durable=False) as pg:                  # doctest: +SKIP
    ...     with psycopg.connect(pg.new_database("t_1")) as conn:
    ...         conn.execute("CREATE TABLE t (x int)")
    """

    host: str
    port: int
    user: str

    def __init__(self, workdir: Path | None = None, *, port: int | None = None, durable: bool = True,
                 settings: Mapping[str, str] | None = None, bindir: str | Path | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else 0
        self.user = _ROLE
        self.durable = durable
        self.settings = dict(settings) if settings is not None else {}
        self.returncode: int | None = None  # exit status of the last server process
        self._fixed_port = port is not None
        self._bindir = bindir
        self._workdir: Path | None = Path(workdir) if workdir is not None else None
        self._owns_workdir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._last_log = ""
        self._mark = 0  # size of postgres.log when the current start began
        self._atexit_registered = False

    # -- paths and addresses -----------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        """The work directory (created on first use)."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="edgefl-pg-"))
            self._owns_workdir = True
        self._workdir.mkdir(parents=True, exist_ok=True)
        return self._workdir

    @property
    def datadir(self) -> Path:
        """The cluster's data directory (``PGDATA``)."""
        return self.workdir / "data"

    @property
    def socket_dir(self) -> Path:
        """Where the server's unix socket lives (never the system's /var/run/postgresql)."""
        return self.workdir / "socket"

    @property
    def dsn(self) -> str:
        """``postgresql://edgefl@127.0.0.1:PORT/edgefl``: the default database."""
        return self.dsn_for(_DATABASE)

    def dsn_for(self, database: str) -> str:
        """The DSN of another database of this server (see :meth:`new_database`)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """Process id of the running postmaster, or None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the postmaster process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _log_files(self) -> list[Path]:
        if self._workdir is None:
            return []
        return [self._workdir / "initdb.log", self._workdir / "postgres.log"]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> LocalPostgres:
        """Create the cluster (first time only), start postgres and wait until it is ready.

        Parameters
        ----------
        timeout
            Seconds to wait for the server to accept connections (crash recovery after
            :meth:`kill` included).

        Returns
        -------
        LocalPostgres
            ``self``, so ``pg = LocalPostgres().start()`` works.

        Raises
        ------
        PostgresError
            Binaries missing, ``initdb`` failed, or the server exited or was not ready in time
            (the message ends with its log).
        """
        if self.running:
            return self
        _require_psycopg()
        bindir = find_postgres_bindir(self._bindir)
        account = _server_account()
        prefix = _command_prefix(account)
        first_start = not (self.datadir / "PG_VERSION").exists()
        if first_start:
            self._prepare_workdir(account)
            self._initdb(bindir, prefix)
        for attempt in range(_PORT_ATTEMPTS):
            if self.port == 0:
                self.port = _free_port(self.host)
            try:
                self._launch(bindir, prefix, timeout)
                break
            except PostgresError as err:
                # Another process may have taken the free port between our probe and postgres's
                # bind: pick another one, unless the caller fixed the port.
                lost_race = _ADDRESS_IN_USE in str(err)
                if not lost_race or self._fixed_port or attempt == _PORT_ATTEMPTS - 1:
                    raise
                self.port = 0
        if first_start:
            self._create_database(_DATABASE)
        return self

    def _prepare_workdir(self, account: pwd.struct_passwd | None) -> None:
        workdir = self.workdir
        self.socket_dir.mkdir(exist_ok=True)
        if len(str(self.socket_dir)) > _SOCKET_PATH_MAX:
            raise PostgresError(f"work directory path too long for a unix socket: {workdir}")
        if account is None:
            return
        _check_reachable(workdir, account)
        # The server writes the cluster, its socket and its lock files here as `postgres`; we
        # (root) keep full access anyway.
        for path in (workdir, self.socket_dir):
            os.chown(path, account.pw_uid, account.pw_gid)
        workdir.chmod(0o700)

    def _initdb(self, bindir: Path, prefix: list[str]) -> None:
        # --no-sync: a lost cluster is recreated by the next run, so skip the flush (~1 s).
        # --locale=C: English messages (start() looks for "Address already in use") and the same
        # collation everywhere.
        command = [*prefix, str(bindir / "initdb"), "-D", str(self.datadir), "-U", self.user,
                   "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        with open(self.workdir / "initdb.log", "ab") as log:
            try:
                done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=self.workdir,
                                      env=_child_environment(), timeout=120)
            except subprocess.TimeoutExpired:
                raise PostgresError(f"initdb did not finish within 120 s\n"
                                    f"{self._tail(self.workdir / 'initdb.log')}") from None
        if done.returncode != 0:
            raise PostgresError(f"initdb exited with status {done.returncode}\n"
                                f"{self._tail(self.workdir / 'initdb.log')}")

    def _server_settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            # Log to stderr, which is our postgres.log; a collector would write elsewhere.
            "logging_collector": "off",
        }
        if not self.durable:
            settings.update(_NOT_DURABLE)
        settings.update(self.settings)
        return settings

    def _launch(self, bindir: Path, prefix: list[str], timeout: float) -> None:
        options = [arg for name, value in self._server_settings().items()
                   for arg in ("-c", f"{name}={value}")]
        log_path = self.workdir / "postgres.log"
        # Logs accumulate over restarts (a failing test shows the whole story); errors at this
        # start are reported from what was written since.
        self._mark = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [*prefix, str(bindir / "postgres"), "-D", str(self.datadir), *options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                env=_child_environment())
        finally:
            log.close()  # the child has its own descriptor
        if not self._atexit_registered:
            # A test run that dies (Ctrl-C, failed assertion outside a fixture) must not leave a
            # server behind.
            atexit.register(self._at_exit)
            self._atexit_registered = True
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self.returncode = code
                self._proc = None
                raise PostgresError(f"postgres exited with status {code} while starting on "
                                    f"{self.host}:{self.port}\n{self._tail()}")
            # Ready when OUR postmaster says so in its pid file (what `pg_ctl -w` waits for): it
            # writes "ready" once it accepts connections, after any crash recovery. A connection
            # alone might reach whoever else holds the port.
            if self._pid_file_status() == "ready":
                return
            if time.monotonic() > deadline:
                self._terminate()
                raise PostgresError(f"postgres was not ready on {self.host}:{self.port} within "
                                    f"{timeout:g} s\n{self._tail()}")
            time.sleep(0.02)

    def _pid_file_status(self) -> str | None:
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        # Line 1 is the postmaster's pid (a stale file after kill() names the dead one), line 8
        # its status.
        if len(lines) < 8 or self._proc is None or lines[0].strip() != str(self._proc.pid):
            return None
        return lines[7].strip()

    def _connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        import psycopg  # only the PostgreSQL store and its tests need it (the `postgres` extra)

        return psycopg.connect(self.dsn_for(database), autocommit=True, connect_timeout=10)

    def _create_database(self, name: str) -> None:
        from psycopg import sql

        with self._connect() as conn:
            # CREATE DATABASE cannot run inside a transaction: the connection is in autocommit.
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def new_database(self, name: str) -> str:
        """Create an empty database on the running server and return its DSN.

        One per test keeps tests apart without a server each (a database takes a few
        milliseconds, a server about a second).

        Parameters
        ----------
        name
            Letters, digits and underscores, not starting with a digit, at most 63 characters.

        Raises
        ------
        ValueError
            For a name outside that set.
        PostgresError
            When the server is not running.
        """
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r}: use letters, digits and '_' (at most 63, "
                             "not starting with a digit)")
        if not self.running:
            raise PostgresError("the server is not running: start() it first")
        self._create_database(name)
        return self.dsn_for(name)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (fast shutdown, then harder) and remove a temporary work directory.

        Idempotent. A fast shutdown disconnects clients, rolls back their open transactions and
        writes a checkpoint. Use :meth:`restart` to keep the cluster (``stop`` deletes a
        directory it created).
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

    def _terminate(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        # SIGINT: fast shutdown. SIGQUIT: immediate shutdown (crash recovery at the next start)
        # if the checkpoint takes too long. Then the hard way.
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0)):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            self.kill()
            return
        self._proc = None
        self.returncode = proc.returncode

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as a crash would.

        The work directory and port are kept: :meth:`start` brings the server back there, with
        crash recovery. The backends are killed too: left alone they would linger until they
        noticed, and hold the shared memory that the next start needs.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # Stopped, the postmaster can fork no new backend while we list and kill its own.
            proc.send_signal(signal.SIGSTOP)
            backends = _children(proc.pid)
            proc.kill()
            for pid in backends:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _wait_gone(backends, timeout=5.0)
        proc.wait()
        self.returncode = proc.returncode

    def restart(self, timeout: float = 30.0) -> None:
        """Stop the server cleanly and start it again on the same port with the same data."""
        self._terminate()
        self.start(timeout)

    def log(self) -> str:
        """What initdb and the server wrote so far."""
        parts = []
        for path in self._log_files():
            try:
                parts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(parts) if parts else self._last_log

    def _since_start(self) -> str:
        """What the server wrote since the current start."""
        if self._workdir is None:
            return ""
        try:
            with open(self._workdir / "postgres.log", "rb") as f:
                f.seek(self._mark)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, path: Path | None = None, lines: int = 30) -> str:
        text = path.read_text(errors="replace") if path is not None and path.exists() else self._since_start()
        return "\n".join(text.splitlines()[-lines:]) or "(postgres wrote no log)"

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"LocalPostgres({self.host}:{self.port}, {state})"


def main(argv: list[str] | None = None) -> int:
    """Run a private PostgreSQL server in the foreground until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edge_agent.pgserver", description=main.__doc__)
    parser.add_argument("--port", type=int, default=None, help="fixed port (default: a free one)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the cluster here (default: a temporary directory, removed at exit)")
    parser.add_argument("--not-durable", action="store_true",
                        help="fsync, synchronous_commit and full_page_writes off (faster; tests only)")
    args = parser.parse_args(argv)
    # `kill` (SIGTERM) stops us like Ctrl-C does, so the server is stopped and cleaned up too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = LocalPostgres(args.workdir, port=args.port, durable=not args.not_durable)
    # Ctrl-C may come at any point, even while starting or printing: always a clean stop.
    try:
        server.start()
        print(f"postgres ready: {server.dsn} (work dir {server.workdir})", flush=True)
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
