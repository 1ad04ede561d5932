"""The one way edge-fl opens SQLite: WAL, fsync on commit, explicit transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MEMORY = ":memory:"  # a store that lives as long as its process: `edge-fl simulate`'s fleet


def connect(path: str | Path, schema: str) -> sqlite3.Connection:
    """Open (creating if needed) a database that survives process death and power loss.

    WAL lets readers (tests, a status tool) look while the service writes; synchronous=FULL makes
    every COMMIT durable across a power cut, which is what an "accepted" or "queued" promise needs.
    `MEMORY` opens a private in-memory database with the same schema and transactions.
    """
    if str(path) == MEMORY:
        db = sqlite3.connect(MEMORY, isolation_level=None)
        db.executescript(schema)
        return db
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(p, isolation_level=None, timeout=10.0)  # autocommit; `transaction` groups writes
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """All statements inside commit together or not at all."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
