"""The demo agent's data source builds one subject's data from that subject's and the backbone subjects'
recordings only, and gets exactly what `edge-fl simulate` gives that client (so a demo fleet and a
simulation still agree on every user's accuracy)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.agent.sources import subject_recordings, watch_client_data
from edge_agent.data.federated import federate
from edge_agent.data.partition import BACKBONE_SUBJECTS, CLIENT_SUBJECTS, PartitionConfig

CASES = [("natural", s) for s in CLIENT_SUBJECTS] + [
    ("label-skew", 5), ("few-shot", 7), ("dirichlet", 9), ("dirichlet", 4)]


@pytest.mark.parametrize(("regime", "subject"), CASES)
def test_one_subjects_data_equals_the_simulations(dataset, backbone, embedded, regime: str, subject: int) -> None:  # type: ignore[no-untyped-def]
    partition = PartitionConfig(regime=regime, seed=3)
    fed = federate(embedded, partition)
    want = fed.clients[fed.client_ids.index(f"subject-{subject:02d}")]
    got = watch_client_data(subject_recordings(dataset, subject), backbone, subject, partition)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(want, field), getattr(got, field)
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{regime}, subject {subject}: {field} differs"
    assert got.y_train.size > 0 and got.y_test.size > 0


def test_only_the_recordings_one_client_needs_are_kept(dataset) -> None:  # type: ignore[no-untyped-def]
    kept = subject_recordings(dataset, 6)
    assert {r.subject for r in kept.recordings} == {6, *BACKBONE_SUBJECTS}
    assert len(kept.recordings) < len(dataset.recordings)
    assert kept.class_names == dataset.class_names


def test_a_subject_without_recordings_is_named(dataset, backbone) -> None:  # type: ignore[no-untyped-def]
    without = subject_recordings(dataset, 4)
    with pytest.raises(ValueError, match="subject 5"):
        watch_client_data(without, backbone, 5, PartitionConfig())


def test_a_subject_that_is_not_a_client_is_refused_before_anything_is_loaded() -> None:
    from edge_agent.agent.sources import dataset_source
    from edge_agent.config import AgentConfig, DataConfig

    cfg = AgentConfig(device_id="d", state_dir=":memory:", data=DataConfig(subject=2, dataset="/nonexistent"))
    with pytest.raises(ValueError, match="subject 2 is not a federated client"):
        dataset_source(cfg)


def test_the_store_gives_back_the_embeddings_another_connection_stored_in_arrival_order_within_the_cap(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.agent.store import AgentStore

    store, collector = AgentStore(tmp_path / "agent.db"), AgentStore(tmp_path / "agent.db")
    try:
        codes, labels, newest = store.embeddings(8, np.int8)
        assert codes.shape == (0, 8) and labels.shape == (0,) and newest == 0
        rng = np.random.default_rng(0)
        sent = [rng.integers(-128, 128, size=8).astype(np.int8) for _ in range(7)]
        for i, c in enumerate(sent[:5]):
            collector.add_embedding(i, i % 3, c, cap=5)
        codes, labels, newest = store.embeddings(8, np.int8)
        assert codes.dtype == np.int8 and np.array_equal(codes, np.stack(sent[:5]))
        assert labels.tolist() == [0, 1, 2, 0, 1] and newest == 5
        for i, c in enumerate(sent[5:], start=5):  # beyond the cap: the oldest go, in the same transaction
            collector.add_embedding(i, i % 3, c, cap=5)
        codes, labels, newest = store.embeddings(8, np.int8)
        assert np.array_equal(codes, np.stack(sent[2:])) and labels.tolist() == [2, 0, 1, 2, 0] and newest == 7
        assert store.embedding_version() == (5, 7) == (store.window_count(), 7)
        collector.add_window(7, 1, np.zeros((100, 6), np.float32))  # a raw window waits to be embedded
        assert store.window_count() == 6 and store.embedding_version() == (5, 7)
        ((_, window_id, label, x),) = store.pending_windows(10)
        assert (window_id, label, x.shape, x.dtype) == (7, 1, (100, 6), np.float32)
    finally:
        store.close()
        collector.close()
