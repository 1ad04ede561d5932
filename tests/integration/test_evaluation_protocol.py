"""The evaluation protocol on the real datasets: what trains, what chooses settings, what is read for the report.

UCI HAPT (two sessions per user) and the bundled watch recordings (two recordings of each exercise per subject),
both in the per-user format; the watch data embedded by the real bundled backbone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.data.augment import AugmentConfig
from edge_agent.data.from_userdata import UserFeatures, prepare_users, user_number
from edge_agent.data.importers import import_hapt, import_watch
from edge_agent.data.partition import PartitionConfig
from edge_agent.data.userdata import UserData, UserDataset
from edge_agent.evaluation.protocol import DeviceOptions, Protocol, bouts, federate_phase, user_parts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hapt(tmp_path_factory: pytest.TempPathFactory) -> UserDataset:
    return import_hapt(tmp_path_factory.mktemp("protocol") / "hapt")


@pytest.fixture(scope="module")
def watch(tmp_path_factory: pytest.TempPathFactory) -> UserDataset:
    return import_watch(tmp_path_factory.mktemp("protocol") / "watch")


@pytest.fixture(scope="module")
def watch_features(watch: UserDataset, backbone) -> UserFeatures:  # type: ignore[no-untyped-def]
    return prepare_users(watch, embed=backbone.embed, rule="segment")


def overlapping(user: UserData, a: np.ndarray, b: np.ndarray, length_s: float) -> int:
    """Pairs of windows, one from each index set, of one session that share a sample."""
    assert user.t is not None and user.session is not None
    clash = 0
    for i in a:
        same = b[user.session[b] == user.session[i]]
        clash += int(np.sum(np.abs(user.t[same] - user.t[i]) < length_s))
    return clash


def test_hapt_holds_out_a_whole_session_chosen_by_the_seed(hapt: UserDataset) -> None:
    card = hapt.card
    held: dict[str, set[int]] = {}
    for number, uid in enumerate(card.roles.federate, 16):
        user = hapt.users[uid]
        assert user.session is not None
        for seed in range(4):
            parts = user_parts(user, card, Protocol(test_by="session", validation_by="run"), seed, number)
            test_sessions = set(np.unique(user.session[parts.test]).tolist())
            assert len(test_sessions) == 1  # one whole session ...
            assert np.array_equal(parts.test, np.flatnonzero(user.session == next(iter(test_sessions))))
            train_sessions = set(np.unique(user.session[np.concatenate([parts.train, parts.validation])]).tolist())
            assert not train_sessions & test_sessions  # ... and nothing of it trains or validates
            for part in (parts.train, parts.validation, parts.test):
                assert np.unique(user.y[part]).size == card.num_classes  # every activity in every part
            held.setdefault(uid, set()).add(next(iter(test_sessions)))
    assert sum(len(s) == 2 for s in held.values()) >= 5  # the test session varies with the seed for most users


def test_hapt_validation_is_the_last_bout_of_each_activity(hapt: UserDataset) -> None:
    card = hapt.card
    user = hapt.users[card.roles.federate[0]]
    parts = user_parts(user, card, Protocol(test_by="session", validation_by="run"), 0, 16)
    period = np.sort(np.concatenate([parts.train, parts.validation]))
    runs = bouts(user, card, period)
    last_of_label = {int(user.y[r[0]]): r for r in runs}  # later runs overwrite earlier ones
    assert np.array_equal(np.sort(np.concatenate(list(last_of_label.values()))), parts.validation)
    assert overlapping(user, parts.train, parts.validation, card.window_length / card.sample_rate_hz) == 0


def test_next_session_trains_on_the_first_and_tests_on_the_second(hapt: UserDataset) -> None:
    card = hapt.card
    user = hapt.users[card.roles.federate[3]]
    assert user.session is not None
    first, second = user.sessions()[:2]
    for seed in (0, 1):
        parts = user_parts(user, card, Protocol(test_by="next-session"), seed, 19)
        assert set(user.session[np.concatenate([parts.train, parts.validation])].tolist()) == {first}
        assert np.array_equal(parts.test, np.flatnonzero(user.session == second))


def test_watch_segment_test_is_the_same_for_every_seed_and_never_validates(watch: UserDataset) -> None:
    card = watch.card
    protocol = Protocol(test_by="segment", validation_by="segment")
    length_s = card.window_length / card.sample_rate_hz
    for number, uid in enumerate(card.roles.federate, 4):
        user = watch.users[uid]
        a, b = (user_parts(user, card, protocol, seed, number) for seed in (0, 7))
        assert np.array_equal(a.test, b.test)
        assert overlapping(user, a.train, a.validation, length_s) == 0
        assert overlapping(user, a.validation, a.test, length_s) == 0
        train, scored = a.phase("validation")
        assert not np.isin(a.test, np.concatenate([train, scored])).any()
        train, scored = a.phase("test")
        assert np.array_equal(scored, a.test) and np.array_equal(train, np.sort(np.r_[a.train, a.validation]))


def test_the_watch_recordings_held_out_one_per_exercise(watch: UserDataset) -> None:
    user = watch.users[watch.card.roles.federate[0]]
    assert user.session is not None
    parts = user_parts(user, watch.card, Protocol(test_by="session"), 3, 4)
    held = np.unique(user.session[parts.test])
    assert held.size == watch.card.num_classes  # a watch recording holds one exercise
    assert np.unique(user.y[parts.test]).size == watch.card.num_classes


def test_session_splits_are_refused_without_sessions(watch: UserDataset) -> None:
    user = watch.users[watch.card.roles.federate[0]]
    bare = UserData(user.user_id, user.x, user.y, user.t, None)
    with pytest.raises(ValueError, match="fewer than two sessions: test by 'segment' instead"):
        user_parts(bare, watch.card, Protocol(test_by="session"), 0, 4)
    with pytest.raises(ValueError, match="unknown test split"):
        Protocol(test_by="random")


def test_phases_score_different_windows_with_the_same_clients(watch_features: UserFeatures) -> None:
    protocol = Protocol(test_by="segment", validation_by="segment")
    partition = PartitionConfig(regime="few-shot", seed=3, shots=2)
    val = federate_phase(watch_features, protocol, "validation", partition)
    test = federate_phase(watch_features, protocol, "test", partition)
    assert val.federated.client_ids == test.federated.client_ids == watch_features.dataset.card.roles.federate
    for uid, cd in zip(val.federated.client_ids, val.federated.clients, strict=True):
        assert not np.isin(val.score_index[uid], test.score_index[uid]).any()  # validation never scores test
        assert not np.isin(val.train_index[uid], test.score_index[uid]).any()
        assert np.bincount(cd.y_train).max() <= 2  # the regime still decides what a client holds
    # New users are test users: validation scores a stand-in, every federated user's whole validation part.
    holdout = [u.user_id for u in watch_features.dataset.in_role("holdout")]
    assert holdout and test.federated.new_user_y.size == sum(len(watch_features.dataset.users[u]) for u in holdout)
    parts = {u: user_parts(watch_features.dataset.users[u], watch_features.dataset.card, protocol, partition.seed,
                           user_number(watch_features.dataset.card, u)) for u in val.federated.client_ids}
    assert val.federated.new_user_y.size == sum(p.validation.size for p in parts.values())
    expected = watch_features.standardizer(np.concatenate([watch_features.features[u][p.validation]
                                                           for u, p in parts.items()]))
    assert np.array_equal(val.federated.new_user_x, expected)  # the population's statistics, as for a new user


def test_device_options_change_the_training_data_only_as_said(watch_features: UserFeatures, backbone) -> None:  # type: ignore[no-untyped-def]
    protocol = Protocol(test_by="segment", validation_by="segment")
    partition = PartitionConfig(regime="few-shot", seed=1, shots=3)
    plain = federate_phase(watch_features, protocol, "test", partition)
    augmented = federate_phase(watch_features, protocol, "test", partition,
                               DeviceOptions(augment=AugmentConfig(copies=2)), embed=backbone.embed)
    own = federate_phase(watch_features, protocol, "test", partition, DeviceOptions(per_user_standardization=True))
    for p, a, o in zip(plain.federated.clients, augmented.federated.clients, own.federated.clients, strict=True):
        n = p.y_train.size
        assert a.y_train.size == 3 * n  # the originals, then two copies of each
        assert np.array_equal(a.x_train[:n], p.x_train) and np.array_equal(a.y_train[n:], np.repeat(p.y_train, 2))
        assert not np.allclose(a.x_train[n::2], p.x_train)  # the copies are other windows' embeddings
        assert np.array_equal(a.x_test, p.x_test) and np.array_equal(o.y_test, p.y_test)
        assert not np.allclose(o.x_test, p.x_test)  # the user's own statistics standardize its windows
    again = federate_phase(watch_features, protocol, "test", partition,
                           DeviceOptions(augment=AugmentConfig(copies=2)), embed=backbone.embed)
    assert all(np.array_equal(a.x_train, b.x_train)
               for a, b in zip(augmented.federated.clients, again.federated.clients, strict=True))


@pytest.mark.parametrize("which", ["hapt", "watch"])
def test_no_window_the_tuning_reads_is_ever_a_test_window(which: str, hapt: UserDataset, watch: UserDataset) -> None:
    """The benchmarks' own protocols: whatever the tuning seed and the test seed, the windows the validation
    phase trains on or scores never score in the test phase."""
    protocol = {"hapt": Protocol(test_by="next-session", validation_by="run"),
                "watch": Protocol(test_by="segment", validation_by="segment")}[which]
    data = {"hapt": hapt, "watch": watch}[which]
    leaked = 0
    for number, uid in enumerate(data.card.roles.all(), 1):
        if uid not in data.card.roles.federate:
            continue
        user = data.users[uid]
        tuned = np.concatenate([np.concatenate(user_parts(user, data.card, protocol, s, number).phase("validation"))
                                for s in (100, 101)])
        for seed in range(10):
            _, tested = user_parts(user, data.card, protocol, seed, number).phase("test")
            leaked += int(np.isin(tested, tuned).sum())
    assert leaked == 0
    session_protocol = Protocol(test_by="session", validation_by="segment")  # a seed-chosen held-out recording
    user = data.users[data.card.roles.federate[0]]
    tuned = np.concatenate(user_parts(user, data.card, session_protocol, 100, 99).phase("validation"))
    tested = np.concatenate([user_parts(user, data.card, session_protocol, s, 99).phase("test")[1] for s in range(10)])
    assert np.isin(tested, tuned).any()  # why the benchmarks do not hold sessions out by seed
