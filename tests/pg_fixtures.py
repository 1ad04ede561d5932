"""PostgreSQL fixtures: one private server per test session, a fresh database per test.

Loaded by tests/conftest.py (``pytest_plugins``). The server is ``edge_agent.pgserver.LocalPostgres``
on a free loopback port (never the machine's PostgreSQL), started with ``durable=False``: the
tests never survive a machine crash, so they skip the flushes.

Without PostgreSQL's server binaries or psycopg the tests that use these fixtures are skipped,
except under CI, where scripts/setup --dev installs both and a missing one is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from edge_agent.pgserver import LocalPostgres, PostgresError, find_postgres_bindir


def require_postgres() -> None:
    """Skip the test when PostgreSQL or psycopg is missing (fail under CI)."""
    try:
        find_postgres_bindir()
        import psycopg  # noqa: F401
    except (PostgresError, ImportError) as err:
        if os.environ.get("CI"):
            raise  # CI runs scripts/setup --dev, which installs both
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    """A started LocalPostgres (``durable=False``) shared by the whole session."""
    require_postgres()
    server = LocalPostgres(durable=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(postgres: LocalPostgres, request: pytest.FixtureRequest) -> Iterator[str]:
    """The DSN of a new, empty database of the session's server, for this test alone.

    If the test fails (and a conftest records reports as ``rep_call``, as tests/integration's
    does), the end of the server's log is printed with the failure.
    """
    yield postgres.new_database(f"t_{uuid.uuid4().hex}")
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        tail = "\n".join(postgres.log().splitlines()[-100:])
        print(f"\n----- postgres log ({postgres.host}:{postgres.port}) -----\n{tail}")
