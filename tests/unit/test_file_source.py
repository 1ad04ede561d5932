"""The files data source with a features card (no backbone): configuration, what is kept and for how long, and
what it refuses at start. The windows card, the real backbone and the crash are in
tests/integration/test_file_source.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent.file_source import FileSource, read_card
from edge_agent.agent.sources import open_source
from edge_agent.agent.store import AgentStore
from edge_agent.backbone import FrozenBackbone
from edge_agent.config import AgentConfig, DataConfig, check_toml
from edge_agent.data.userdata import DatasetCard, Roles, UserDataError

DIM = 8
T0 = 1_700_000_000 * 10**9


def features_card(directory: Path, classes: tuple[str, ...] = ("sit", "walk", "run")) -> DatasetCard:
    card = DatasetCard(name="app-features", description="8 numbers per window", license="unknown",
                       kind="features", class_names=classes, feature_dim=DIM, roles=Roles(federate=("me",)))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dataset.json").write_text(json.dumps(card.to_json()), encoding="utf-8")
    return card


def drop(directory: Path, name: str, at: int, x: np.ndarray, y: np.ndarray) -> None:
    tmp = directory / f"{name}.npz.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, x=x, y=y)
    os.utime(tmp, ns=(T0 + at * 10**9, T0 + at * 10**9))
    os.rename(tmp, directory / f"{name}.npz")


def rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, (n, DIM)).astype(np.float32), np.arange(n, dtype=np.int64) % 3


def stored(store: AgentStore) -> tuple[np.ndarray, np.ndarray]:
    codes, labels, _ = store.embeddings(DIM, np.float32)
    return codes, labels


def test_the_config_names_the_directory_relative_to_the_config_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source = 'files' needs dir"):
        DataConfig(source="files")
    cfg, problems, _ = check_toml('device_id = "d"\nstate_dir = "s"\n[data]\nsource = "files"\ndir = "drop"\n'
                                  "keep_files = false\nmin_windows = 3\n", AgentConfig, "agent.toml", base=tmp_path)
    assert problems == [] and cfg is not None
    assert (cfg.data.source, cfg.data.dir, cfg.data.keep_files) == ("files", str(tmp_path / "drop"), False)
    _, problems, _ = check_toml('device_id = "d"\nstate_dir = "s"\n[data]\nsource = "files"\n', AgentConfig, "a.toml")
    assert problems == ["a.toml [data]: source = 'files' needs dir: the directory the application writes its files in"]
    _, problems, _ = check_toml('device_id = "d"\nstate_dir = "s"\n[data]\nsource = "file"\n', AgentConfig, "a.toml")
    assert problems == ["a.toml [data]: source must be one of 'watch-dataset', 'serial', 'files', 'user-dataset', got 'file'"]


def test_features_are_kept_exactly_in_arrival_order_and_split_per_label_in_time(tmp_path: Path) -> None:
    drop_dir = tmp_path / "drop"
    features_card(drop_dir)
    store = AgentStore(tmp_path / "agent.db")
    source = open_source(AgentConfig(device_id="d", state_dir=str(tmp_path), data=DataConfig(
        source="files", dir=str(drop_dir), min_windows=10)), store)
    assert isinstance(source, FileSource) and source.backbone is None  # no interpreter for a features card
    (x1, y1), (x2, y2) = rows(6, 1), rows(9, 2)
    drop(drop_dir, "b", 0, x1, y1)
    drop(drop_dir, "a", 1, x2, y2)
    data = source.client_data()
    assert data is not None
    codes, labels = stored(store)
    assert np.array_equal(codes, np.concatenate([x1, x2])) and np.array_equal(labels, np.concatenate([y1, y2]))
    # per label: 5 windows each; the first round(5 * 0.7) = 4 train, the last one tests
    xs, ys = np.concatenate([x1, x2]), np.concatenate([y1, y2])
    test_rows = [np.flatnonzero(ys == label)[-1] for label in range(3)]
    train = np.ones(ys.size, bool)
    train[test_rows] = False
    assert np.array_equal(data.x_train, xs[train]) and np.array_equal(data.y_train, ys[train])
    assert np.array_equal(data.x_test, xs[~train]) and np.array_equal(data.y_test, ys[~train])
    store.close()


def test_only_the_newest_max_windows_are_kept_and_a_file_is_remembered_while_its_windows_are(tmp_path: Path) -> None:
    drop_dir = tmp_path / "drop"
    card = features_card(drop_dir)
    store = AgentStore(tmp_path / "agent.db")
    source = FileSource(drop_dir, card, store, None, min_windows=3, max_windows=10)
    parts = [rows(6, seed) for seed in range(3)]
    for i, (x, y) in enumerate(parts):
        drop(drop_dir, f"f{i}", i, x, y)
    data = source.client_data()
    assert data is not None and data.y_train.size + data.y_test.size == 10
    codes, _ = stored(store)
    assert np.array_equal(codes, np.concatenate([x for x, _ in parts])[-10:])  # the newest ten
    remembered = [r[0] for r in store.db.execute("SELECT name FROM stored_files ORDER BY last_seq")]
    assert remembered == ["f1.npz", "f2.npz"]  # none of f0's windows is kept: nothing to count twice
    # f1's content again: some of its windows are still kept, so it is not stored again...
    drop(drop_dir, "f1-again", 3, *parts[1])
    assert source.client_data() is data
    # ...f0's content again is new data to the store (its windows were dropped long ago).
    drop(drop_dir, "f0-again", 4, *parts[0])
    source.client_data()
    codes, _ = stored(store)
    assert np.array_equal(codes[-6:], parts[0][0]) and store.embedding_version()[0] == 10
    store.close()


def test_keep_files_false_deletes_stored_files_and_still_keeps_rejected_ones(tmp_path: Path) -> None:
    drop_dir = tmp_path / "drop"
    card = features_card(drop_dir)
    store = AgentStore(tmp_path / "agent.db")
    source = FileSource(drop_dir, card, store, None, keep_files=False, min_windows=1)
    x, y = rows(4, 0)
    drop(drop_dir, "good", 0, x, y)
    drop(drop_dir, "wide", 1, np.zeros((4, DIM + 1), np.float32), y)
    assert source.client_data() is not None
    assert sorted(p.name for p in drop_dir.iterdir()) == ["dataset.json", "rejected"]
    assert sorted(p.name for p in (drop_dir / "rejected").iterdir()) == ["wide.npz", "wide.npz.why"]
    assert "field 'x': shape [4, 9], expected [n, feature_dim] = [n, 8]" in (
        drop_dir / "rejected" / "wide.npz.why").read_text()
    store.close()


def test_another_class_list_drops_the_stored_windows_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    drop_dir = tmp_path / "drop"
    card = features_card(drop_dir)
    store = AgentStore(tmp_path / "agent.db")
    FileSource(drop_dir, card, store, None, min_windows=1)
    drop(drop_dir, "a", 0, *rows(5, 0))
    FileSource(drop_dir, card, store, None, min_windows=1).client_data()
    assert store.embedding_version()[0] == 5
    FileSource(drop_dir, card, store, None, min_windows=1)  # a restart with the same card keeps them
    assert store.embedding_version()[0] == 5
    caplog.set_level(logging.WARNING, logger="edge_fl.agent.files")
    other = features_card(drop_dir, ("sit", "stand", "walk", "run"))
    FileSource(drop_dir, other, store, None, min_windows=1)  # label 1 means something else now
    assert store.embedding_version()[0] == 0
    assert store.db.execute("SELECT COUNT(*) FROM stored_files").fetchone()[0] == 0
    assert any("5 stored window(s) came from another backbone, card kind or class list" in r.getMessage()
               for r in caplog.records)
    store.close()


def test_a_missing_card_and_a_card_the_backbone_cannot_take_are_refused_at_start(
        tmp_path: Path, backbone: FrozenBackbone) -> None:
    with pytest.raises(UserDataError, match="not a directory"):
        read_card(tmp_path / "nowhere")
    (tmp_path / "drop").mkdir()
    with pytest.raises(UserDataError, match=r"no dataset\.json"):
        read_card(tmp_path / "drop")
    card = DatasetCard(name="hapt-like", description="", license="unknown", kind="windows",
                       class_names=("a", "b"), sample_rate_hz=50.0, channel_names=("1", "2", "3", "4", "5", "6"),
                       window_length=128, window_stride=64, roles=Roles(federate=("me",)))
    store = AgentStore(tmp_path / "agent.db")
    with pytest.raises(ValueError, match=r"windows of shape \(128, 6\).*takes \(100, 6\)"):
        FileSource(tmp_path / "drop", card, store, backbone)
    store.close()


def test_a_directory_that_goes_away_leaves_the_stored_data_and_is_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    drop_dir = tmp_path / "drop"
    card = features_card(drop_dir)
    store = AgentStore(tmp_path / "agent.db")
    source = FileSource(drop_dir, card, store, None, min_windows=1)
    drop(drop_dir, "a", 0, *rows(5, 0))
    data = source.client_data()
    shutil.rmtree(drop_dir)
    caplog.set_level(logging.ERROR, logger="edge_fl.agent.files")
    assert source.client_data() is data and source.client_data() is data
    assert len([r for r in caplog.records if r.getMessage().startswith(f"cannot read {drop_dir}")]) == 1
    store.close()
