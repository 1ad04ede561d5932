"""`[data] per_user_standardization` on an agent whose data comes from an MCU: the statistics are this user's,
refitted from the stored training windows as they arrive, and the head pushed to the MCU carries the very
statistics the agent trained it behind (the MCU standardizes its own embeddings with them), not the sidecar's.
Real windows of the bundled recordings, the real backbone and store, the real head blob."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.agent.bridge_source import BridgeSource, split_in_arrival_order
from edge_agent.agent.store import AgentStore
from edge_agent.backbone import FrozenBackbone
from edge_agent.learning.features import fit_user_standardizer
from edge_agent.learning.head import HeadConfig, init_params, logits
from firmware_bridge.head_blob import decode_head


def keep(source: BridgeSource, store: AgentStore, x: np.ndarray, y: np.ndarray, first_id: int) -> None:
    """Windows as the collector keeps them: embedded one at a time, stored as the backbone's codes."""
    for i in range(len(y)):
        codes = source.codes.encode(source.backbone.embed(x[i: i + 1]))[0]
        store.add_embedding(first_id + i, int(y[i]), codes, cap=source.max_windows)


def test_the_pushed_head_carries_the_statistics_the_agent_trained_with(backbone: FrozenBackbone,
                                                                       tmp_path: Path) -> None:
    from firmware_bridge.emulator.stream import subject_windows

    x, y = subject_windows(5)
    y = y.astype(np.int64)
    store = AgentStore(tmp_path / "agent.db")
    source = BridgeSource([], store, backbone, min_windows=20, per_user_standardization=True)
    sidecar = backbone.embedding_standardizer()
    assert sidecar is not None
    params = init_params(HeadConfig(backbone.embedding_dim, 7), np.random.default_rng(0))
    try:
        blobs = []
        for lo, hi in ((0, 60), (60, 160)):  # windows keep arriving between rounds
            keep(source, store, x[lo:hi], y[lo:hi], lo)
            data = source.client_data()
            assert data is not None
            codes, labels, _ = store.embeddings(source.codes.dim, source.codes.dtype)
            embeddings = source.codes.decode(codes)
            train = split_in_arrival_order(labels, 0.3)
            own = fit_user_standardizer(embeddings[train], sidecar)  # the stored training windows, labels unread
            assert np.array_equal(data.x_test, own(embeddings[~train]))
            blob = decode_head(source.head_blob(params))
            assert np.array_equal(blob.mean, own.mean) and np.array_equal(blob.std, own.std)
            assert not np.allclose(blob.mean, sidecar.mean)
            # The MCU, standardizing its raw embeddings with what it was sent, predicts what the agent's head does on
            # the agent's training data (up to the int8 rounding of the head).
            agree = blob.predict(embeddings[~train])[0] == np.argmax(logits(params, data.x_test), axis=1)
            assert agree.mean() > 0.95, agree.mean()
            blobs.append(blob)
        assert not np.array_equal(blobs[0].mean, blobs[1].mean)  # refitted as the user's windows arrived
    finally:
        source.close()
        store.close()


def test_without_per_user_statistics_the_pushed_head_carries_the_sidecars(backbone: FrozenBackbone,
                                                                          tmp_path: Path) -> None:
    from firmware_bridge.emulator.stream import subject_windows

    x, y = subject_windows(5)
    store = AgentStore(tmp_path / "agent.db")
    source = BridgeSource([], store, backbone, min_windows=20)
    sidecar = backbone.embedding_standardizer()
    assert sidecar is not None
    try:
        keep(source, store, x[:40], y[:40].astype(np.int64), 0)
        assert source.client_data() is not None
        blob = decode_head(source.head_blob(init_params(HeadConfig(backbone.embedding_dim, 7),
                                                        np.random.default_rng(0))))
        assert np.array_equal(blob.mean, sidecar.mean) and np.array_equal(blob.std, sidecar.std)
    finally:
        source.close()
        store.close()
