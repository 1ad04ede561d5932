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


def test_the_store_gives_back_the_windows_another_connection_stored_in_arrival_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.agent.store import AgentStore

    store, collector = AgentStore(tmp_path / "agent.db"), AgentStore(tmp_path / "agent.db")
    try:
        empty_x, empty_y = store.windows()
        assert empty_x.shape == (0, 0, 0) and empty_y.shape == (0,)
        rng = np.random.default_rng(0)
        sent = [rng.normal(size=(100, 6)).astype(np.float32) for _ in range(5)]
        for i, w in enumerate(sent):
            collector.add_window(i, i % 3, w)
        x, y = store.windows()
        assert x.dtype == np.float32 and x.shape == (5, 100, 6)
        assert np.array_equal(x, np.stack(sent)) and y.tolist() == [0, 1, 2, 0, 1]
        collector.add_window(5, 2, sent[0])  # the snapshot is over: the next read sees it
        assert store.windows()[0].shape[0] == 6 == store.window_count()
    finally:
        store.close()
        collector.close()
