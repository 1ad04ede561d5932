"""The agent store's ledger of the files whose windows it keeps (AgentStore.add_file_embeddings, stored_file):
a file's windows and its SHA-256 are stored together or not at all, and a file is remembered exactly as long as
one of its windows is kept, however the windows go (the cap, a window from the MCU, another embedding space)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent.store import AgentStore

DIM = 4


def codes_of(n: int, start: int) -> np.ndarray:
    """n distinct float32 code rows, numbered from `start`."""
    return np.arange(start * DIM, (start + n) * DIM, dtype=np.float32).reshape(n, DIM)


def labels_of(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % 3


def remembered(store: AgentStore, *digests: str) -> list[str | None]:
    return [store.stored_file(d) for d in digests]


def test_a_file_is_stored_with_its_windows_in_order_and_remembered_by_content(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    assert store.stored_file("aa") is None
    store.add_file_embeddings("aa", "first.npz", labels_of(3), codes_of(3, 0), cap=10)
    store.add_file_embeddings("bb", "second.npz", labels_of(2), codes_of(2, 3), cap=10)
    codes, labels, newest = store.embeddings(DIM, np.float32)
    assert np.array_equal(codes, codes_of(5, 0))
    assert labels.tolist() == [0, 1, 2, 0, 1]
    # window id: the window's place in its file
    assert [r[0] for r in store.db.execute("SELECT window_id FROM embeddings ORDER BY seq")] == [0, 1, 2, 0, 1]
    assert remembered(store, "aa", "bb", "cc") == ["first.npz", "second.npz", None]
    assert newest == store.embedding_version()[1]
    store.close()


def test_the_same_content_twice_stores_nothing_the_second_time(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    store.add_file_embeddings("aa", "a.npz", labels_of(3), codes_of(3, 0), cap=10)
    before = store.embedding_version()
    with pytest.raises(sqlite3.IntegrityError):  # the ledger refuses it: the windows' insert is rolled back too
        store.add_file_embeddings("aa", "a-again.npz", labels_of(3), codes_of(3, 3), cap=10)
    assert store.embedding_version()[0] == before[0] == 3
    assert np.array_equal(store.embeddings(DIM, np.float32)[0], codes_of(3, 0))
    assert store.stored_file("aa") == "a.npz"
    store.close()


def test_a_file_is_forgotten_once_none_of_its_windows_is_kept(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    store.add_file_embeddings("aa", "a.npz", labels_of(3), codes_of(3, 0), cap=6)
    store.add_file_embeddings("bb", "b.npz", labels_of(3), codes_of(3, 3), cap=6)
    store.add_file_embeddings("cc", "c.npz", labels_of(2), codes_of(2, 6), cap=6)  # a's first two windows go
    assert store.embedding_version()[0] == 6
    assert remembered(store, "aa", "bb", "cc") == ["a.npz", "b.npz", "c.npz"]  # a's last window is kept
    store.add_embedding(99, 1, codes_of(1, 8)[0], cap=6)  # a window from the MCU pushes a's last one out
    assert remembered(store, "aa", "bb", "cc") == [None, "b.npz", "c.npz"]
    store.keep_newest_embeddings(3)  # a lowered cap: b's windows all go
    assert remembered(store, "aa", "bb", "cc") == [None, None, "c.npz"]
    store.close()


def test_another_embedding_space_forgets_every_file(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    assert store.use_embedding_space("features-4") == 0
    store.add_file_embeddings("aa", "a.npz", labels_of(3), codes_of(3, 0), cap=10)
    assert store.use_embedding_space("features-4") == 0 and store.stored_file("aa") == "a.npz"  # the same space
    assert store.use_embedding_space("features-8") == 3
    assert store.stored_file("aa") is None  # its windows are gone: the same content again is new data
    store.close()


def test_labels_and_codes_of_different_lengths_are_refused(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    with pytest.raises(ValueError, match=r"odd\.npz: 3 rows of codes but 2 labels"):
        store.add_file_embeddings("aa", "odd.npz", labels_of(2), codes_of(3, 0), cap=10)
    with pytest.raises(ValueError, match="cap must be at least 1"):
        store.add_file_embeddings("aa", "a.npz", labels_of(3), codes_of(3, 0), cap=0)
    assert store.embedding_version()[0] == 0 and store.stored_file("aa") is None
    store.close()
