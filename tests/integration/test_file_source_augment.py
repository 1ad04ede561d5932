"""`[data] augment_copies` and `[data] per_user_standardization` on an agent fed by files: real watch windows written
as the application writes them, the real backbone, the real agent store.

Each file's labelled windows get their copies at arrival, embedded and stored beside them in the file's one
transaction (a kill between the two stores neither); copies are no windows (min_windows and max_windows count
windows) and train only while their window trains: never a test window, nor a copy of one. Per-user statistics come
from the stored training windows, copies left out. With the options off the data is what it always was
(tests/integration/test_file_source.py, unchanged).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent.bridge_source import EmbeddingCodes
from edge_agent.agent.data_options import data_options
from edge_agent.agent.file_source import FileSource, split_in_arrival_order
from edge_agent.agent.sources import open_source
from edge_agent.agent.store import AgentStore
from edge_agent.backbone import FrozenBackbone
from edge_agent.config import AgentConfig, DataConfig
from edge_agent.data.device_client import OFF, DataOptions
from edge_agent.data.embedded_copies import embedded_copies
from edge_agent.data.userdata import DatasetCard
from edge_agent.faults import ENV as CRASH_ENV
from edge_agent.fsutil import file_sha256
from edge_agent.learning.features import fit_user_standardizer
from edge_agent.learning.strategies import ClientData
from tests.conftest import MODEL, ROOT
from tests.integration.test_file_source import drop, picked, write_card

COPIES, SEED, DEVICE = 3, 7, 2
FIELDS = ("x_train", "y_train", "x_test", "y_test")


@pytest.fixture(scope="module")
def subject_windows(windows: Any) -> tuple[np.ndarray, np.ndarray]:
    train, _ = windows
    keep = train.subject == 4
    return train.x[keep], train.y[keep]


def options(card: DatasetCard, copies: int = COPIES, per_user: bool = False) -> DataOptions:
    return data_options(DataConfig(seed=SEED, augment_copies=copies, per_user_standardization=per_user), DEVICE,
                        windows=True, population=True, channel_names=card.channel_names, what="the test's card")


def differences(got: ClientData, want: ClientData) -> list[str]:
    return [f for f in FIELDS if getattr(got, f).dtype != getattr(want, f).dtype
            or not np.array_equal(getattr(got, f), getattr(want, f))]


class Twins:
    """The same files dropped for an augmenting source and for one without: each takes its own copy in."""

    def __init__(self, tmp_path: Path, dataset: Any, backbone: FrozenBackbone, opts: DataOptions, **kw: Any) -> None:
        self.dirs = [tmp_path / "with", tmp_path / "without"]
        self.card = write_card(self.dirs[0], dataset)
        write_card(self.dirs[1], dataset)
        self.stores = [AgentStore(tmp_path / "with.db"), AgentStore(tmp_path / "without.db")]
        self.sources = [FileSource(self.dirs[0], self.card, self.stores[0], backbone, options=opts, **kw),
                        FileSource(self.dirs[1], self.card, self.stores[1], backbone, **kw)]
        self.files: list[tuple[np.ndarray, np.ndarray, str]] = []  # (x, y, sha256) in arrival order

    def drop(self, name: str, at: int, x: np.ndarray, y: np.ndarray) -> None:
        for directory in self.dirs:
            path = drop(directory, name, at, x=x, y=y)
        self.files.append((x, y, file_sha256(path)))

    def data(self) -> tuple[ClientData | None, ClientData | None]:
        return self.sources[0].client_data(), self.sources[1].client_data()

    def close(self) -> None:
        for store in self.stores:
            store.close()


def expected_copies(files: list[tuple[np.ndarray, np.ndarray, str]], opts: DataOptions, backbone: FrozenBackbone,
                    train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training copies the agent must hold: each file's copies made from its content's own stream, stored as
    codes, standardized with the sidecar's statistics; only those of the windows that train (`train`: a mask over
    every window in arrival order)."""
    codes, standardize = EmbeddingCodes(backbone), backbone.embedding_standardizer()
    assert opts.augment is not None and standardize is not None
    features, labels, window = [], [], []
    offset = 0
    for x, y, digest in files:
        emb, y_aug = embedded_copies(x, y, opts.augment, opts.rng(int(digest[:16], 16)), opts.channel_groups,
                                     backbone.embed)
        features.append(standardize(codes.decode(codes.encode(emb))))
        labels.append(y_aug)
        window.append(offset + np.repeat(np.arange(len(y)), opts.augment.copies))
        offset += len(y)
    keep = train[np.concatenate(window)]
    return np.concatenate(features)[keep], np.concatenate(labels)[keep]


def test_copies_train_with_their_window_never_test_and_count_as_no_window(
        tmp_path: Path, dataset: Any, backbone: FrozenBackbone, subject_windows: tuple[np.ndarray, np.ndarray],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl.agent.files")
    x, y = subject_windows
    probe = write_card(tmp_path / "probe", dataset)
    opts = options(probe)
    twins = Twins(tmp_path, dataset, backbone, opts, min_windows=30)
    try:
        twins.drop("first", 0, *picked(x, y, 2, 0))  # 14 windows: 56 rows stored, still too few windows to train
        assert twins.data() == (None, None)
        assert twins.stores[0].embedding_version()[0] == 14 == twins.stores[0].window_count()
        assert twins.stores[0].embedding_rows(backbone.embedding_dim, np.int8).labels.size == 14 * (1 + COPIES)
        assert f"stored 14 labelled window(s) and {14 * COPIES} augmented copies from first.npz" in caplog.text
        for i, offset in enumerate((2, 4), start=1):
            twins.drop(f"more-{i}", i, *picked(x, y, 2, offset))
        for more in range(2):  # a later file moves the split: windows that tested train now, with their copies
            got, off = twins.data()
            assert got is not None and off is not None
            n = off.y_train.size
            assert np.array_equal(got.x_test, off.x_test) and np.array_equal(got.y_test, off.y_test)
            assert np.array_equal(got.x_train[:n], off.x_train) and np.array_equal(got.y_train[:n], off.y_train)
            assert got.y_train.size == (1 + COPIES) * n  # copies of the training windows, and of no test window
            ys = np.concatenate([f[1] for f in twins.files])
            want_x, want_y = expected_copies(twins.files, opts, backbone, split_in_arrival_order(ys, 0.3))
            assert np.array_equal(got.x_train[n:], want_x) and np.array_equal(got.y_train[n:], want_y)
            assert np.array_equal(want_y, np.repeat(off.y_train, COPIES))
            if not more:
                twins.drop("late", 3, *picked(x, y, 2, 6))
    finally:
        twins.close()


def test_max_windows_keeps_windows_and_their_copies_go_with_them(
        tmp_path: Path, dataset: Any, backbone: FrozenBackbone, subject_windows: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = subject_windows
    probe = write_card(tmp_path / "probe", dataset)
    twins = Twins(tmp_path, dataset, backbone, options(probe), min_windows=14, max_windows=20)
    try:
        for i in range(3):
            twins.drop(f"f{i}", i, *picked(x, y, 2, 2 * i))
        got, off = twins.data()
        assert got is not None and off is not None
        store = twins.stores[0]
        rows = store.embedding_rows(backbone.embedding_dim, np.int8)
        assert store.embedding_version()[0] == 20 and rows.labels.size == 20 * (1 + COPIES)
        assert not (rows.original == -2).any()  # no copy outlived its window (-2: a copy whose window is gone)
        n = off.y_train.size
        assert off.y_train.size + off.y_test.size == 20 and got.y_train.size == (1 + COPIES) * n
        assert np.array_equal(got.x_train[:n], off.x_train) and np.array_equal(got.x_test, off.x_test)
    finally:
        twins.close()


def test_switching_augmentation_off_drops_the_stored_copies(
        tmp_path: Path, dataset: Any, backbone: FrozenBackbone, subject_windows: tuple[np.ndarray, np.ndarray],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_fl.agent.files")
    x, y = subject_windows
    probe = write_card(tmp_path / "probe", dataset)
    twins = Twins(tmp_path, dataset, backbone, options(probe), min_windows=14)
    try:
        twins.drop("f0", 0, *picked(x, y, 3, 0))
        _, off = twins.data()
        reopened = FileSource(twins.dirs[0], twins.card, twins.stores[0], backbone, min_windows=14, options=OFF)
        assert f"the {21 * COPIES} stored augmented copies were dropped" in caplog.text
        got = reopened.client_data()
        assert got is not None and off is not None and differences(got, off) == []
    finally:
        twins.close()


CRASHING_AGENT = """
import sys
from edge_agent.agent.data_options import data_options
from edge_agent.agent.file_source import FileSource, read_card
from edge_agent.agent.store import AgentStore
from edge_agent.backbone import FrozenBackbone
from edge_agent.config import DataConfig
drop_dir, db, model = sys.argv[1:]
card = read_card(drop_dir)
opts = data_options(DataConfig(seed=7, augment_copies=3), 2, windows=True, population=True,
                    channel_names=card.channel_names, what="x")
FileSource(drop_dir, card, AgentStore(db), FrozenBackbone(model), min_windows=1, options=opts).client_data()
print("not killed")
"""


def test_a_kill_between_a_files_windows_and_its_copies_stores_neither_and_the_restart_stores_both_once(
        tmp_path: Path, dataset: Any, backbone: FrozenBackbone, subject_windows: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = subject_windows
    probe = write_card(tmp_path / "probe", dataset)
    twins = Twins(tmp_path, dataset, backbone, options(probe), min_windows=1)
    crashed_dir = tmp_path / "crashed"
    write_card(crashed_dir, dataset)
    try:
        part = picked(x, y, 2, 0)
        twins.drop("f0", 0, *part)
        drop(crashed_dir, "f0", 0, *part)
        # A real agent process, killed (SIGKILL) inside the file's transaction: its windows written, its copies not.
        out = subprocess.run([sys.executable, "-c", CRASHING_AGENT, str(crashed_dir), str(tmp_path / "crashed.db"),
                              str(MODEL)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, CRASH_ENV: "agent.between_file_windows_and_copies@1"})
        assert out.returncode == -9, out.stderr[-2000:]
        assert "not killed" not in out.stdout and (crashed_dir / "f0.npz").exists()
        store = AgentStore(tmp_path / "crashed.db")
        digest = twins.files[0][2]
        assert store.embedding_version() == (0, 0) and store.stored_file(digest) is None  # neither
        # The restarted agent takes the file again, whole: its windows and copies once, as if it had never crashed.
        restarted = FileSource(crashed_dir, twins.card, store, backbone, min_windows=1, options=options(probe))
        got, (uncrashed, _) = restarted.client_data(), twins.data()
        assert got is not None and uncrashed is not None and differences(got, uncrashed) == []
        assert store.embedding_version()[0] == 14 and store.stored_file(digest) == "f0.npz"
        assert store.embedding_rows(backbone.embedding_dim, np.int8).labels.size == 14 * (1 + COPIES)
        assert [p.name for p in (crashed_dir / "processed").iterdir()] == ["f0.npz"]
        store.close()
    finally:
        twins.close()


def test_per_user_statistics_come_from_the_stored_training_windows_not_the_copies(
        tmp_path: Path, dataset: Any, backbone: FrozenBackbone, subject_windows: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = subject_windows
    probe = write_card(tmp_path / "probe", dataset)
    twins = Twins(tmp_path, dataset, backbone, options(probe, per_user=True), min_windows=14)
    alone = tmp_path / "per-user-only"
    write_card(alone, dataset)
    alone_store = AgentStore(tmp_path / "alone.db")
    per_user_only = FileSource(alone, twins.card, alone_store, backbone, min_windows=14,
                               options=options(probe, copies=0, per_user=True))
    try:
        for i in range(2):
            part = picked(x, y, 3, 3 * i)
            twins.drop(f"f{i}", i, *part)
            drop(alone, f"f{i}", i, *part)
        got, off = twins.data()
        plain = per_user_only.client_data()
        assert got is not None and off is not None and plain is not None
        codes, sidecar = EmbeddingCodes(backbone), backbone.embedding_standardizer()
        assert sidecar is not None
        stored, labels, _ = twins.stores[1].embeddings(codes.dim, codes.dtype)
        train = split_in_arrival_order(labels, 0.3)
        own = fit_user_standardizer(codes.decode(stored[train]), sidecar)  # labels only pick the split
        assert np.array_equal(got.x_test, own(codes.decode(stored[~train])))
        assert np.array_equal(got.x_train[:off.y_train.size], own(codes.decode(stored[train])))
        # With or without the copies: the same statistics.
        assert np.array_equal(got.x_test, plain.x_test) and np.array_equal(got.x_train[:off.y_train.size],
                                                                           plain.x_train)
        used = twins.sources[0].stored.standardizer
        assert used is not None and np.array_equal(used.mean, own.mean) and np.array_equal(used.std, own.std)
    finally:
        alone_store.close()
        twins.close()


def test_a_features_card_refuses_augmentation_and_per_user_statistics_when_set(tmp_path: Path) -> None:
    import json

    from edge_agent.data.userdata import Roles

    card = DatasetCard(name="app", description="d", license="unknown", kind="features", class_names=("a", "b"),
                       feature_dim=8, roles=Roles(federate=("me",)))
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "dataset.json").write_text(json.dumps(card.to_json()))
    store = AgentStore(tmp_path / "agent.db")
    try:
        for key, message in (("augment_copies", "[data] augment_copies = 2: the features card of"),
                             ("per_user_standardization", "[data] per_user_standardization = true: the features card")):
            value: Any = 2 if key == "augment_copies" else True
            cfg = AgentConfig(device_id="d", state_dir=str(tmp_path),
                              data=DataConfig(source="files", dir=str(tmp_path / "drop"), **{key: value}))
            with pytest.raises(ValueError) as refused:
                open_source(cfg, store)
            assert str(refused.value).startswith(message) and "leave it out" in str(refused.value)
        # Unset, whatever the defaults: the card's features are used as they are.
        cfg = AgentConfig(device_id="d", state_dir=str(tmp_path), data=DataConfig(source="files",
                                                                                  dir=str(tmp_path / "drop")))
        assert isinstance(open_source(cfg, store), FileSource)
    finally:
        store.close()


def test_the_agents_config_reaches_the_source(tmp_path: Path, dataset: Any) -> None:
    card = write_card(tmp_path / "drop", dataset)
    store = AgentStore(tmp_path / "agent.db")
    try:
        cfg = AgentConfig(device_id="d", state_dir=str(tmp_path), rng_stream=DEVICE,
                          data=DataConfig(source="files", dir=str(tmp_path / "drop"), seed=SEED, augment_copies=2,
                                          per_user_standardization=True))
        source = open_source(cfg, store)
        assert isinstance(source, FileSource)
        assert source.options == options(card, copies=2, per_user=True) and source.stored.per_user_standardization
        assert source.options.channel_groups == ((0, 1, 2), (3, 4, 5))  # ax, ay, az and wx, wy, wz: rotated alike
    finally:
        store.close()
