"""The real recordings: windowing never leaks across the time split; regimes hold what they promise."""

import numpy as np
import pytest

from edge_agent.data.partition import (
    BACKBONE_SUBJECTS, CLIENT_SUBJECTS, NEW_USER_SUBJECTS, PartitionConfig, partition_clients,
)
from edge_agent.data.watch import DatasetError, load_watch_dataset
from edge_agent.data.windows import WindowConfig, split_and_window


def test_dataset_is_the_documented_one(dataset) -> None:  # type: ignore[no-untyped-def]
    assert len(dataset.recordings) == 140
    assert dataset.subjects == tuple(range(1, 11))
    assert dataset.class_names == ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")
    assert all(r.samples.shape[1] == 6 for r in dataset.recordings)


def test_subject_roles_are_disjoint_and_cover_everyone(dataset) -> None:  # type: ignore[no-untyped-def]
    roles = [set(BACKBONE_SUBJECTS), set(CLIENT_SUBJECTS), set(NEW_USER_SUBJECTS)]
    assert sum(map(len, roles)) == len(set().union(*roles)) == len(dataset.subjects)


@pytest.mark.parametrize("stride_s", [0.1, 0.5, 2.0])
def test_no_window_crosses_the_time_split(dataset, stride_s: float) -> None:  # type: ignore[no-untyped-def]
    cfg = WindowConfig(stride_s=stride_s)
    train, test = split_and_window(dataset, cfg)
    assert len(train) > len(test) > 0
    for rec in dataset.recordings:
        cut = int(round(rec.samples.shape[0] * (1 - cfg.test_fraction)))
        tr, te = train.recording == rec.index, test.recording == rec.index
        assert train.stop[tr].max() <= cut <= test.start[te].min()
    # and no train window shares a single sample with a test window of the same recording
    for r in np.unique(test.recording):
        assert train.stop[train.recording == r].max() <= test.start[test.recording == r].min()


def test_windows_hold_the_raw_samples_they_claim(dataset, windows) -> None:  # type: ignore[no-untyped-def]
    train, _ = windows
    i = len(train) // 2
    rec = dataset.recordings[train.recording[i]]
    np.testing.assert_array_equal(train.x[i], rec.samples[train.start[i]:train.stop[i]])
    assert train.y[i] == rec.label and train.subject[i] == rec.subject


def test_natural_gives_one_client_per_subject_with_all_its_windows(windows) -> None:  # type: ignore[no-untyped-def]
    train, test = windows
    splits = partition_clients(train, test, PartitionConfig("natural"))
    assert [s.subject for s in splits] == list(CLIENT_SUBJECTS)
    for s in splits:
        assert np.all(train.subject[s.train_idx] == s.subject)
        assert s.train_idx.size == np.sum(train.subject == s.subject)


def test_label_skew_keeps_a_seeded_class_subset_in_train_and_test(windows) -> None:  # type: ignore[no-untyped-def]
    train, test = windows
    a = partition_clients(train, test, PartitionConfig("label-skew", seed=1, classes_per_client=3))
    b = partition_clients(train, test, PartitionConfig("label-skew", seed=1, classes_per_client=3))
    c = partition_clients(train, test, PartitionConfig("label-skew", seed=2, classes_per_client=3))
    for s in a:
        classes = set(train.y[s.train_idx])
        assert len(classes) == 3 and set(test.y[s.test_idx]) <= classes
    assert all(np.array_equal(x.train_idx, y.train_idx) for x, y in zip(a, b))
    assert any(not np.array_equal(x.train_idx, y.train_idx) for x, y in zip(a, c))


def test_few_shot_has_k_per_class_and_the_full_test_set(windows) -> None:  # type: ignore[no-untyped-def]
    train, test = windows
    natural = partition_clients(train, test, PartitionConfig("natural"))
    few = partition_clients(train, test, PartitionConfig("few-shot", shots=5))
    for n, f in zip(natural, few):
        assert np.all(np.bincount(train.y[f.train_idx], minlength=7) == 5)
        assert np.array_equal(n.test_idx, f.test_idx)
        assert set(f.train_idx) <= set(n.train_idx)


def test_dirichlet_skews_class_proportions(windows) -> None:  # type: ignore[no-untyped-def]
    train, test = windows
    splits = partition_clients(train, test, PartitionConfig("dirichlet", alpha=0.3, seed=0))
    shares = [np.bincount(train.y[s.train_idx], minlength=7) / s.train_idx.size for s in splits]
    assert max(float(np.max(s)) for s in shares) > 0.4  # natural data is ~1/7 per class
    assert all(s.train_idx.size > 0 for s in splits)


def test_unknown_regime_and_missing_file_are_clear_errors(tmp_path, windows) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="unknown regime 'iid'.*natural"):
        partition_clients(*windows, PartitionConfig("iid"))
    with pytest.raises(DatasetError, match="not found.*seglearn==1.2.5"):
        load_watch_dataset(tmp_path / "missing.npy")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read"):
        load_watch_dataset(tmp_path / "bad.npy")


def test_holdout_validation_scores_on_later_training_windows_and_never_on_test() -> None:
    from edge_agent.data.federated import FederatedData, holdout_validation
    from edge_agent.learning.strategies import ClientData

    x = np.arange(40, dtype=np.float32).reshape(20, 2)  # row i is window i, in time order
    y = np.repeat([0, 1], 10)
    test = ClientData(x, y, x[:4] + 1000, y[:4])
    data = FederatedData(("a",), (test,), x[:1], y[:1], 2, 2, ("p", "q"), PartitionConfig())
    val = holdout_validation(data, 0.3).clients[0]
    assert val.x_test[:, 0].tolist() == [14, 16, 18, 34, 36, 38]  # the last 3 of each class
    assert val.x_train[:, 0].tolist() == [v for v in range(0, 40, 2) if v not in (14, 16, 18, 34, 36, 38)]
    assert not np.isin(val.x_test, test.x_test).any()
    with pytest.raises(ValueError, match="between 0 and 1"):
        holdout_validation(data, 1.0)
