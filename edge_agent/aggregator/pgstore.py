"""The aggregator's state in PostgreSQL, shared by several aggregator worker processes (SQLite stays the
embedded store of a single aggregator: store.py).

Workers share the update stream (an MQTT v5 shared subscription) and this database. What keeps them exact:
- A device is counted once per round whoever receives its update: `accepted`'s primary key (round, device).
  A worker's group commit inserts its batch's rows and replaces ITS partial aggregate (table `partials`, one
  row per round and worker) in one transaction; a row another worker already holds aborts the whole batch
  (`AlreadyCounted`), and the worker judges it again knowing who was counted.
- A round stops taking updates at one instant: a batch's transaction reads the round's row FOR SHARE and
  commits only while the round is collecting; the coordinator's close takes the same row FOR UPDATE, so it
  waits for batches being committed and every later batch finds the round closed (`RoundNotCollecting`).
- One coordinator opens, closes and publishes rounds: the worker holding a session advisory lock on the fleet
  (released by PostgreSQL when its connection ends: a killed coordinator is replaced by the next worker that
  asks). The close merges every worker's partial aggregate (partials.merge_partials) inside the transaction
  that marks the round closed.
- A worker name is held by one process at a time (another advisory lock): two processes under one name would
  overwrite each other's partial aggregate.

Needs psycopg 3 (`pip install 'edge-fl[postgres]'`), imported only when a PostgreSQL URL is configured.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np

from .rounds import Phase, RoundState, UpdateLike
from .store import AggregatorStore, AlreadyCounted, RoundNotCollecting, StoreError, arrays_to_bytes, bytes_to_arrays

try:
    import psycopg
    from psycopg import errors as pg_errors
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise StoreError("a PostgreSQL state needs psycopg: pip install 'edge-fl[postgres]'") from exc

# The tables of store.py's schema version 2, in PostgreSQL types, plus what several workers need: who counted
# an update and whether its device was selected (accepted.worker, accepted.selected) and the workers' partial
# aggregates. DOUBLE PRECISION where SQLite's REAL is 8 bytes (PostgreSQL's REAL is 4).
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS globals (
    version INTEGER PRIMARY KEY, blob BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, model_version INTEGER NOT NULL, selected TEXT NOT NULL,
    opened_at DOUBLE PRECISION NOT NULL, deadline DOUBLE PRECISION NOT NULL, phase TEXT NOT NULL,
    closed_at DOUBLE PRECISION, reported INTEGER, failed INTEGER, succeeded INTEGER, result_version INTEGER,
    bytes_in BIGINT, bytes_out BIGINT, rejected INTEGER, duplicates INTEGER);
CREATE TABLE IF NOT EXISTS accepted (
    round INTEGER NOT NULL, device_id TEXT NOT NULL, update_id TEXT NOT NULL, num_examples INTEGER NOT NULL,
    received_at DOUBLE PRECISION NOT NULL, worker TEXT NOT NULL, selected BOOLEAN NOT NULL,
    PRIMARY KEY (round, device_id));
CREATE TABLE IF NOT EXISTS partials (
    round INTEGER NOT NULL, worker TEXT NOT NULL, blob BYTEA NOT NULL, PRIMARY KEY (round, worker));
CREATE TABLE IF NOT EXISTS telemetry (
    version INTEGER NOT NULL, device_id TEXT NOT NULL, personal_acc DOUBLE PRECISION, global_acc DOUBLE PRECISION,
    n_test INTEGER NOT NULL, received_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (version, device_id));
CREATE TABLE IF NOT EXISTS reliability (
    device_id TEXT PRIMARY KEY, score DOUBLE PRECISION NOT NULL, selected INTEGER NOT NULL,
    reported INTEGER NOT NULL, updated_at DOUBLE PRECISION NOT NULL);
"""
PG_SCHEMA_VERSION = 1  # of PG_SCHEMA, in meta 'pg_schema'; its own numbering (no older layout to migrate)


def lock_key(*parts: str) -> int:
    """A stable signed 64-bit advisory lock key (PostgreSQL's bigint) for these names."""
    digest = hashlib.blake2b("\0".join(("edge-fl", *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _Connection:
    """A psycopg connection with the sqlite3 calls store.py makes (`?` placeholders; none of our SQL holds a
    literal `?` or `%`)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    def close(self) -> None:
        self.conn.close()


def read_only_connection(url: str) -> _Connection:
    """A connection whose transactions cannot write: for `edge-fl status` on the workers' shared state."""
    where = url.split("@")[-1]
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10,
                               options="-c default_transaction_read_only=on")
    except psycopg.OperationalError as exc:
        raise StoreError(f"cannot connect to the PostgreSQL state at {where}: {' '.join(str(exc).split())}") from None
    return _Connection(conn)


class PostgresStore(AggregatorStore):
    shared = True

    def __init__(self, url: str, fleet: str, worker: str) -> None:
        self.where = url.split("@")[-1]  # host/db: never a password in a message
        self.fleet, self.worker = fleet, worker
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            why = " ".join(str(exc).split())
            raise StoreError(f"cannot connect to the PostgreSQL state at {self.where}: {why}; check `state` in the "
                             f"aggregator config and that the server is up") from None
        self.pg = conn
        self.db = _Connection(conn)
        self.migrated_from = PG_SCHEMA_VERSION
        with self.transaction():  # workers starting together create the tables once
            self.db.execute("SELECT pg_advisory_xact_lock(?)", (lock_key(fleet, "schema"),))
            conn.execute(PG_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='pg_schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('pg_schema', ?)", (str(PG_SCHEMA_VERSION),))
            elif int(row[0]) > PG_SCHEMA_VERSION:
                raise StoreError(f"{self.where} has edge-fl PostgreSQL schema {row[0]}, newer than this edge-fl "
                                 f"understands ({PG_SCHEMA_VERSION}): run the release that wrote it, or a newer one")
        held = self.db.execute("SELECT pg_try_advisory_lock(?)", (lock_key(fleet, "worker", worker),)).fetchone()
        if not held[0]:
            conn.close()
            raise StoreError(f"another aggregator worker named {worker!r} of fleet {fleet!r} is running against "
                             f"{self.where}: give every worker its own `worker` name (EDGEFL_WORKER)")
        self.leading = False

    def transaction(self) -> AbstractContextManager[Any]:
        return self.pg.transaction()  # nested: a savepoint inside the enclosing transaction

    # --- the coordinator -------------------------------------------------------------------------
    def try_lead(self) -> bool:
        """Is this worker the fleet's coordinator? Takes the lock when it is free; held until the connection
        ends (PostgreSQL releases it when the process dies)."""
        if not self.leading:
            row = self.db.execute("SELECT pg_try_advisory_lock(?)", (lock_key(self.fleet, "coordinator"),)).fetchone()
            self.leading = bool(row[0])
        return self.leading

    def round_head(self) -> tuple[int, str] | None:
        """(round, phase) of the newest round: what a worker compares with what it holds."""
        row = self.db.execute("SELECT round, phase FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def round_progress(self, round_no: int) -> tuple[int, int]:
        """(updates counted, of which from selected devices) in `round_no`, by every worker."""
        row = self.db.execute("SELECT COUNT(*), COUNT(*) FILTER (WHERE selected) FROM accepted WHERE round=?",
                              (round_no,)).fetchone()
        return int(row[0]), int(row[1])

    @contextmanager
    def closing(self, round_no: int) -> Iterator[tuple[dict[str, str], dict[str, np.ndarray] | None]]:
        """The close of `round_no`, as one transaction: yields (every update counted: device -> update id, the
        workers' merged partial aggregate) once no worker can add to the round any more; what the block then
        writes (close_round, reliability) commits with it. RoundNotCollecting if it is closed already."""
        from .partials import merge_partials

        with self.pg.transaction():
            row = self.db.execute("SELECT phase FROM rounds WHERE round=? FOR UPDATE", (round_no,)).fetchone()
            if row is None or row[0] != Phase.COLLECTING.value:
                raise RoundNotCollecting(f"round {round_no} is not collecting (another coordinator closed it)")
            accepted = {str(d): str(u) for d, u in self.db.execute(
                "SELECT device_id, update_id FROM accepted WHERE round=? ORDER BY received_at, device_id",
                (round_no,))}
            parts = [bytes_to_arrays(bytes(b)) for (b,) in self.db.execute(
                "SELECT blob FROM partials WHERE round=? ORDER BY worker", (round_no,))]
            yield accepted, merge_partials(parts)

    # --- a worker's ingest -----------------------------------------------------------------------
    def accept_many(self, state: RoundState, updates: Sequence[UpdateLike], accumulator: Mapping[str, np.ndarray],
                    now: float) -> None:
        """store.AggregatorStore.accept_many, for one worker of several: its rows and ITS partial aggregate, in
        one transaction that commits only while the round is collecting and no other worker holds one of the
        batch's devices (RoundNotCollecting, AlreadyCounted: nothing of the batch is stored)."""
        rows = [(state.round, u.device_id, u.update_id, u.num_examples, now, self.worker,
                 state.is_selected(u.device_id)) for u in updates]
        try:
            with self.pg.transaction():
                row = self.db.execute("SELECT phase FROM rounds WHERE round=? FOR SHARE", (state.round,)).fetchone()
                if row is None or row[0] != Phase.COLLECTING.value:
                    raise RoundNotCollecting(f"round {state.round} closed before this worker's batch committed")
                self.db.executemany("INSERT INTO accepted (round, device_id, update_id, num_examples, received_at, "
                                    "worker, selected) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self.db.execute("INSERT INTO partials VALUES (?, ?, ?) ON CONFLICT (round, worker) DO UPDATE "
                                "SET blob=excluded.blob", (state.round, self.worker, arrays_to_bytes(accumulator)))
        except pg_errors.UniqueViolation:
            raise AlreadyCounted(f"another worker counted a device of this batch in round {state.round}") from None

    def counted_among(self, round_no: int, devices: Sequence[str]) -> dict[str, str]:
        """Which of `devices` are counted in `round_no` (by any worker), with their update ids."""
        return {str(d): str(u) for d, u in self.db.execute(
            "SELECT device_id, update_id FROM accepted WHERE round=? AND device_id = ANY(?)",
            (round_no, list(devices)))}

    def accumulator(self, round_no: int) -> dict[str, np.ndarray] | None:
        """THIS worker's partial aggregate of `round_no` (the coordinator merges them all in `closing`)."""
        row = self.db.execute("SELECT blob FROM partials WHERE round=? AND worker=?",
                              (round_no, self.worker)).fetchone()
        return None if row is None else bytes_to_arrays(bytes(row[0]))

    def forget_accumulator(self, round_no: int) -> None:
        self.db.execute("DELETE FROM partials WHERE round=?", (round_no,))
