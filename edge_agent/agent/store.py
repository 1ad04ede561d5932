"""Device state in SQLite: the personal head, the round log, the outbox of unsent updates, and the
embeddings of the windows an attached MCU sent or an application dropped as files, with the ledger of
those files (see "a device's own data" below).

Training a round commits three things in ONE transaction: the new personal state, the round-log entry
and the outbox row holding the encoded update. So a device killed at any instant either has not trained
the round (and will), or has the update waiting in its outbox (and will send the very same bytes,
with the same update id, which the aggregator counts once).

An update is marked sent after the broker acknowledged it (PUBACK reason code < 0x80, and not 0x10
"no matching subscribers", which means the aggregator was not subscribed at that moment). A PUBACK
only says the broker took it: a broker past its queue limits drops what it acknowledged, and one that
crashes loses what it held. So an update leaves the outbox when the aggregator's receipt for it
arrives (counted or refused: edge_agent/receipts.py), or, never confirmed, when its round is over (a
later round's task, or its deadline passed). Until then the agent sends it again, after a timeout and
after every reconnection (the aggregator ignores what it already counted).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..codec.tensor_pack import pack_tensors, unpack_tensors
from ..db import connect, transaction
from ..faults import crash_point
from ..learning.strategies import ClientState

SCHEMA = """
CREATE TABLE IF NOT EXISTS personal (
    id INTEGER PRIMARY KEY CHECK (id = 1), blob BLOB NOT NULL, rounds_done INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS round_log (
    round INTEGER PRIMARY KEY, update_id TEXT, model_version INTEGER NOT NULL, trained_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    update_id TEXT PRIMARY KEY, round INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    created_at REAL NOT NULL, sent INTEGER NOT NULL DEFAULT 0, deadline REAL);
CREATE TABLE IF NOT EXISTS evaluations (version INTEGER PRIMARY KEY, report TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS high_water (
    id INTEGER PRIMARY KEY CHECK (id = 1), round INTEGER NOT NULL, model_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, window_id INTEGER NOT NULL, label INTEGER NOT NULL,
    shape TEXT NOT NULL, samples BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, window_id INTEGER NOT NULL, label INTEGER NOT NULL, codes BLOB NOT NULL,
    copy_of INTEGER);
CREATE TABLE IF NOT EXISTS embedding_space (id INTEGER PRIMARY KEY CHECK (id = 1), space TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS residual (
    id INTEGER PRIMARY KEY CHECK (id = 1), codec TEXT NOT NULL, model_version INTEGER NOT NULL, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS held_model (
    id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS stored_files (
    sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, windows INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    stored_at REAL NOT NULL);
"""


@dataclass(frozen=True)
class Residual:
    """Error feedback's memory (codec/compression.ErrorFeedback): what the lossy codec `codec` has not sent yet of
    this device's changes, as of the update it sent against global `model_version`."""

    codec: str
    model_version: int
    arrays: dict[str, np.ndarray]

    def stale(self, codec: str, shapes: Mapping[str, tuple[int, ...]], version: int, max_age: int) -> str | None:
        """Why this residual means nothing to an update of `codec` and `shapes` trained from global `version`
        (None: it still does): another codec (its errors are not this one's), other tensors (a new head or
        strategy), or changes against a global model more than `max_age` versions older (a device away for many
        rounds: the fleet has moved on, and sending them now would push stale directions)."""
        if self.codec != codec:
            return f"the codec changed from {self.codec} to {codec}"
        if {k: tuple(v.shape) for k, v in self.arrays.items()} != {k: tuple(s) for k, s in shapes.items()}:
            return "the shared tensors changed"
        if version - self.model_version > max_age:
            return f"it dates from global version {self.model_version}, {version - self.model_version} behind"
        return None


@dataclass(frozen=True)
class OutboxItem:
    update_id: str
    round: int
    topic: str
    payload: bytes
    deadline: float | None = None  # its round's deadline (unix seconds): past it, nobody will count the update


def _check_cap(cap: int) -> None:
    if cap < 1:
        raise ValueError(f"cap must be at least 1, got {cap}")


def _add_outbox_deadline(db: sqlite3.Connection) -> None:
    """Outboxes written before receipts have no deadline column: add it (NULL: wait for a later round's task)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
    if "deadline" not in columns:
        db.execute("ALTER TABLE outbox ADD COLUMN deadline REAL")


def _add_embedding_copies(db: sqlite3.Connection) -> None:
    """Embeddings stored before augmented copies have no copy_of column: add it (NULL: an original window), and the
    index that finds a window's copies when the window goes."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(embeddings)")}
    if "copy_of" not in columns:
        db.execute("ALTER TABLE embeddings ADD COLUMN copy_of INTEGER")
    db.execute("CREATE INDEX IF NOT EXISTS embeddings_copy_of ON embeddings (copy_of) WHERE copy_of IS NOT NULL")


@dataclass(frozen=True)
class Copies:
    """Augmented copies of a file's windows, stored with them: codes[k], labels[k] made from the file's window
    of[k] (its place in the file)."""

    codes: np.ndarray
    labels: np.ndarray
    of: np.ndarray


@dataclass(frozen=True)
class EmbeddingRows:
    """Every kept embedding, originals and copies, in arrival order (the copies of a file after its windows)."""

    codes: np.ndarray  # (n, dim)
    labels: np.ndarray  # (n,) int64
    original: np.ndarray  # (n,) int64: -1 for an original window; for a copy, the row of the window it was made from
    newest: int  # the seq of the newest row

    @property
    def windows(self) -> np.ndarray:
        """The rows of the original windows, in arrival order."""
        return np.flatnonzero(self.original == -1)


class AgentStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = connect(self.path, SCHEMA)
        _add_outbox_deadline(self.db)
        _add_embedding_copies(self.db)

    def close(self) -> None:
        self.db.close()

    def client_state(self) -> ClientState | None:
        row = self.db.execute("SELECT blob, rounds_done FROM personal WHERE id=1").fetchone()
        if row is None:
            return None
        return ClientState(unpack_tensors(row[0]), int(row[1]))

    def trained(self, round_no: int) -> bool:
        return self.db.execute("SELECT 1 FROM round_log WHERE round=?", (round_no,)).fetchone() is not None

    def commit_round(self, round_no: int, model_version: int, state: ClientState, item: OutboxItem | None,
                     residual: Residual | None = None) -> None:
        """New personal state + round log + outbox row (+ the codec's residual after that update), all or nothing:
        a residual that ran ahead of, or fell behind, the update it belongs to would send a change twice or lose
        it."""
        blob = pack_tensors({k: np.asarray(v, np.float32) for k, v in state.personal.items()}, int8=False)
        with transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO personal VALUES (1, ?, ?)", (blob, state.rounds_done))
            self.db.execute("INSERT INTO round_log VALUES (?, ?, ?, ?)",
                            (round_no, item.update_id if item else None, model_version, time.time()))
            if item is not None:
                self.db.execute("INSERT INTO outbox (update_id, round, topic, payload, created_at, sent, deadline) "
                                "VALUES (?, ?, ?, ?, ?, 0, ?)",
                                (item.update_id, item.round, item.topic, item.payload, time.time(), item.deadline))
            if residual is not None:
                self.db.execute("INSERT OR REPLACE INTO residual VALUES (1, ?, ?, ?)",
                                (residual.codec, residual.model_version, pack_tensors(residual.arrays, int8=False)))

    def residual(self) -> Residual | None:
        row = self.db.execute("SELECT codec, model_version, blob FROM residual WHERE id=1").fetchone()
        return None if row is None else Residual(str(row[0]), int(row[1]), unpack_tensors(row[2]))

    def drop_residual(self) -> None:
        self.db.execute("DELETE FROM residual")

    def save_initial_state(self, state: ClientState) -> None:
        blob = pack_tensors({k: np.asarray(v, np.float32) for k, v in state.personal.items()}, int8=False)
        self.db.execute("INSERT OR IGNORE INTO personal VALUES (1, ?, ?)", (blob, state.rounds_done))

    def outbox(self, *, include_sent: bool = False) -> list[OutboxItem]:
        """Updates not confirmed by a receipt yet; without `include_sent`, only those no broker took yet."""
        where = "" if include_sent else " WHERE sent = 0"
        rows = self.db.execute(f"SELECT update_id, round, topic, payload, deadline FROM outbox{where} "
                               "ORDER BY created_at").fetchall()
        return [OutboxItem(r[0], int(r[1]), r[2], bytes(r[3]), None if r[4] is None else float(r[4])) for r in rows]

    def mark_sent(self, update_id: str) -> None:
        self.db.execute("UPDATE outbox SET sent = 1 WHERE update_id=?", (update_id,))

    def confirm(self, update_id: str, round_no: int) -> bool:
        """The aggregator's receipt for update `update_id` of round `round_no` arrived: drop it. False if the
        outbox did not hold it (a receipt for a resent copy, or for an update already given up on)."""
        return self.db.execute("DELETE FROM outbox WHERE update_id = ? AND round = ?",
                               (update_id, round_no)).rowcount > 0

    def forget_rounds_before(self, round_no: int) -> list[tuple[str, int]]:
        """Drop updates of rounds that are over (the aggregator has moved on); returns their (update id, round):
        none of them was confirmed."""
        return self._forget("round < ?", round_no)

    def forget_expired(self, now: float) -> list[tuple[str, int]]:
        """Drop updates whose round's deadline is before `now` (unix seconds); returns their (update id, round)."""
        return self._forget("deadline < ?", now)

    def _forget(self, where: str, value: float) -> list[tuple[str, int]]:
        # Selected, then deleted, in one transaction, rather than DELETE ... RETURNING: that needs SQLite 3.35.
        with transaction(self.db):
            rows = self.db.execute(f"SELECT update_id, round FROM outbox WHERE {where}", (value,)).fetchall()
            self.db.execute(f"DELETE FROM outbox WHERE {where}", (value,))
        return [(r[0], int(r[1])) for r in rows]

    # --- a device's own data: embeddings of the MCU's labelled windows -------------------------------------
    # Kept as the backbone's output codes (int8 for a quantized backbone: 64 bytes a window, and exact), never as
    # raw windows, and at most `cap` of them (the oldest go first): a device that collects for months holds
    # what it can train on in bounded memory and disk. Windows that could not be embedded when they were stored
    # (a database from an earlier edge-fl, which kept raw windows) wait in `windows` until the data source
    # embeds them.
    # A file's augmented copies ([data] augment_copies) are kept beside its windows, each marked with the seq of
    # the window it was made from (`copy_of`): they are no windows of the device. They never count towards
    # `cap` or towards the windows a source needs to train, and they go when their window goes; so a device keeps
    # at most cap windows and cap * copies copies.

    def add_window(self, window_id: int, label: int, x: np.ndarray) -> None:
        """A labelled window not embedded yet: the data source embeds it (once) and drops it."""
        x = np.ascontiguousarray(x, np.float32)
        self.db.execute("INSERT INTO windows (window_id, label, shape, samples) VALUES (?, ?, ?, ?)",
                        (window_id, label, ",".join(map(str, x.shape)), x.tobytes()))

    def pending_windows(self, limit: int) -> list[tuple[int, int, int, np.ndarray]]:
        """Up to `limit` of the oldest windows waiting to be embedded, as (seq, window id, label, window)."""
        rows = self.db.execute("SELECT seq, window_id, label, shape, samples FROM windows ORDER BY seq LIMIT ?",
                               (limit,)).fetchall()
        return [(int(seq), int(wid), int(label),
                 np.frombuffer(samples, np.float32).reshape(tuple(int(d) for d in shape.split(","))))
                for seq, wid, label, shape, samples in rows]

    def add_embedding(self, window_id: int, label: int, codes: np.ndarray, *, cap: int,
                      replaces_window: int | None = None) -> None:
        """One window's embedding codes; beyond `cap` embeddings the oldest are dropped, in the same
        transaction. `replaces_window`: the seq of the waiting window these codes came from, dropped with it."""
        _check_cap(cap)
        with transaction(self.db):
            self._insert_embeddings([(window_id, label, codes)])
            self._keep_newest(cap)
            if replaces_window is not None:
                self.drop_window(replaces_window)

    def _insert_embeddings(self, rows: Iterable[tuple[int, int, np.ndarray]]) -> None:
        """(window id, label, codes) rows, in order (in the caller's transaction)."""
        self.db.executemany("INSERT INTO embeddings (window_id, label, codes) VALUES (?, ?, ?)",
                            ((wid, label, np.ascontiguousarray(codes).tobytes()) for wid, label, codes in rows))

    def keep_newest_embeddings(self, cap: int) -> int:
        """Drop all but the newest `cap` embeddings; returns how many were dropped."""
        with transaction(self.db):
            return self._keep_newest(cap)

    def _keep_newest(self, cap: int) -> int:
        """Drop all but the newest `cap` windows, with the copies made from the dropped ones; returns how many
        windows went."""
        # Every window at or below the (cap+1)-th newest window's seq goes: a walk of `cap` windows (and the copies
        # between them) along the primary key. A copy's seq is above its window's: its window's seq finds it.
        row = self.db.execute("SELECT seq FROM embeddings WHERE copy_of IS NULL ORDER BY seq DESC LIMIT 1 OFFSET ?",
                              (cap,)).fetchone()
        dropped = 0
        if row is not None:
            dropped = int(self.db.execute("DELETE FROM embeddings WHERE seq <= ? AND copy_of IS NULL",
                                          (row[0],)).rowcount)
            self.db.execute("DELETE FROM embeddings WHERE copy_of <= ?", (row[0],))
        self._forget_evicted_files()
        return dropped

    def drop_window(self, seq: int) -> None:
        self.db.execute("DELETE FROM windows WHERE seq = ?", (seq,))

    def use_embedding_space(self, space: str) -> int:
        """Record which backbone output the stored codes are in; embeddings from another one (another model, or
        output, or quantization) mean nothing to this backbone and are dropped. Returns how many were dropped."""
        with transaction(self.db):
            row = self.db.execute("SELECT space FROM embedding_space WHERE id = 1").fetchone()
            dropped = 0
            if row is not None and row[0] != space:
                dropped = self._count_windows()
                self.db.execute("DELETE FROM embeddings")
                self._forget_evicted_files()
            self.db.execute("INSERT OR REPLACE INTO embedding_space VALUES (1, ?)", (space,))
        return dropped

    def _count_windows(self) -> int:
        """The embedded windows, copies not counted (both counts from the b-trees: the table and the copies' index)."""
        return int(self.db.execute("SELECT (SELECT COUNT(*) FROM embeddings) - "
                                   "(SELECT COUNT(*) FROM embeddings WHERE copy_of IS NOT NULL)").fetchone()[0])

    def embedding_version(self) -> tuple[int, int]:
        """(how many windows' embeddings are kept, copies not counted; the seq of the newest row, copy or not): the
        second changes whenever a row is added."""
        (newest,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM embeddings").fetchone()
        return self._count_windows(), int(newest)

    def window_count(self) -> int:
        """The device's windows: embedded (at most the cap; copies are no windows) and waiting to be embedded."""
        return self._count_windows() + int(self.db.execute("SELECT COUNT(*) FROM windows").fetchone()[0])

    def embeddings(self, dim: int, dtype: np.dtype[Any] | type[Any]) -> tuple[np.ndarray, np.ndarray, int]:
        """Every kept window's embedding in arrival order, copies left out, as (codes (n, dim) of `dtype`, labels,
        seq of the newest row)."""
        rows = self.embedding_rows(dim, dtype)
        windows = rows.windows
        return rows.codes[windows], rows.labels[windows], rows.newest

    def embedding_rows(self, dim: int, dtype: np.dtype[Any] | type[Any]) -> EmbeddingRows:
        """Every kept embedding, windows and copies, in arrival order.

        Read row by row into arrays sized up front, inside one read snapshot (WAL) for the count and the rows,
        without blocking the collectors, which keep inserting through their own connections meanwhile.
        """
        self.db.execute("BEGIN")
        try:
            n, newest = self.db.execute("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM embeddings").fetchone()
            codes = np.empty((n, dim), dtype)
            labels = np.empty(n, np.int64)
            seqs = np.empty(n, np.int64)
            copy_of = np.full(n, -1, np.int64)
            for i, (seq, label, blob, of) in enumerate(
                    self.db.execute("SELECT seq, label, codes, copy_of FROM embeddings ORDER BY seq")):
                codes[i], labels[i], seqs[i] = np.frombuffer(blob, dtype), label, seq
                if of is not None:
                    copy_of[i] = of
        finally:
            self.db.execute("COMMIT")
        # A copy's window, as a row: the window precedes its copies (a smaller seq) and goes with them.
        original = np.full(n, -1, np.int64)
        copies = np.flatnonzero(copy_of >= 0)
        if copies.size:
            rows = np.minimum(np.searchsorted(seqs, copy_of[copies]), n - 1)
            found = seqs[rows] == copy_of[copies]
            original[copies] = np.where(found, rows, -2)  # -2: its window is not kept (never trains)
        return EmbeddingRows(codes, labels, original, int(newest))

    def drop_copies(self) -> int:
        """Drop every augmented copy (augmentation was switched off); returns how many went."""
        return int(self.db.execute("DELETE FROM embeddings WHERE copy_of IS NOT NULL").rowcount)

    # --- the files those embeddings came from (the file source: agent/file_source.py) ------------------------
    # Each file whose windows are kept, by its content's SHA-256: a file stored again (the agent was killed
    # between storing it and moving it away, or the application wrote the same content twice) is not counted
    # twice. A file's row goes once none of its windows is kept any more (the cap or another embedding space
    # dropped them, wherever that happens in this store), so the ledger never outgrows the embeddings, and that
    # content, should it come again, is new data.

    def stored_file(self, sha256: str) -> str | None:
        """The name of the file with this content whose windows are kept, or None."""
        row = self.db.execute("SELECT name FROM stored_files WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else str(row[0])

    def add_file_embeddings(self, sha256: str, name: str, labels: np.ndarray, codes: np.ndarray, *,
                            cap: int, copies: Copies | None = None) -> None:
        """One file's windows (codes[i], labels[i]; window id: i, the window's place in its file, where the MCU's
        windows carry the MCU's own number), their augmented `copies` (window id: that of the window each was made
        from) and the file's SHA-256 in one transaction: stored and recorded, or none of them. Beyond `cap` windows
        the oldest are dropped with their copies, in the same transaction."""
        _check_cap(cap)
        if len(codes) != labels.size:
            raise ValueError(f"{name}: {len(codes)} rows of codes but {labels.size} labels")
        if copies is not None and not (len(copies.codes) == copies.labels.size == copies.of.size):
            raise ValueError(f"{name}: {len(copies.codes)} rows of copies' codes, {copies.labels.size} labels and "
                             f"{copies.of.size} windows they were made from")
        if copies is not None and copies.of.size and not (0 <= copies.of.min() and copies.of.max() < labels.size):
            raise ValueError(f"{name}: copies made from windows outside the file's 0..{labels.size - 1}")
        with transaction(self.db):
            self._insert_embeddings((i, int(labels[i]), codes[i]) for i in range(labels.size))
            # The file's newest window; the file's windows have the seqs up to it (the write lock is held).
            last = int(self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM embeddings").fetchone()[0])
            if copies is not None and copies.of.size:
                # Where the fault-tolerance tests kill the agent: the windows are written, their copies not yet.
                crash_point("agent.between_file_windows_and_copies", 1)
                first = last - labels.size + 1
                self.db.executemany(
                    "INSERT INTO embeddings (window_id, label, codes, copy_of) VALUES (?, ?, ?, ?)",
                    ((int(copies.of[k]), int(copies.labels[k]), np.ascontiguousarray(copies.codes[k]).tobytes(),
                      first + int(copies.of[k])) for k in range(copies.labels.size)))
            self.db.execute("INSERT INTO stored_files VALUES (?, ?, ?, ?, ?)",
                            (sha256, name, int(labels.size), last, time.time()))
            self._keep_newest(cap)

    def _forget_evicted_files(self) -> None:
        """Drop the records of files none of whose windows is kept any more (in the caller's transaction)."""
        self.db.execute("DELETE FROM stored_files WHERE last_seq < "
                        "(SELECT COALESCE(MIN(seq), 1 << 62) FROM embeddings)")

    def evaluated(self, version: int) -> bool:
        return self.db.execute("SELECT 1 FROM evaluations WHERE version=?", (version,)).fetchone() is not None

    def high_water(self) -> tuple[int, int]:
        """(highest round, highest global model version) this device accepted: a task or model below either is a
        rollback (a replayed old message), refused even after a restart. (0, 0) before the first one."""
        row = self.db.execute("SELECT round, model_version FROM high_water WHERE id=1").fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def raise_high_water(self, round_no: int, model_version: int) -> None:
        self.db.execute("INSERT INTO high_water VALUES (1, ?, ?) ON CONFLICT(id) DO UPDATE SET round = "
                        "MAX(round, excluded.round), model_version = MAX(model_version, excluded.model_version)",
                        (round_no, model_version))

    def held_model(self) -> bytes | None:
        """The global model this device holds when versions go down as deltas (codec/downlink.py): an unsigned
        float32 GLOBAL envelope, what the next delta applies to."""
        row = self.db.execute("SELECT payload FROM held_model WHERE id=1").fetchone()
        return None if row is None else bytes(row[0])

    def hold_model(self, version: int, payload: bytes) -> None:
        """Keep `payload` as the held model and raise the high-water version to it, together."""
        with transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO held_model VALUES (1, ?, ?)", (version, payload))
            self.raise_high_water(0, version)

    def drop_held_model(self) -> None:
        self.db.execute("DELETE FROM held_model")

    def record_evaluation(self, version: int, report: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO evaluations VALUES (?, ?)", (version, report))
