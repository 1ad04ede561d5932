"""A device's data stays bounded over its life: every window the MCU sends is embedded exactly once, as it
arrives, by the real backbone; only its int8 codes are kept, at most `max_windows` of them (the oldest
go first); and the training data built from the codes equals what embedding the same windows again
gives (the agent's results do not change)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent.bridge_source import BridgeSource
from edge_agent.agent.store import AgentStore
from edge_agent.backbone import FrozenBackbone
from edge_agent.learning.strategies import ClientData
from tests.conftest import MODEL


class CountingInterpreter:
    """The backbone's real interpreter, with its `invoke()` calls and the windows each one ran counted."""

    def __init__(self, interp: Any, input_index: int) -> None:
        self._interp, self._input_index = interp, input_index
        self.invocations = 0
        self.windows = 0

    def invoke(self) -> None:
        self.invocations += 1
        self.windows += int(self._interp.get_tensor(self._input_index).shape[0])
        self._interp.invoke()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._interp, name)


def counting_backbone() -> tuple[FrozenBackbone, CountingInterpreter]:
    backbone = FrozenBackbone(MODEL)
    counter = CountingInterpreter(backbone._interp, backbone._input["index"])
    backbone._interp = counter
    return backbone, counter


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Bounded poll of a condition the collector thread changes (it exposes no event per stored window)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def reference_data(backbone: FrozenBackbone, windows: np.ndarray, labels: np.ndarray,
                   test_fraction: float = 0.3) -> ClientData:
    """What the agent computed before it kept embeddings: every window embedded again (in batches of 64),
    standardized, and split per label in arrival order."""
    standardizer = backbone.embedding_standardizer()
    assert standardizer is not None
    emb = standardizer(backbone.embed(windows))
    train = np.zeros(labels.size, bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        train[idx[: max(1, round(idx.size * (1.0 - test_fraction)))]] = True
    return ClientData(emb[train], labels[train], emb[~train], labels[~train])


def assert_same(got: ClientData, want: ClientData) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{name} differs"


def test_mcu_windows_are_embedded_once_on_arrival_and_only_the_newest_max_windows_are_kept(tmp_path: Path) -> None:
    from firmware_bridge.emulator import EmulatedMcu
    from firmware_bridge.messages import SensorWindow, window_to_int16

    cap, target = 60, 200  # more than three caps' worth of windows through the real serial link
    backbone, counter = counting_backbone()
    emu = EmulatedMcu.on_pty(subject=6, speedup=100)  # 200 windows/s
    store = AgentStore(tmp_path / "agent.db")
    source = BridgeSource([emu.port_url], store, backbone, min_windows=20, max_windows=cap)
    try:
        built: list[ClientData] = []
        newest = lambda: store.embedding_version()[1]  # noqa: E731
        while newest() < target:  # the agent asks for its data while windows keep arriving, as rounds do
            wait_until(lambda: newest() > (len(built) + 1) * 20, 30.0, "more windows from the MCU")
            data = source.client_data()
            assert data is not None
            built.append(data)
            assert data.y_train.size + data.y_test.size <= cap
    finally:
        source.close()  # the collector has stopped: the counts below are final
        emu.stop()
    count, last = store.embedding_version()
    assert count == cap and last >= target
    # Each stored window went through the interpreter once, alone (batch 1): asking for the data again and
    # again embedded nothing.
    assert counter.windows == counter.invocations == last
    data = source.client_data()
    assert data is not None and counter.invocations == last
    assert data.y_train.size + data.y_test.size == cap

    db = sqlite3.connect(tmp_path / "agent.db")
    try:
        kept_ids = [r[0] for r in db.execute("SELECT window_id FROM embeddings ORDER BY seq")]
        assert db.execute("SELECT COUNT(*) FROM windows").fetchone()[0] == 0  # no raw window on disk
        (blob,) = db.execute("SELECT codes FROM embeddings LIMIT 1").fetchone()
        assert len(blob) == backbone.embedding_dim  # int8 codes: one byte per embedding unit
    finally:
        db.close()
    # The newest windows are the ones kept, in arrival order: the MCU numbers its windows 0, 1, 2, ..., so the
    # k-th stored window has an id of at least k - 1 (more if the link dropped one), and the kept are the last cap.
    assert len(kept_ids) == cap and all(a < b for a, b in zip(kept_ids, kept_ids[1:]))
    assert kept_ids[0] >= last - cap
    # The same windows embedded again, all at once, give the very same training and test data.
    windows = np.stack([SensorWindow(i, window_to_int16(emu.windows_x[emu.sent[i][0]], emu.scale), emu.scale,
                                     emu.sent[i][1]).to_float() for i in kept_ids])
    labels = np.asarray([emu.sent[i][1] for i in kept_ids], np.int64)
    assert_same(data, reference_data(backbone, windows, labels))
    store.close()


def test_raw_windows_stored_by_an_earlier_version_are_embedded_once_then_dropped(backbone: FrozenBackbone,
                                                                                 tmp_path: Path) -> None:
    from firmware_bridge.emulator.stream import subject_windows

    x, y = subject_windows(4)
    x, y = x[:120], y[:120].astype(np.int64)
    store = AgentStore(tmp_path / "agent.db")
    for i in range(len(y)):  # what edge-fl kept before it kept embeddings
        store.add_window(i, int(y[i]), x[i])
    counting, counter = counting_backbone()
    source = BridgeSource([], store, counting, min_windows=10, max_windows=100)
    try:
        assert store.window_count() == 120  # nothing embedded before the data is asked for
        data = source.client_data()
        assert data is not None and counter.windows == 120
        assert store.window_count() == 100 and store.pending_windows(1) == []  # the cap holds, raw windows gone
        assert source.client_data() is data and counter.windows == 120
        assert_same(data, reference_data(backbone, x[20:], y[20:]))
    finally:
        source.close()
        store.close()


def test_embeddings_of_another_backbone_are_dropped_and_a_lowered_cap_holds_at_start(backbone: FrozenBackbone,
                                                                                      tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    try:
        codes = np.zeros(backbone.embedding_dim, np.int8)
        store.use_embedding_space("another model")
        for i in range(30):
            store.add_embedding(i, i % 7, codes, cap=100)
        BridgeSource([], store, backbone, min_windows=5).close()
        assert store.embedding_version() == (0, 0)  # gone: the raw windows are not kept to recompute them
        for i in range(30, 60):
            store.add_embedding(i, i % 7, codes, cap=100)
        BridgeSource([], store, backbone, min_windows=5, max_windows=10).close()
        assert store.embedding_version() == (10, 60)
        with pytest.raises(ValueError, match="max_windows"):
            BridgeSource([], store, backbone, min_windows=20, max_windows=10)
    finally:
        store.close()
