"""Augmented copies in the agent store (AgentStore.add_file_embeddings(copies=...)): kept beside the file's windows,
each marked with the window it was made from, in the file's one transaction; they are no windows (the cap, the
count a source needs, the ledger all count windows) and they go when their window goes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent.store import AgentStore, Copies

DIM = 4


def codes_of(n: int, start: int) -> np.ndarray:
    """n distinct float32 code rows, numbered from `start`."""
    return np.arange(start * DIM, (start + n) * DIM, dtype=np.float32).reshape(n, DIM)


def copies_of(n: int, per_window: int, start: int) -> Copies:
    """`per_window` copies of each of n windows, window-major, their codes numbered from `start`."""
    of = np.repeat(np.arange(n), per_window)
    return Copies(codes_of(n * per_window, start), (of % 3).astype(np.int64), of)


def test_copies_are_kept_after_their_files_windows_each_pointing_at_its_window(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    labels = np.arange(3, dtype=np.int64) % 3
    store.add_file_embeddings("aa", "a.npz", labels, codes_of(3, 0), cap=10, copies=copies_of(3, 2, 100))
    store.add_file_embeddings("bb", "b.npz", labels[:2], codes_of(2, 3), cap=10, copies=copies_of(2, 2, 200))
    rows = store.embedding_rows(DIM, np.float32)
    # a's 3 windows, a's 6 copies, b's 2 windows, b's 4 copies
    assert np.array_equal(rows.codes, np.concatenate([codes_of(3, 0), codes_of(6, 100), codes_of(2, 3),
                                                      codes_of(4, 200)]))
    assert rows.original.tolist() == [-1, -1, -1, 0, 0, 1, 1, 2, 2, -1, -1, 9, 9, 10, 10]
    assert rows.windows.tolist() == [0, 1, 2, 9, 10] and rows.newest == 15
    # What counts as the device's windows leaves the copies out.
    codes, got_labels, newest = store.embeddings(DIM, np.float32)
    assert np.array_equal(codes, np.concatenate([codes_of(3, 0), codes_of(2, 3)])) and newest == 15
    assert got_labels.tolist() == [0, 1, 2, 0, 1]
    assert store.embedding_version() == (5, 15) and store.window_count() == 5
    store.close()


def test_the_cap_counts_windows_and_a_window_takes_its_copies_with_it(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    labels = np.zeros(3, np.int64)
    store.add_file_embeddings("aa", "a.npz", labels, codes_of(3, 0), cap=4, copies=copies_of(3, 2, 100))
    assert store.embedding_version()[0] == 3
    # b's 2 windows make 5: a's oldest window goes, and its 2 copies with it; its other copies stay.
    store.add_file_embeddings("bb", "b.npz", labels[:2], codes_of(2, 3), cap=4, copies=copies_of(2, 2, 200))
    rows = store.embedding_rows(DIM, np.float32)
    assert np.array_equal(rows.codes, np.concatenate([codes_of(2, 1), codes_of(4, 102), codes_of(2, 3),
                                                      codes_of(4, 200)]))
    assert rows.original.tolist() == [-1, -1, 0, 0, 1, 1, -1, -1, 6, 6, 7, 7]
    assert store.stored_file("aa") == "a.npz"  # two of its windows are kept
    assert store.keep_newest_embeddings(2) == 2  # a's last windows go, with their copies, and a is forgotten
    assert store.embedding_version() == (2, 15) and store.stored_file("aa") is None
    assert store.embedding_rows(DIM, np.float32).original.tolist() == [-1, -1, 0, 0, 1, 1]
    store.close()


def test_copies_can_be_dropped_and_another_space_drops_them_with_the_windows(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    store.use_embedding_space("one")
    store.add_file_embeddings("aa", "a.npz", np.zeros(3, np.int64), codes_of(3, 0), cap=10,
                              copies=copies_of(3, 4, 100))
    assert store.drop_copies() == 12 and store.embedding_version() == (3, 3)
    assert store.stored_file("aa") == "a.npz"  # its windows are kept
    store.add_file_embeddings("bb", "b.npz", np.zeros(2, np.int64), codes_of(2, 3), cap=10,
                              copies=copies_of(2, 4, 200))
    assert store.use_embedding_space("two") == 5  # windows dropped, copies not counted
    assert store.embedding_rows(DIM, np.float32).codes.shape == (0, DIM)
    assert store.stored_file("aa") is None and store.stored_file("bb") is None
    store.close()


def test_copies_that_do_not_match_the_file_are_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    labels = np.zeros(3, np.int64)
    bad = Copies(codes_of(4, 100), np.zeros(3, np.int64), np.arange(4) % 3)
    with pytest.raises(ValueError, match="4 rows of copies' codes, 3 labels and 4 windows"):
        store.add_file_embeddings("aa", "a.npz", labels, codes_of(3, 0), cap=10, copies=bad)
    outside = Copies(codes_of(2, 100), np.zeros(2, np.int64), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"copies made from windows outside the file's 0\.\.2"):
        store.add_file_embeddings("aa", "a.npz", labels, codes_of(3, 0), cap=10, copies=outside)
    assert store.embedding_version() == (0, 0) and store.stored_file("aa") is None
    store.close()


def test_a_store_written_before_copies_existed_opens_with_its_embeddings_as_windows(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "agent.db")  # the embeddings table as edge-fl created it before copies
    db.execute("CREATE TABLE embeddings (seq INTEGER PRIMARY KEY AUTOINCREMENT, window_id INTEGER NOT NULL, "
               "label INTEGER NOT NULL, codes BLOB NOT NULL)")
    db.executemany("INSERT INTO embeddings (window_id, label, codes) VALUES (?, ?, ?)",
                   [(i, i % 2, codes_of(1, i).tobytes()) for i in range(4)])
    db.commit()
    db.close()
    store = AgentStore(tmp_path / "agent.db")
    codes, labels, newest = store.embeddings(DIM, np.float32)
    assert np.array_equal(codes, codes_of(4, 0)) and labels.tolist() == [0, 1, 0, 1] and newest == 4
    assert store.embedding_version() == (4, 4)
    store.add_file_embeddings("aa", "a.npz", np.zeros(1, np.int64), codes_of(1, 4), cap=10,
                              copies=copies_of(1, 2, 100))
    assert store.embedding_rows(DIM, np.float32).original.tolist() == [-1, -1, -1, -1, -1, 4, 4]
    store.close()
    AgentStore(tmp_path / "agent.db").close()  # opened again: the column and its index are there already
