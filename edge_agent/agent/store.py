"""Device state in SQLite: the personal head, the round log and the outbox of unsent updates.

Training a round commits three things in ONE transaction: the new personal state, the round-log entry
and the outbox row holding the encoded update. So a device killed at any instant either has not trained
the round (and will), or has the update waiting in its outbox (and will send the very same bytes,
with the same update id, which the aggregator counts once).

An update is marked sent after the broker acknowledged it (PUBACK reason code < 0x80, and not 0x10
"no matching subscribers", which means the aggregator was not subscribed at that moment). It leaves
the outbox only when its round is over: a broker that crashes loses the messages it held, so after
every reconnection the agent sends the updates of the still-open round again (the aggregator ignores
what it already counted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..codec.tensor_pack import pack_tensors, unpack_tensors
from ..db import connect, transaction
from ..learning.strategies import ClientState

SCHEMA = """
CREATE TABLE IF NOT EXISTS personal (
    id INTEGER PRIMARY KEY CHECK (id = 1), blob BLOB NOT NULL, rounds_done INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS round_log (
    round INTEGER PRIMARY KEY, update_id TEXT, model_version INTEGER NOT NULL, trained_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    update_id TEXT PRIMARY KEY, round INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    created_at REAL NOT NULL, sent INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS evaluations (version INTEGER PRIMARY KEY, report TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, window_id INTEGER NOT NULL, label INTEGER NOT NULL,
    shape TEXT NOT NULL, samples BLOB NOT NULL);
"""


@dataclass(frozen=True)
class OutboxItem:
    update_id: str
    round: int
    topic: str
    payload: bytes


class AgentStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = connect(self.path, SCHEMA)

    def close(self) -> None:
        self.db.close()

    def client_state(self) -> ClientState | None:
        row = self.db.execute("SELECT blob, rounds_done FROM personal WHERE id=1").fetchone()
        if row is None:
            return None
        return ClientState(unpack_tensors(row[0]), int(row[1]))

    def trained(self, round_no: int) -> bool:
        return self.db.execute("SELECT 1 FROM round_log WHERE round=?", (round_no,)).fetchone() is not None

    def commit_round(self, round_no: int, model_version: int, state: ClientState, item: OutboxItem | None) -> None:
        """New personal state + round log + outbox row, all or nothing."""
        blob = pack_tensors({k: np.asarray(v, np.float32) for k, v in state.personal.items()}, int8=False)
        with transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO personal VALUES (1, ?, ?)", (blob, state.rounds_done))
            self.db.execute("INSERT INTO round_log VALUES (?, ?, ?, ?)",
                            (round_no, item.update_id if item else None, model_version, time.time()))
            if item is not None:
                self.db.execute("INSERT INTO outbox VALUES (?, ?, ?, ?, ?, 0)",
                                (item.update_id, item.round, item.topic, item.payload, time.time()))

    def save_initial_state(self, state: ClientState) -> None:
        blob = pack_tensors({k: np.asarray(v, np.float32) for k, v in state.personal.items()}, int8=False)
        self.db.execute("INSERT OR IGNORE INTO personal VALUES (1, ?, ?)", (blob, state.rounds_done))

    def outbox(self, *, include_sent: bool = False) -> list[OutboxItem]:
        where = "" if include_sent else " WHERE sent = 0"
        rows = self.db.execute(f"SELECT update_id, round, topic, payload FROM outbox{where} "
                               "ORDER BY created_at").fetchall()
        return [OutboxItem(r[0], int(r[1]), r[2], bytes(r[3])) for r in rows]

    def mark_sent(self, update_id: str) -> None:
        self.db.execute("UPDATE outbox SET sent = 1 WHERE update_id=?", (update_id,))

    def forget_rounds_before(self, round_no: int) -> int:
        """Drop updates of rounds that are over (the aggregator has moved on); returns how many."""
        return self.db.execute("DELETE FROM outbox WHERE round < ?", (round_no,)).rowcount

    def add_window(self, window_id: int, label: int, x: np.ndarray) -> None:
        """A labelled window from an attached MCU: the user's raw data, kept on this device only."""
        x = np.ascontiguousarray(x, np.float32)
        self.db.execute("INSERT INTO windows (window_id, label, shape, samples) VALUES (?, ?, ?, ?)",
                        (window_id, label, ",".join(map(str, x.shape)), x.tobytes()))

    def window_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM windows").fetchone()[0])

    def windows(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored window in arrival order, as (windows, labels).

        Read row by row into one array sized up front: a device that has collected for weeks holds each
        window once while reading, not three times (fetched rows, per-row arrays, their stacked copy).
        """
        x: np.ndarray | None = None
        # A deferred transaction is one read snapshot (WAL) for the count and the rows, without blocking the
        # collectors, which keep inserting windows through their own connections meanwhile.
        self.db.execute("BEGIN")
        try:
            n = self.window_count()
            y = np.empty(n, np.int64)
            for i, (label, shape, samples) in enumerate(
                    self.db.execute("SELECT label, shape, samples FROM windows ORDER BY seq")):
                row = np.frombuffer(samples, np.float32).reshape(tuple(int(d) for d in shape.split(",")))
                if x is None:
                    x = np.empty((n, *row.shape), np.float32)
                x[i], y[i] = row, label
        finally:
            self.db.execute("COMMIT")
        if x is None:
            return np.zeros((0, 0, 0), np.float32), np.zeros(0, np.int64)
        return x, y

    def evaluated(self, version: int) -> bool:
        return self.db.execute("SELECT 1 FROM evaluations WHERE version=?", (version,)).fetchone() is not None

    def record_evaluation(self, version: int, report: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO evaluations VALUES (?, ?)", (version, report))
