"""The private PostgreSQL server: it starts, serves, crashes and stops the way the store's tests need.

Uses the session's server (tests/pg_fixtures.py) where it can; the lifecycle tests start servers of
their own (about half a second each).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from edge_agent import pgserver
from edge_agent.pgserver import LocalPostgres, PostgresError, find_postgres_bindir
from tests.pg_fixtures import require_postgres

ROOT = Path(__file__).resolve().parents[2]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    # A zombie has exited; some containers' PID 1 never reaps the orphans.
    state = pgserver._process_state(pid)
    return state is not None and state != "Z"


# -- finding the binaries -----------------------------------------------------------------------


def test_missing_bindir_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(PostgresError, match=r"scripts/setup --dev or `apt install postgresql`"):
        find_postgres_bindir(tmp_path)
    server = LocalPostgres(bindir=tmp_path)
    with pytest.raises(PostgresError, match="not found"):
        server.start()
    assert not server.running


def test_newest_debian_version_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for version in ("9.6", "10", "15", "16"):
        bindir = tmp_path / version / "bin"
        bindir.mkdir(parents=True)
        names = ("initdb",) if version == "16" else ("initdb", "postgres")  # 16: client only
        for name in names:
            (bindir / name).touch(mode=0o755)
    monkeypatch.setattr(pgserver, "_DEBIAN_ROOT", tmp_path)
    assert find_postgres_bindir() == tmp_path / "15" / "bin"


# -- the session's server -----------------------------------------------------------------------


def test_shared_server_serves_role_and_database_edgefl(postgres: LocalPostgres) -> None:
    import psycopg

    assert postgres.dsn == f"postgresql://edgefl@127.0.0.1:{postgres.port}/edgefl"
    with psycopg.connect(postgres.dsn) as conn:
        row = conn.execute("SELECT current_user, current_database(), "
                           "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)").fetchone()
        assert row == ("edgefl", "edgefl", True)
        # durable=False (the fixture's) switches the flushes off.
        for name in ("fsync", "synchronous_commit", "full_page_writes"):
            assert conn.execute(f"SHOW {name}").fetchone() == ("off",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW unix_socket_directories").fetchone() == (str(postgres.socket_dir),)


def test_unix_socket_is_in_the_work_dir(postgres: LocalPostgres) -> None:
    import psycopg

    assert (postgres.socket_dir / f".s.PGSQL.{postgres.port}").is_socket()
    with psycopg.connect(host=str(postgres.socket_dir), port=postgres.port, user="edgefl",
                         dbname="edgefl") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_new_database_returns_its_dsn(postgres: LocalPostgres) -> None:
    import psycopg

    name = f"t_{uuid.uuid4().hex}"
    dsn = postgres.new_database(name)
    assert dsn == f"postgresql://edgefl@127.0.0.1:{postgres.port}/{name}"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (name,)
        conn.execute("CREATE TABLE rounds (id int PRIMARY KEY, digest text)")
        conn.execute("INSERT INTO rounds VALUES (1, 'abc')")
        conn.commit()
        assert conn.execute("SELECT * FROM rounds").fetchall() == [(1, "abc")]
    with pytest.raises(psycopg.errors.DuplicateDatabase):
        postgres.new_database(name)


@pytest.mark.parametrize("name", ["1abc", "a-b", "a;DROP DATABASE edgefl", "x" * 64, ""])
def test_new_database_refuses_names_that_need_quoting(postgres: LocalPostgres, name: str) -> None:
    with pytest.raises(ValueError, match="database name"):
        postgres.new_database(name)


@pytest.mark.parametrize("turn", [1, 2])
def test_each_test_gets_an_empty_database(pg_dsn: str, turn: int) -> None:
    import psycopg

    with psycopg.connect(pg_dsn) as conn:
        # Would raise DuplicateTable on the second turn if the two tests shared a database.
        conn.execute("CREATE TABLE mine (turn int)")
        conn.execute("INSERT INTO mine VALUES (%s)", (turn,))
        assert conn.execute("SELECT turn FROM mine").fetchall() == [(turn,)]


# -- servers of their own: crash, restart, stop, failures ----------------------------------------


def test_kill_then_start_recovers_and_stop_closes_the_port() -> None:
    import psycopg

    require_postgres()
    server = LocalPostgres(settings={"max_connections": "20"})
    try:
        server.start()
        port, workdir = server.port, server.workdir
        conn = psycopg.connect(server.dsn, autocommit=True)  # a backend the crash must take along
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
        assert conn.execute("SHOW max_connections").fetchone() == ("20",)
        assert conn.execute("SHOW fsync").fetchone() == ("on",)  # durable by default
        postmaster = server.pid
        assert postmaster is not None
        backends = pgserver._children(postmaster)
        assert backends

        server.kill()
        conn.close()
        assert server.returncode == -signal.SIGKILL
        assert not server.running
        assert not alive(postmaster)
        assert not any(alive(pid) for pid in backends)
        assert not accepts(port)
        assert workdir.is_dir()

        server.start()  # crash recovery, same port, same data
        assert server.port == port
        with psycopg.connect(server.dsn) as again:
            assert again.execute("SELECT x FROM kept").fetchall() == [(42,)]
        assert "not properly shut down" in server.log()
    finally:
        server.stop()
    assert server.returncode == 0
    assert not accepts(port)
    assert not workdir.exists()
    assert "database system is shut down" in server.log()  # kept after the work dir is gone
    server.stop()  # idempotent


def test_start_failure_shows_the_log() -> None:
    require_postgres()
    server = LocalPostgres(durable=False, settings={"no_such_setting": "1"})
    try:
        with pytest.raises(PostgresError, match=r"(?s)exited with status.*no_such_setting"):
            server.start()
        assert not server.running
    finally:
        server.stop()


def test_a_fixed_port_in_use_is_reported() -> None:
    require_postgres()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = LocalPostgres(port=busy.getsockname()[1], durable=False)
        try:
            with pytest.raises(PostgresError, match="Address already in use"):
                server.start()
        finally:
            server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the work dir to the postgres user")
def test_as_root_an_unreachable_workdir_is_refused() -> None:
    require_postgres()
    private = Path(tempfile.mkdtemp(prefix="edgefl-test-"))  # 0700, root's
    try:
        with pytest.raises(PostgresError, match="cannot reach"):
            LocalPostgres(private / "pg").start()
    finally:
        shutil.rmtree(private)


def test_main_prints_the_dsn_and_stops_on_sigterm() -> None:
    require_postgres()
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent.pgserver", "--not-durable"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("postgres ready: postgresql://edgefl@127.0.0.1:"), line
        workdir = Path(line.rsplit("(work dir ", 1)[1].rstrip(")\n"))
        assert workdir.is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not workdir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
