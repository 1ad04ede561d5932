"""The aggregator's history schema: versioned (PRAGMA user_version), migrated from the unversioned databases
of the first release without losing a row, documented column by column in docs/history-schema.md."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edge_agent.aggregator.store import (
    SCHEMA_VERSION,
    AggregatorStore,
    StoreError,
    open_read_only,
    read_history,
)
from edge_agent.codec.tensor_pack import pack_tensors

DOC = Path(__file__).resolve().parents[2] / "docs" / "history-schema.md"

# The DDL of the first release, verbatim: the databases in the field that have no schema version.
OLD_DDL = """
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


def _old_database(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """A version-0 database as the first release left it: two closed rounds (one failed), one open."""
    db = sqlite3.connect(path)
    db.executescript(OLD_DDL)
    blob = pack_tensors({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, int8=False)
    db.execute("INSERT INTO meta VALUES ('fingerprint', '{\"fleet\": \"old\"}')")
    db.executemany("INSERT INTO globals VALUES (?, ?, ?)", [(0, blob, 1.0), (1, blob, 2.0)])
    db.executemany("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
        (1, 0, json.dumps(["a", "b"]), 10.0, 70.0, "closed", 12.5, 2, 0, 1),
        (2, 1, json.dumps(["a", "b"]), 13.0, 73.0, "closed", 73.0, 0, 2, 0),
        (3, 1, json.dumps(["a", "b", "c"]), 74.0, 134.0, "collecting", None, None, None, None)])
    db.executemany("INSERT INTO accepted VALUES (?, ?, ?, ?, ?)",
                   [(1, "a", "u1", 10, 11.0), (1, "b", "u2", 12, 12.0), (3, "c", "u3", 7, 80.0)])
    db.execute("INSERT INTO accumulator VALUES (3, ?)", (b"\x00snapshot",))
    db.commit()
    rows = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
            for t in ("meta", "globals", "rounds", "accepted", "accumulator")}
    db.close()
    return rows


def test_an_unversioned_database_is_migrated_without_losing_a_row(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.db"
    before = _old_database(path)
    store = AggregatorStore(path)
    assert store.migrated_from == 0
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    for table, rows in before.items():
        after = store.db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
        assert [r[: len(rows[0])] for r in after] == rows, table  # old columns first, all kept
    assert store.latest_global() is not None and store.latest_global()[0] == 1  # type: ignore[index]
    state = store.current_round()
    assert state is not None and state.round == 3 and state.accepted == {"c": "u3"}
    history = store.history()
    assert [(h["round"], h["result_version"], h["succeeded"], h["reported"]) for h in history] == [
        (1, 1, True, 2), (2, None, False, 0), (3, None, None, 1)]
    assert history[0]["bytes_in"] is None  # not recorded before version 1: unknown, not zero
    store.close()
    again = AggregatorStore(path)  # migrating is done once
    assert again.migrated_from == SCHEMA_VERSION
    again.close()


def test_a_new_database_has_the_same_schema_as_a_migrated_one(tmp_path: Path) -> None:
    _old_database(tmp_path / "old.db")
    AggregatorStore(tmp_path / "old.db").close()
    AggregatorStore(tmp_path / "new.db").close()

    def schema(p: Path) -> list[tuple[str, str]]:
        with sqlite3.connect(p) as db:
            return [(n, re.sub(r"\s+", " ", s)) for n, s in
                    db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")]

    assert schema(tmp_path / "old.db") == schema(tmp_path / "new.db")


def test_history_reads_an_old_database_read_only_without_migrating_it(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.db"
    _old_database(path)
    db = open_read_only(path)
    history = read_history(db)
    assert [h["round"] for h in history] == [1, 2, 3] and history[0]["result_version"] == 1
    with pytest.raises(sqlite3.OperationalError):
        db.execute("CREATE TABLE x (y)")
    db.close()
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == 0


def test_a_database_from_a_newer_release_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.db"
    AggregatorStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this edge-fl understands"):
        AggregatorStore(path)


def test_the_document_describes_every_table_and_column(tmp_path: Path) -> None:
    AggregatorStore(tmp_path / "a.db").close()
    text = DOC.read_text()
    assert f"schema version {SCHEMA_VERSION}" in text
    with sqlite3.connect(tmp_path / "a.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            assert f"### `{table}`" in text, table
            section = text.split(f"### `{table}`", 1)[1].split("###", 1)[0]
            for column in (r[1] for r in db.execute(f"PRAGMA table_info({table})")):
                assert f"| `{column}` |" in section, f"{table}.{column} is not documented"
