"""Durable aggregator state in SQLite (WAL): global versions, rounds, accepted updates and the running
aggregate of the open round.

Ingest is exactly-once by construction: accepting a batch of updates inserts their (round, device) rows and
replaces the round's accumulator in ONE transaction (a group commit), and the aggregator acknowledges the
batch's MQTT messages only after that commit. Killed at any instant, a restarted aggregator either has the
whole batch counted (and ignores the broker's redeliveries as duplicates) or none of it (and the broker
redelivers it all).
"""

from __future__ import annotations

import io
import json
import sqlite3
import struct
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from ..codec.tensor_pack import pack_tensors, unpack_tensors
from ..db import connect, transaction
from ..learning.strategies import ClientFailure
from .rounds import Phase, RoundState, UpdateLike, updated_reliability

# The tables as the first release created them (schema version 0, no PRAGMA user_version). A new database
# is created this way too and then migrated, so a fresh and an upgraded database are the same by construction.
# docs/history-schema.md documents every table and column; keep it in step with MIGRATIONS.
SCHEMA_V0 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS globals (
    version INTEGER PRIMARY KEY, blob BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, model_version INTEGER NOT NULL, selected TEXT NOT NULL,
    opened_at REAL NOT NULL, deadline REAL NOT NULL, phase TEXT NOT NULL,
    closed_at REAL, reported INTEGER, failed INTEGER, succeeded INTEGER);
CREATE TABLE IF NOT EXISTS accepted (
    round INTEGER NOT NULL, device_id TEXT NOT NULL, update_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL, received_at REAL NOT NULL, PRIMARY KEY (round, device_id));
CREATE TABLE IF NOT EXISTS accumulator (round INTEGER PRIMARY KEY, blob BLOB NOT NULL);
"""

# MIGRATIONS[n] takes a database from schema version n - 1 to n, in one transaction with the version bump.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # What an operator asks about a closed round: the traffic, the refusals, the version it produced.
        "ALTER TABLE rounds ADD COLUMN result_version INTEGER",
        "ALTER TABLE rounds ADD COLUMN bytes_in INTEGER",
        "ALTER TABLE rounds ADD COLUMN bytes_out INTEGER",
        "ALTER TABLE rounds ADD COLUMN rejected INTEGER",
        "ALTER TABLE rounds ADD COLUMN duplicates INTEGER",
        # A successful round always produced the next version (strategies add one); failed rounds produce none.
        "UPDATE rounds SET result_version = model_version + 1 WHERE succeeded = 1",
        # The accuracies devices report (telemetry) for each global version: the accuracy-per-round history.
        "CREATE TABLE IF NOT EXISTS telemetry (version INTEGER NOT NULL, device_id TEXT NOT NULL, "
        "personal_acc REAL, global_acc REAL, n_test INTEGER NOT NULL, received_at REAL NOT NULL, "
        "PRIMARY KEY (version, device_id))",
    ),
    2: (
        # How reliably each device reports when selected (rounds.RELIABILITY_DECAY): ghosts are selected less.
        "CREATE TABLE IF NOT EXISTS reliability (device_id TEXT PRIMARY KEY, score REAL NOT NULL, "
        "selected INTEGER NOT NULL, reported INTEGER NOT NULL, updated_at REAL NOT NULL)",
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)


class StoreError(RuntimeError):
    """The state database belongs to another fleet configuration or is damaged."""


class RoundNotCollecting(StoreError):
    """A batch's round closed (the coordinator closed it) before the batch committed: nothing of it is stored."""


class AlreadyCounted(StoreError):
    """Another aggregator worker counted a device of the batch in this round first: nothing of it is stored."""


_UPSERT_GLOBAL = ("INSERT INTO globals VALUES (?, ?, ?) ON CONFLICT (version) DO UPDATE SET blob=excluded.blob, "
                  "created_at=excluded.created_at")


_RAW = b"EFAR"  # accumulator snapshot: magic, u32 header length, JSON [[name, dtype, shape], ...], raw bytes


def arrays_to_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The running aggregate, written with every accepted update: raw little-endian bytes behind a small
    JSON index. np.savez's zip container cost ~0.7 ms an update, a tenth of the aggregator's work."""
    items = [(k, np.asarray(v)) for k, v in arrays.items()]  # tobytes() is C order whatever the layout
    for k, v in items:
        if v.dtype.kind not in "fiu" or v.dtype.byteorder == ">":
            raise ValueError(f"accumulator tensor {k!r} has dtype {v.dtype}: only little-endian numbers are stored")
    index = json.dumps([[k, v.dtype.str, list(v.shape)] for k, v in items]).encode()
    return b"".join([_RAW, struct.pack("<I", len(index)), index, *(v.tobytes() for _, v in items)])


def bytes_to_arrays(blob: bytes) -> dict[str, np.ndarray]:
    if blob[:4] != _RAW:  # a snapshot written by an earlier version (np.savez)
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    (n,) = struct.unpack_from("<I", blob, 4)
    offset, out = 8 + n, {}
    for name, dtype, shape in json.loads(blob[8:8 + n]):
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = np.frombuffer(blob, dt, count, offset).reshape(tuple(shape)).copy()
        offset += count * dt.itemsize
    if offset != len(blob):
        raise StoreError(f"accumulator snapshot damaged: {len(blob) - offset} bytes unaccounted for")
    return out


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, where: str) -> int:
    """Bring a database to SCHEMA_VERSION, one version per transaction; return the version it had."""
    found = schema_version(db)
    if found > SCHEMA_VERSION:
        raise StoreError(f"{where} has history schema version {found}, newer than this edge-fl understands "
                         f"({SCHEMA_VERSION}): run the edge-fl release that wrote it, or a newer one")
    for version in range(found + 1, SCHEMA_VERSION + 1):
        with transaction(db):
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version:d}")  # PRAGMA takes no parameters; an int from our table
    return found


class AggregatorStore:
    """The embedded store of a single aggregator process (SQLite). pgstore.PostgresStore shares this code (the
    SQL here is portable: upserts, `?` placeholders its connection translates) for several worker processes."""

    shared = False  # True: several aggregator processes write this store (one coordinator, see pgstore.py)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self.db: Any = connect(self.path, SCHEMA_V0)
        self.migrated_from = migrate(self.db, str(self.path))

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> AbstractContextManager[Any]:
        """All statements inside commit together or not at all."""
        return transaction(self.db)

    # --- configuration fingerprint -------------------------------------------------------------
    def check_fingerprint(self, fingerprint: Mapping[str, Any]) -> None:
        """Refuse to resume a state written for another strategy / head / fleet."""
        want = json.dumps(fingerprint, sort_keys=True)
        row = self.db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()
        if row is None:  # two workers starting together: the first insert wins, the other compares with it
            self.db.execute("INSERT INTO meta VALUES ('fingerprint', ?) ON CONFLICT (key) DO NOTHING", (want,))
            row = self.db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()
        if row[0] != want:
            raise StoreError(f"{self.where} holds the state of another configuration ({row[0]}); this aggregator "
                             f"runs {want}. Use another state file or delete this one to start over.")

    def read_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # --- global versions -----------------------------------------------------------------------
    def save_global(self, version: int, params: Mapping[str, np.ndarray]) -> None:
        with self.transaction():
            self.db.execute(_UPSERT_GLOBAL, (version, pack_tensors(params, int8=False), time.time()))

    def latest_global(self) -> tuple[int, dict[str, np.ndarray]] | None:
        row = self.db.execute("SELECT version, blob FROM globals ORDER BY version DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), unpack_tensors(row[1]))

    def global_versions(self) -> list[int]:
        """Every stored global version, newest first (to find the last good one after a bad one)."""
        return [int(r[0]) for r in self.db.execute("SELECT version FROM globals ORDER BY version DESC")]

    def global_at(self, version: int) -> dict[str, np.ndarray] | None:
        row = self.db.execute("SELECT blob FROM globals WHERE version=?", (version,)).fetchone()
        return None if row is None else unpack_tensors(row[0])

    # --- rounds --------------------------------------------------------------------------------
    def open_round(self, state: RoundState) -> None:
        with self.transaction():
            self.db.execute("INSERT INTO rounds (round, model_version, selected, opened_at, deadline, phase) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (state.round, state.model_version, json.dumps(list(state.selected)),
                             state.opened_at, state.deadline, state.phase.value))

    def current_round(self) -> RoundState | None:
        row = self.db.execute("SELECT round, model_version, selected, opened_at, deadline, phase FROM rounds "
                              "ORDER BY round DESC LIMIT 1").fetchone()
        if row is None:
            return None
        accepted = dict(self.db.execute("SELECT device_id, update_id FROM accepted WHERE round=?",
                                        (row[0],)).fetchall())
        return RoundState(int(row[0]), int(row[1]), tuple(json.loads(row[2])), float(row[3]), float(row[4]),
                          accepted, Phase(row[5]))

    def accept_many(self, state: RoundState, updates: Sequence[UpdateLike], accumulator: Mapping[str, np.ndarray],
                    now: float) -> None:
        """Record `updates` (accepted in `state`'s round) and the one accumulator that includes them all, in ONE
        transaction: a group commit pays one fsync and one snapshot of the accumulator for the whole batch. All
        or nothing: on any error (a device already counted, a full disk) nothing of the batch is stored."""
        with self.transaction():
            self.db.executemany("INSERT INTO accepted VALUES (?, ?, ?, ?, ?)",
                                [(state.round, u.device_id, u.update_id, u.num_examples, now) for u in updates])
            self.db.execute("INSERT INTO accumulator VALUES (?, ?) "
                            "ON CONFLICT (round) DO UPDATE SET blob=excluded.blob",
                            (state.round, arrays_to_bytes(accumulator)))

    def accept(self, state: RoundState, update: UpdateLike, accumulator: Mapping[str, np.ndarray], now: float) -> None:
        """Record one update and the accumulator that includes it, atomically (a batch of one)."""
        self.accept_many(state, (update,), accumulator, now)

    def accumulator(self, round_no: int) -> dict[str, np.ndarray] | None:
        row = self.db.execute("SELECT blob FROM accumulator WHERE round=?", (round_no,)).fetchone()
        return None if row is None else bytes_to_arrays(row[0])

    def close_round(self, state: RoundState, failures: Sequence[ClientFailure], succeeded: bool,
                    new_version: int | None, new_params: Mapping[str, np.ndarray] | None, now: float,
                    traffic: Mapping[str, int] | None = None, meta: Mapping[str, str] | None = None) -> None:
        """Close the round and, when it succeeded, store the new global version, atomically.

        `traffic` holds the round's bytes_in, bytes_out, rejected and duplicates for the history; `meta`, state
        that must move with the round (the norm history of adaptive bounds, the privacy budget's round count)."""
        t = dict(traffic or {})
        with self.transaction():
            for key, value in (meta or {}).items():
                self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                                (key, value))
            self.db.execute("UPDATE rounds SET phase=?, closed_at=?, reported=?, failed=?, succeeded=?, "
                            "result_version=?, bytes_in=?, bytes_out=?, rejected=?, duplicates=? WHERE round=?",
                            (Phase.CLOSED.value, now, len(state.accepted), len(failures), int(succeeded),
                             new_version if succeeded else None, t.get("bytes_in"), t.get("bytes_out"),
                             t.get("rejected"), t.get("duplicates"), state.round))
            if new_version is not None and new_params is not None:
                self.db.execute(_UPSERT_GLOBAL, (new_version, pack_tensors(new_params, int8=False), now))
            self.forget_accumulator(state.round)

    def forget_accumulator(self, round_no: int) -> None:
        """A closed round's running aggregate is not needed any more (inside close_round's transaction)."""
        self.db.execute("DELETE FROM accumulator WHERE round=?", (round_no,))

    def reliability(self) -> dict[str, float]:
        """Every device's reliability score (devices never selected have none: they count as 1)."""
        return {str(d): float(s) for d, s in self.db.execute("SELECT device_id, score FROM reliability")}

    def record_reliability(self, outcomes: Mapping[str, bool], now: float) -> None:
        """After a round: each selected device reported (True) or not; scores move by rounds.updated_reliability."""
        old = self.reliability()
        with self.transaction():
            for device, reported in outcomes.items():
                self.db.execute(
                    "INSERT INTO reliability VALUES (?, ?, 1, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                    "score=excluded.score, selected=reliability.selected + 1, "
                    "reported=reliability.reported + excluded.reported, "
                    "updated_at=excluded.updated_at",
                    (device, updated_reliability(old.get(device, 1.0), reported), int(reported), now))

    def record_telemetry(self, version: int, device_id: str, personal_acc: float | None, global_acc: float | None,
                         n_test: int, now: float) -> None:
        """A device's accuracies under global `version` (the latest report per device and version wins)."""
        with self.transaction():
            self.db.execute("INSERT INTO telemetry VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (version, device_id) "
                            "DO UPDATE SET personal_acc=excluded.personal_acc, global_acc=excluded.global_acc, "
                            "n_test=excluded.n_test, received_at=excluded.received_at",
                            (version, device_id, personal_acc, global_acc, n_test, now))

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last `limit` rounds, oldest first, with traffic and the devices' mean accuracies."""
        return read_history(self.db, limit, SCHEMA_VERSION)

    def round_history(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT round, model_version, phase, reported, failed, succeeded FROM rounds "
                               "ORDER BY round").fetchall()
        names = ("round", "model_version", "phase", "reported", "failed", "succeeded")
        return [dict(zip(names, r, strict=True)) for r in rows]

    def accepted_count(self, round_no: int) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM accepted WHERE round=?", (round_no,)).fetchone()[0])



def is_postgres_url(state: str) -> bool:
    """Does an aggregator's `state` name a PostgreSQL database (several workers) rather than a SQLite file?"""
    return state.startswith(("postgresql://", "postgres://"))


def open_store(state: str, fleet: str, worker: str) -> AggregatorStore:
    """The store `state` names: a PostgreSQL URL (several aggregator workers, pgstore.py) or a SQLite file."""
    if is_postgres_url(state):
        from .pgstore import PostgresStore  # psycopg: only on an aggregator configured for it

        return PostgresStore(state, fleet, worker)
    return AggregatorStore(state)


def read_history(db: Any, limit: int = 100, version: int | None = None) -> list[dict[str, Any]]:
    """The last `limit` rounds of a database of any schema version up to ours, oldest first, never writing
    (so `edge-fl status` can read a running aggregator's file read-only). Columns a version-0 database
    lacks read as None. `version`: the schema version when the caller knows it (a PostgreSQL store).
    Accuracies are means over the devices that reported telemetry for the version the
    round produced (n_test-weighted)."""
    version = schema_version(db) if version is None else version
    if version > SCHEMA_VERSION:
        raise StoreError(f"history schema version {version} is newer than this edge-fl understands ({SCHEMA_VERSION})")
    if version >= 1:
        extra = ("r.result_version, r.bytes_in, r.bytes_out, r.rejected, r.duplicates, "
                 "(SELECT SUM(t.personal_acc * t.n_test) / SUM(t.n_test) FROM telemetry t "
                 " WHERE t.version = r.result_version AND t.personal_acc IS NOT NULL), "
                 "(SELECT SUM(t.global_acc * t.n_test) / SUM(t.n_test) FROM telemetry t "
                 " WHERE t.version = r.result_version AND t.global_acc IS NOT NULL), "
                 "(SELECT COUNT(*) FROM telemetry t WHERE t.version = r.result_version)")
    else:
        extra = "CASE WHEN r.succeeded = 1 THEN r.model_version + 1 END, NULL, NULL, NULL, NULL, NULL, NULL, 0"
    rows = db.execute(
        "SELECT * FROM (SELECT r.round, r.model_version, r.phase, r.opened_at, r.deadline, r.closed_at, r.selected, "
        f"r.reported, r.failed, r.succeeded, {extra} FROM rounds r ORDER BY r.round DESC LIMIT ?) AS h ORDER BY 1",
        (limit,)).fetchall()
    out = []
    for row in rows:
        (rnd, mv, phase, opened, deadline, closed, selected, reported, failed, succeeded, result_version, b_in,
         b_out, rejected, duplicates, personal, glob, n_acc) = row
        if reported is None and phase != Phase.CLOSED.value:  # the open round: what is counted so far
            reported = int(db.execute("SELECT COUNT(*) FROM accepted WHERE round=?", (rnd,)).fetchone()[0])
        out.append({"round": rnd, "model_version": mv, "result_version": result_version, "phase": phase,
                    "opened_at": opened, "deadline": deadline, "closed_at": closed,
                    "selected": len(json.loads(selected)), "reported": reported, "failed": failed,
                    "succeeded": None if succeeded is None else bool(succeeded), "bytes_in": b_in,
                    "bytes_out": b_out, "rejected": rejected, "duplicates": duplicates, "personal_acc": personal,
                    "global_acc": glob, "devices_reporting_acc": n_acc})
    return out


def open_read_only(path: str | Path) -> sqlite3.Connection:
    """A connection that cannot write: for looking at a running aggregator's state (WAL allows it)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"aggregator state database not found: {p}")
    return sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
