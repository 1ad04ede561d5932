"""An agent fed by the files a device application writes (`[data] source = "files"`): real watch windows written
by the test as the application would (`<name>.npz.tmp`, then a rename), the real backbone, the real agent store.

Files are taken in arrival order, each window embedded once and kept as the backbone's codes; a half-written file
is never read; a file that breaks the format is moved to rejected/ with its reason and the agent goes on; a file
stored just before the agent was killed (SIGKILL, before the file was moved away) is not counted again after the
restart; and a real agent in an in-process fleet trains a round on windows that arrived as files.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent.bridge_source import EmbeddingCodes
from edge_agent.agent.file_source import FileSource, split_in_arrival_order
from edge_agent.agent.store import AgentStore
from edge_agent.backbone import FrozenBackbone
from edge_agent.config import DataConfig
from edge_agent.data.federated import FederatedData
from edge_agent.data.partition import PartitionConfig
from edge_agent.data.userdata import DatasetCard, Roles
from edge_agent.faults import ENV as CRASH_ENV
from tests.conftest import MODEL, ROOT
from tests.integration.test_services_inprocess import InProcessFleet

LOGGER = "edge_fl.agent.files"
T0 = 1_700_000_000 * 10**9  # modification times the test gives its files (ns), one second apart


@pytest.fixture(scope="module")
def subject_windows(windows: Any) -> tuple[np.ndarray, np.ndarray]:
    """Subject 4's real training windows (100 samples x 6 channels at 50 Hz) and labels, in time order."""
    train, _ = windows
    keep = train.subject == 4
    return train.x[keep], train.y[keep]


def write_card(directory: Path, dataset: Any) -> DatasetCard:
    """What the application installs once: the card of its windows (the watch's own layout)."""
    card = DatasetCard(name="wrist-app", description="labelled 2 s windows of the watch", license="CC-BY-4.0",
                       kind="windows", class_names=dataset.class_names, sample_rate_hz=50.0,
                       channel_names=dataset.channel_names, window_length=100, window_stride=25,
                       roles=Roles(federate=("this-device",)))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dataset.json").write_text(json.dumps(card.to_json()), encoding="utf-8")
    return card


def npz_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


def drop(directory: Path, name: str, at: int, x: np.ndarray, y: np.ndarray) -> Path:
    """The application's protocol: write <name>.npz.tmp whole, then rename it to <name>.npz. `at`: its
    modification time in seconds after T0 (when the application finished writing it)."""
    tmp = directory / f"{name}.npz.tmp"
    tmp.write_bytes(npz_bytes(x, y))
    os.utime(tmp, ns=(T0 + at * 10**9, T0 + at * 10**9))
    os.rename(tmp, directory / f"{name}.npz")
    return directory / f"{name}.npz"


def picked(x: np.ndarray, y: np.ndarray, per_label: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`per_label` windows of every label, from the `offset`-th of each on, in time order."""
    idx = np.sort(np.concatenate([np.flatnonzero(y == label)[offset: offset + per_label] for label in np.unique(y)]))
    return x[idx], y[idx].astype(np.int64)


def stored_labels(store: AgentStore, backbone: FrozenBackbone) -> np.ndarray:
    codes = EmbeddingCodes(backbone)
    return store.embeddings(codes.dim, codes.dtype)[1]


def test_files_are_taken_in_arrival_order_embedded_once_and_the_data_grows(
        tmp_path: Path, dataset: Any, backbone: FrozenBackbone, subject_windows: tuple[np.ndarray, np.ndarray],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    x, y = subject_windows
    drop_dir = tmp_path / "edge-fl-data"
    card = write_card(drop_dir, dataset)
    store = AgentStore(tmp_path / "agent.db")
    source = FileSource(drop_dir, card, store, backbone, min_windows=30)
    assert source.client_data() is None  # nothing yet

    # Three files, named against their arrival order; the first alone is too little to train on.
    parts = [picked(x, y, 2, offset) for offset in (0, 2, 4)]  # 2 windows of each of the 7 labels per file
    drop(drop_dir, "zz-first", 0, x=parts[0][0], y=parts[0][1])
    assert source.client_data() is None and store.embedding_version()[0] == 14
    drop(drop_dir, "mm-third", 2, x=parts[2][0], y=parts[2][1])
    drop(drop_dir, "aa-second", 1, x=parts[1][0], y=parts[1][1])
    # ...and one the application is still writing: half of its bytes, under the temporary name.
    late_x, late_y = picked(x, y, 2, 6)
    whole = npz_bytes(x=late_x, y=late_y)
    (drop_dir / "late.npz.tmp").write_bytes(whole[: len(whole) // 2])

    data = source.client_data()
    assert data is not None
    order = [parts[0], parts[1], parts[2]]  # arrival order, not name order
    xs, ys = np.concatenate([p[0] for p in order]), np.concatenate([p[1] for p in order])
    assert np.array_equal(stored_labels(store, backbone), ys)
    # Each window embedded once, on arrival, and kept as the backbone's int8 codes: the training and test data
    # are those codes, standardized with the sidecar's statistics, split per label in arrival order.
    codes = EmbeddingCodes(backbone)
    stored, _, _ = store.embeddings(codes.dim, codes.dtype)
    assert stored.dtype == np.int8 and np.array_equal(stored, codes.encode(backbone.embed(xs)))
    standardize = backbone.embedding_standardizer()
    assert standardize is not None
    features = standardize(codes.decode(stored))
    train = split_in_arrival_order(ys, 0.3)
    assert np.array_equal(data.x_train, features[train]) and np.array_equal(data.y_train, ys[train])
    assert np.array_equal(data.x_test, features[~train]) and np.array_equal(data.y_test, ys[~train])
    assert data.y_test.size > 0 and set(np.unique(data.y_train)) == set(np.unique(ys))

    # Stored files left the directory; the half-written one was not touched.
    assert sorted(p.name for p in (drop_dir / "processed").iterdir()) == ["aa-second.npz", "mm-third.npz",
                                                                          "zz-first.npz"]
    assert sorted(p.name for p in drop_dir.iterdir()) == ["dataset.json", "late.npz.tmp", "processed"]
    assert (drop_dir / "late.npz.tmp").read_bytes() == whole[: len(whole) // 2]
    assert source.client_data() is data  # asked again: nothing new, nothing embedded again

    # The application finishes the file and renames it: it comes in with the next call.
    tmp = drop_dir / "late.npz.tmp"
    tmp.write_bytes(whole)
    os.rename(tmp, drop_dir / "late.npz")
    grown = source.client_data()
    assert grown is not None and grown.y_train.size + grown.y_test.size == 4 * 14
    assert np.array_equal(stored_labels(store, backbone), np.concatenate([ys, late_y]))
    stored_msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER and "stored" in r.getMessage()]
    assert stored_msgs == [f"stored 14 labelled window(s) from {n}.npz" for n in
                           ("zz-first", "aa-second", "mm-third", "late")]
    store.close()


def test_invalid_files_are_rejected_with_their_reason_and_the_agent_keeps_going(
        tmp_path: Path, dataset: Any, backbone: FrozenBackbone, subject_windows: tuple[np.ndarray, np.ndarray],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    x, y = subject_windows
    drop_dir = tmp_path / "edge-fl-data"
    card = write_card(drop_dir, dataset)
    store = AgentStore(tmp_path / "agent.db")
    source = FileSource(drop_dir, card, store, backbone, min_windows=14)
    good_x, good_y = picked(x, y, 2)
    nan_x = good_x.copy()
    nan_x[3, 50, 2] = np.nan  # one reading of one window
    bad_y = good_y.copy()
    bad_y[5] = card.num_classes  # one label past the card's classes
    drop(drop_dir, "nan", 0, x=nan_x, y=good_y)
    drop(drop_dir, "short", 1, x=good_x[:, :50], y=good_y)  # 1 s windows, the card says 2 s
    drop(drop_dir, "label", 2, x=good_x, y=bad_y)
    # Written in place, not by the protocol, and caught half-way: an archive without its end.
    whole = npz_bytes(x=good_x, y=good_y)
    (drop_dir / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    os.utime(drop_dir / "truncated.npz", ns=(T0 + 3 * 10**9, T0 + 3 * 10**9))
    drop(drop_dir, "good", 4, x=good_x, y=good_y)

    data = source.client_data()
    assert data is not None and data.y_train.size + data.y_test.size == good_y.size  # the good file only
    assert np.array_equal(stored_labels(store, backbone), good_y)
    rejected = drop_dir / "rejected"
    assert sorted(p.name for p in rejected.iterdir()) == sorted(
        f"{n}.npz{w}" for n in ("nan", "short", "label", "truncated") for w in ("", ".why"))
    why = {n: (rejected / f"{n}.npz.why").read_text() for n in ("nan", "short", "label", "truncated")}
    assert why["nan"].startswith(f"{drop_dir / 'nan.npz'}, field 'x': 1 non-finite value(s) (nan or inf), the "
                                 "first in window 3;")
    assert why["short"].startswith(f"{drop_dir / 'short.npz'}, field 'x': shape [14, 50, 6], expected "
                                   "[n, window_length, channels] = [n, 100, 6] from dataset.json")
    assert why["label"].startswith(f"{drop_dir / 'label.npz'}, field 'y': 1 label(s) outside 0..6")
    assert why["truncated"].startswith(f"{drop_dir / 'truncated.npz'}, field '(file)': cannot be read")
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 4  # one line per rejected file, naming it and the field
    for name, field, message in zip(("nan", "short", "label", "truncated"), ("x", "x", "y", "(file)"), warnings,
                                    strict=True):
        assert message.startswith(f"rejected {name}.npz, moved to rejected/ with the reason in {name}.npz.why: ")
        assert f"field '{field}'" in message
    assert sorted(p.name for p in (drop_dir / "processed").iterdir()) == ["good.npz"]
    store.close()


CRASHING_AGENT = """
import sys
from edge_agent.agent.file_source import FileSource, read_card
from edge_agent.agent.store import AgentStore
from edge_agent.backbone import FrozenBackbone
drop_dir, db, model = sys.argv[1:]
FileSource(drop_dir, read_card(drop_dir), AgentStore(db), FrozenBackbone(model), min_windows=1).client_data()
print("not killed")
"""


def test_a_file_stored_just_before_the_agent_was_killed_is_not_counted_again_after_the_restart(
        tmp_path: Path, dataset: Any, backbone: FrozenBackbone, subject_windows: tuple[np.ndarray, np.ndarray],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    x, y = subject_windows
    drop_dir = tmp_path / "edge-fl-data"
    card = write_card(drop_dir, dataset)
    first_x, first_y = picked(x, y, 2)
    second_x, second_y = picked(x, y, 1, 2)
    drop(drop_dir, "first", 0, x=first_x, y=first_y)
    drop(drop_dir, "second", 1, x=second_x, y=second_y)

    # A real agent process, killed (SIGKILL) right after the first file's windows were committed to its store,
    # before the file was moved away.
    out = subprocess.run([sys.executable, "-c", CRASHING_AGENT, str(drop_dir), str(tmp_path / "agent.db"),
                          str(MODEL)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, CRASH_ENV: "agent.after_file_stored@1"})
    assert out.returncode == -9, out.stderr[-2000:]
    assert "not killed" not in out.stdout
    assert (drop_dir / "first.npz").exists() and (drop_dir / "second.npz").exists()
    store = AgentStore(tmp_path / "agent.db")
    assert store.embedding_version()[0] == first_y.size  # committed before the kill

    # The restarted agent: the first file's windows are there once, the second file comes in, both move away.
    source = FileSource(drop_dir, card, store, backbone, min_windows=1)
    data = source.client_data()
    assert data is not None
    assert np.array_equal(stored_labels(store, backbone), np.concatenate([first_y, second_y]))
    assert sorted(p.name for p in (drop_dir / "processed").iterdir()) == ["first.npz", "second.npz"]
    assert any(r.getMessage().startswith("first.npz: its windows are stored already") for r in caplog.records)

    # The same content written again under another name is not counted again either.
    drop(drop_dir, "first-again", 2, x=first_x, y=first_y)
    assert source.client_data() is data
    assert store.embedding_version()[0] == first_y.size + second_y.size
    assert (drop_dir / "processed" / "first-again.npz").exists()
    store.close()


def test_an_agent_in_a_fleet_trains_a_round_on_windows_that_arrive_as_files(
        tmp_path: Path, dataset: Any, backbone: FrozenBackbone, subject_windows: tuple[np.ndarray, np.ndarray],
        caplog: pytest.LogCaptureFixture) -> None:
    """The agent opens its source from `[data] source = "files"`; the round opens before the application has
    written anything, so the agent waits, and trains from its idle loop once the files are there."""
    caplog.set_level(logging.INFO, logger="edge_fl")
    x, y = subject_windows
    drop_dir = tmp_path / "edge-fl-data"
    write_card(drop_dir, dataset)
    classes = tuple(dataset.class_names)
    # The fleet's head: the backbone's embedding size and the card's classes (no simulated clients here).
    fed = FederatedData(client_ids=(), clients=(), new_user_x=np.zeros((0, backbone.embedding_dim), np.float32),
                        new_user_y=np.zeros(0, np.int64), num_classes=len(classes),
                        embedding_dim=backbone.embedding_dim, class_names=classes, partition=PartitionConfig())
    fleet = InProcessFleet(fed, rounds=1)
    try:
        agent = fleet.add_agent("pi-files", state_dir=str(tmp_path / "state"),
                                data=DataConfig(source="files", dir=str(drop_dir), min_windows=40))
        assert isinstance(agent.source, FileSource) and not agent.source.runs_heads
        fleet.start()
        fleet.pump()  # round 1 opens; the agent has no data yet
        assert agent.waiting is not None and not agent.store.trained(1)

        for i, offset in enumerate((0, 4, 8)):
            part_x, part_y = picked(x, y, 4, offset)  # 4 windows of each label per file
            drop(drop_dir, f"batch-{i}", i, x=part_x, y=part_y)
        fleet.pump()  # the idle loop asks for the data again: the files come in and the agent trains
        assert agent.store.trained(1)
        status = fleet.statuses()[1]
        assert status["succeeded"] and status["reporting"] == 1
        assert len(fleet.uploads("pi-files")) == 1
        assert agent.store.embedding_version()[0] == 3 * 4 * len(classes)
        assert sorted(p.name for p in (drop_dir / "processed").iterdir()) == ["batch-0.npz", "batch-1.npz",
                                                                              "batch-2.npz"]
        data = agent.source.client_data()
        assert data is not None
        trained = [r.getMessage() for r in caplog.records if r.name == "edge_fl.agent"
                   and r.getMessage().startswith("round 1: trained on ")]
        assert len(trained) == 1 and trained[0].startswith(f"round 1: trained on {data.y_train.size} windows")
    finally:
        fleet.close()
