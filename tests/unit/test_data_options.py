"""`[data] augment_copies` and `[data] per_user_standardization` on the sources that hold a user's raw windows: the
bundled recordings (watch-dataset) and one user of a per-user dataset (user-dataset). Real data and the real
backbone throughout.

With augment_copies = N a client trains on its labelled training windows followed by N copies of each (made after
the partition, embedded by the same backbone, standardized like the originals), and its test windows are those it
has without; per-user statistics come from every window of the user's training period, whatever labels the
partition leaves it; neither moves any other random draw. What cannot apply is refused, saying why; `edge-fl
check-config` says what the agent will do. (Options off, the sources give the data they always gave:
tests/unit/test_agent_sources.py and tests/unit/test_user_dataset_source.py, unchanged.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent import config as config_module
from edge_agent.agent.data_options import data_options, option_problems
from edge_agent.agent.sources import dataset_source, subject_recordings, user_dataset_source, watch_client_data
from edge_agent.config import AgentConfig, BackboneConfig, DataConfig, check_toml
from edge_agent.data.augment import augment_windows
from edge_agent.data.device_client import DataOptions
from edge_agent.data.partition import PartitionConfig, partition_clients
from edge_agent.data.userdata import DatasetCard, UserData, load_user_dataset, write_user_dataset
from edge_agent.data.windows import split_and_window
from edge_agent.learning import rng
from edge_agent.learning.features import EmbeddingStandardizer, fit_user_standardizer
from edge_agent.learning.strategies import ClientData

FIELDS = ("x_train", "y_train", "x_test", "y_test")
SUBJECT = 6


def differences(got: ClientData, want: ClientData) -> list[str]:
    return [f for f in FIELDS if getattr(got, f).dtype != getattr(want, f).dtype
            or not np.array_equal(getattr(got, f), getattr(want, f))]


def options(dataset: Any, device: int = 0, seed: int = 3, **keys: Any) -> DataOptions:
    return data_options(DataConfig(seed=seed, **keys), device, windows=True, population=True,
                        channel_names=dataset.channel_names, what="the bundled recordings")


@pytest.fixture(scope="module")
def recordings(dataset: Any) -> Any:
    return subject_recordings(dataset, SUBJECT)


@pytest.fixture(scope="module")
def subject_split(recordings: Any) -> tuple[Any, Any]:
    """Subject 6's training and test windows, as watch_client_data cuts them."""
    train, test = split_and_window(recordings)
    keep_train, keep_test = train.subject == SUBJECT, test.subject == SUBJECT
    return train.x[keep_train], test.x[keep_test]


@pytest.fixture(scope="module")
def population(recordings: Any, backbone: Any) -> EmbeddingStandardizer:
    """The statistics watch_client_data fits: the backbone subjects' training windows."""
    from edge_agent.data.partition import BACKBONE_SUBJECTS

    train, _ = split_and_window(recordings)
    return EmbeddingStandardizer.fit(backbone.embed(train.x[np.isin(train.subject, BACKBONE_SUBJECTS)]))


# --- the bundled recordings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("partition", [PartitionConfig("few-shot", seed=3, shots=2), PartitionConfig("natural")])
def test_copies_follow_the_labelled_training_windows_and_the_test_windows_stay(
        recordings: Any, backbone: Any, dataset: Any, partition: PartitionConfig) -> None:
    off = watch_client_data(recordings, backbone, SUBJECT, partition)
    got = watch_client_data(recordings, backbone, SUBJECT, partition, options(dataset, augment_copies=4))
    n = off.y_train.size
    assert got.x_train.shape == (5 * n, off.x_train.shape[1]) and got.x_train.dtype == np.float32
    assert np.array_equal(got.x_train[:n], off.x_train) and np.array_equal(got.y_train[:n], off.y_train)
    assert np.array_equal(got.y_train[n:], np.repeat(off.y_train, 4))  # window-major: 4 copies of each in turn
    assert np.array_equal(got.x_test, off.x_test) and np.array_equal(got.y_test, off.y_test)
    moved = (got.x_train[n:] != np.repeat(off.x_train, 4, axis=0)).any(axis=1)  # each copy beside its window
    assert moved.mean() > 0.9, moved.mean()  # perturbed copies, not the windows again


def test_the_copies_are_the_labelled_windows_perturbed_from_the_devices_own_stream(
        recordings: Any, backbone: Any, dataset: Any, subject_split: tuple[Any, Any],
        population: EmbeddingStandardizer) -> None:
    partition = PartitionConfig("few-shot", seed=3, shots=2)  # 14 labelled windows: one chunk of copies
    got = watch_client_data(recordings, backbone, SUBJECT, partition, options(dataset, device=5, augment_copies=3))
    train, test = split_and_window(recordings)
    (split,) = partition_clients(train, test, partition, (SUBJECT,), num_classes=7)
    labelled = train.x[split.train_idx]
    config = options(dataset, device=5, augment_copies=3).augment
    assert config is not None and config.max_rotation_deg > 0  # ax..az and wx..wz: two xyz triplets, rotated
    x_aug, y_aug = augment_windows(labelled, train.y[split.train_idx], config, rng.augment(3, 5),
                                   ((0, 1, 2), (3, 4, 5)))
    n = split.train_idx.size
    assert np.array_equal(got.x_train[n:], population(backbone.embed(x_aug)))
    assert np.array_equal(got.y_train[n:], y_aug)
    # Another device (rng_stream) draws other copies of the same windows; the same device draws the same.
    other = watch_client_data(recordings, backbone, SUBJECT, partition, options(dataset, device=6, augment_copies=3))
    again = watch_client_data(recordings, backbone, SUBJECT, partition, options(dataset, device=5, augment_copies=3))
    assert not np.array_equal(other.x_train[n:], got.x_train[n:]) and differences(again, got) == []


def test_per_user_statistics_come_from_the_whole_training_period_without_labels(
        recordings: Any, backbone: Any, dataset: Any, subject_split: tuple[Any, Any],
        population: EmbeddingStandardizer) -> None:
    train_x, test_x = subject_split
    own = fit_user_standardizer(backbone.embed(train_x), population)
    few = watch_client_data(recordings, backbone, SUBJECT, PartitionConfig("few-shot", seed=3, shots=1),
                            options(dataset, per_user_standardization=True))
    natural = watch_client_data(recordings, backbone, SUBJECT, PartitionConfig("natural"),
                                options(dataset, per_user_standardization=True))
    off = watch_client_data(recordings, backbone, SUBJECT, PartitionConfig("natural"))
    # 7 labelled windows or every one: the same statistics (no label is read), the user's own, not the population's:
    # `fit_user_standardizer` on the embeddings of every training-period window, for the training and test windows.
    assert np.array_equal(few.x_test, natural.x_test) and np.array_equal(few.y_test, off.y_test)
    assert np.array_equal(natural.x_test, own(backbone.embed(test_x)))
    assert not np.allclose(natural.x_test, off.x_test)
    assert np.array_equal(natural.y_train, off.y_train)
    assert np.array_equal(natural.x_train, own(backbone.embed(train_x)))  # natural: every training window labelled


def test_the_agent_source_reads_the_keys(dataset: Any, backbone: Any) -> None:
    partition = PartitionConfig("few-shot", seed=2, shots=3)
    cfg = AgentConfig(device_id="d", state_dir=":memory:", rng_stream=1,
                      data=DataConfig(subject=SUBJECT, regime="few-shot", seed=2, shots=3, augment_copies=2,
                                      per_user_standardization=True))
    got = dataset_source(cfg).client_data()
    want = watch_client_data(subject_recordings(dataset, SUBJECT), backbone, SUBJECT, partition,
                             options(dataset, device=1, seed=2, augment_copies=2, per_user_standardization=True))
    assert got is not None and differences(got, want) == []
    assert got.y_train.size == 3 * 21


# --- one user of a per-user dataset ------------------------------------------------------------------------------


def user_config(directory: Path, user: str, **data: Any) -> AgentConfig:
    return AgentConfig(device_id=user, state_dir=":memory:", backbone=BackboneConfig(),
                       data=DataConfig(source="user-dataset", dir=str(directory), user=user, **data))


def test_a_user_datasets_client_gets_copies_of_its_labelled_training_windows_only(watch_dir: Path) -> None:
    off = user_dataset_source(user_config(watch_dir, "subject-07", regime="dirichlet", seed=4)).client_data()
    got = user_dataset_source(user_config(watch_dir, "subject-07", regime="dirichlet", seed=4,
                                          augment_copies=3)).client_data()
    assert off is not None and got is not None
    n = off.y_train.size
    assert got.y_train.size == 4 * n and np.array_equal(got.x_train[:n], off.x_train)
    assert np.array_equal(got.y_train[n:], np.repeat(off.y_train, 3))
    assert np.array_equal(got.x_test, off.x_test) and np.array_equal(got.y_test, off.y_test)


def test_a_user_datasets_per_user_statistics_ignore_the_partitions_labels(watch_dir: Path, backbone: Any) -> None:
    few = user_dataset_source(user_config(watch_dir, "subject-05", regime="few-shot", shots=1,
                                          per_user_standardization=True)).client_data()
    natural = user_dataset_source(user_config(watch_dir, "subject-05", per_user_standardization=True)).client_data()
    off = user_dataset_source(user_config(watch_dir, "subject-05")).client_data()
    assert few is not None and natural is not None and off is not None
    assert np.array_equal(few.x_test, natural.x_test) and not np.allclose(natural.x_test, off.x_test)
    assert np.array_equal(natural.y_train, off.y_train) and np.array_equal(natural.y_test, off.y_test)


def test_a_features_dataset_standardizes_per_user_but_is_not_augmented(watch_dir: Path, backbone: Any,
                                                                       tmp_path: Path) -> None:
    ds = load_user_dataset(watch_dir)
    c = ds.card
    card = DatasetCard(name="watch-embeddings", description="the watch import, embedded", license=c.license,
                       kind="features", class_names=c.class_names, feature_dim=backbone.embedding_dim,
                       sample_rate_hz=c.sample_rate_hz, window_length=c.window_length, window_stride=c.window_stride,
                       roles=c.roles)
    write_user_dataset(tmp_path / "features", card, [UserData(u.user_id, backbone.embed(u.x), u.y, u.t, u.session)
                                                     for u in ds.users.values()])
    with pytest.raises(ValueError) as refused:
        user_dataset_source(user_config(tmp_path / "features", "subject-04", augment_copies=4))
    assert str(refused.value) == (
        f"[data] augment_copies = 4: the features dataset {tmp_path / 'features'} holds no raw sensor windows to "
        "augment (copies are made of windows before the backbone embeds them); set augment_copies = 0 or leave it "
        "out")
    features = user_dataset_source(user_config(tmp_path / "features", "subject-04",
                                               per_user_standardization=True)).client_data()
    windows = user_dataset_source(user_config(watch_dir, "subject-04", per_user_standardization=True)).client_data()
    assert features is not None and windows is not None and differences(features, windows) == []


# --- the keys, their defaults and their refusals ----------------------------------------------------------------


def test_the_keys_are_checked_where_the_config_is_read() -> None:
    base = 'device_id = "d"\nstate_dir = "s"\n[data]\n'
    cfg, problems, _ = check_toml(base + "augment_copies = 8\nper_user_standardization = true\n", AgentConfig, "a")
    assert problems == [] and cfg is not None
    assert (cfg.data.augment_copies, cfg.data.per_user_standardization) == (8, True)
    _, problems, _ = check_toml(base + "augment_copies = 40\n", AgentConfig, "a.toml")
    assert problems == ["a.toml [data]: augment_copies must be between 0 (no augmentation) and 32 (each copy of a "
                        "labelled window costs a backbone invoke and a stored embedding; 8 is the measured choice), "
                        "got 40"]
    _, problems, _ = check_toml(base + 'augment_copies = true\nper_user_standardization = "yes"\n', AgentConfig, "a")
    assert problems == ["a [data]: augment_copies must be an integer, got True (bool)",
                        "a [data]: per_user_standardization must be true or false, got 'yes' (str)"]
    _, problems, _ = check_toml(base + 'source = "serial"\nport = "/dev/ttyACM0"\naugment_copies = 8\n',
                                AgentConfig, "a")
    assert problems == ["a [data]: augment_copies = 8 cannot apply to source = 'serial': the MCU's windows are "
                        "embedded one at a time as they arrive and are not augmented; set augment_copies = 0 (or "
                        "leave it out), or feed the windows as files (source = 'files')"]
    serial_off = check_toml(base + 'source = "serial"\nport = "p"\naugment_copies = 0\nper_user_standardization = '
                            "true\n", AgentConfig, "a")
    assert serial_off[1] == []


def test_unset_keys_take_the_default_where_the_source_can_apply_it(monkeypatch: pytest.MonkeyPatch) -> None:
    unset = DataConfig()
    assert (unset.augment_copies, unset.per_user_standardization) == (None, None)
    assert unset.copies_to_make(can_augment=True) == config_module.DEFAULT_AUGMENT_COPIES == 0
    assert unset.standardizes_per_user(has_population=True) is config_module.DEFAULT_PER_USER_STANDARDIZATION
    # Switching a default on is changing one constant: sources that cannot apply it stay without it, unrefused.
    monkeypatch.setattr(config_module, "DEFAULT_AUGMENT_COPIES", 8)
    monkeypatch.setattr(config_module, "DEFAULT_PER_USER_STANDARDIZATION", True)
    serial = DataConfig(source="serial", port="/dev/ttyACM0")
    assert (serial.copies_to_make(can_augment=False), serial.standardizes_per_user(has_population=True)) == (0, True)
    assert option_problems(serial, windows=False, population=False, what="x") == []
    resolved = data_options(unset, 0, windows=False, population=False, what="a features card")
    assert resolved.augment is None and not resolved.per_user_standardization
    assert DataConfig(augment_copies=0).copies_to_make(can_augment=True) == 0  # set explicitly: as set
    resolved = data_options(unset, 2, windows=True, population=True, channel_names=("ax", "ay", "az"), what="w")
    assert resolved.augment is not None and resolved.augment.copies == 8 and resolved.per_user_standardization
    with pytest.raises(ValueError, match="cannot apply to source = 'serial'"):  # set explicitly: still refused
        DataConfig(source="serial", port="/dev/ttyACM0", augment_copies=8)


def test_windows_without_xyz_channels_are_shifted_and_scaled_not_rotated(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="edge_fl.agent")
    plain = data_options(DataConfig(augment_copies=2), 0, windows=True, population=True,
                         channel_names=("ecg", "ppg"), what="the windows card of /drop")
    assert plain.augment is not None and plain.augment.max_rotation_deg == 0 and plain.channel_groups == ()
    assert "the windows card of /drop: no channel names ending in x, y, z (ecg, ppg)" in caplog.text
    rotated = data_options(DataConfig(augment_copies=2), 0, windows=True, population=True,
                           channel_names=("acc-x", "acc-y", "acc-z"), what="w")
    assert rotated.augment is not None and rotated.augment == replace(plain.augment, max_rotation_deg=15.0)


def test_the_augmentation_stream_is_its_own() -> None:
    """Its own purpose number: none of the fleet's other streams draws what it draws, for any device."""
    first = rng.augment(0, 3).integers(0, 2**62, 4)
    others = [rng.server_init(0), rng.client_init(0, 3), rng.selection(0, 3), rng.client_round(0, 1, 3),
              rng.personalize(0, 1, 3), rng.augment(0, 4), rng.augment(1, 3), rng.augment(0, 3, 1)]
    assert all(not np.array_equal(first, g.integers(0, 2**62, 4)) for g in others)
    assert np.array_equal(first, rng.augment(0, 3, 0).integers(0, 2**62, 4))


def test_check_config_says_what_the_agent_does_and_refuses_what_its_source_cannot(
        tmp_path: Path, watch_dir: Path, dataset: Any) -> None:
    import json

    from edge_agent.config_tools import check_config
    from edge_agent.data.userdata import Roles

    def check(name: str, data: str) -> Any:
        path = tmp_path / f"{name}.toml"
        path.write_text(f'device_id = "d"\nstate_dir = "state"\n[data]\n{data}')
        return path, check_config(path, environ={})

    _, bundled = check("bundled", "augment_copies = 8\nper_user_standardization = true\n")
    assert bundled.problems == [] and bundled.summary is not None
    assert ("data from bundled recordings of subject 4 (8 augmented copies of each labelled training window, "
            "per-user standardization)") in bundled.summary
    _, plain = check("plain", "")
    assert "subject 4 (no augmented copies, the population's standardization)" in (plain.summary or "")
    _, user = check("user", f'source = "user-dataset"\ndir = "{watch_dir}"\nuser = "subject-04"\naugment_copies = 2\n')
    assert user.problems == [] and f"of the dataset in {watch_dir} (2 augmented copies" in (user.summary or "")
    _, serial = check("serial", 'source = "serial"\nport = "/dev/ttyACM0"\nper_user_standardization = true\n')
    assert serial.problems == [] and "(no augmented copies, per-user standardization)" in (serial.summary or "")
    path, serial = check("serial-augmented", 'source = "serial"\nport = "/dev/ttyACM0"\naugment_copies = 4\n')
    assert serial.problems == [f"{path} [data]: augment_copies = 4 cannot apply to source = 'serial': the MCU's "
                               "windows are embedded one at a time as they arrive and are not augmented; set "
                               "augment_copies = 0 (or leave it out), or feed the windows as files (source = 'files')"]

    # A files source: what it can do depends on its card.
    drop = tmp_path / "drop"
    drop.mkdir()
    windows_card = DatasetCard(name="app", description="d", license="unknown", kind="windows",
                               class_names=dataset.class_names, sample_rate_hz=50.0,
                               channel_names=dataset.channel_names, window_length=100, window_stride=25,
                               roles=Roles(federate=("me",)))
    (drop / "dataset.json").write_text(json.dumps(windows_card.to_json()))
    _, files = check("files", f'source = "files"\ndir = "{drop}"\naugment_copies = 3\nper_user_standardization = '
                              "true\n")
    assert files.problems == [] and (f"files dropped in {drop} (3 augmented copies of each labelled training "
                                     "window, per-user standardization)") in (files.summary or "")
    features_card = DatasetCard(name="app", description="d", license="unknown", kind="features",
                                class_names=dataset.class_names, feature_dim=8, roles=Roles(federate=("me",)))
    (drop / "dataset.json").write_text(json.dumps(features_card.to_json()))
    _, files = check("features", f'source = "files"\ndir = "{drop}"\n')
    assert files.problems == [] and f"files dropped in {drop} (no augmented copies, features used as they are)" in (
        files.summary or "")
    path, files = check("features-augmented", f'source = "files"\ndir = "{drop}"\naugment_copies = 3\n'
                                              "per_user_standardization = true\n")
    assert files.problems == [
        f"{path} [data] augment_copies = 3: the features card of {drop} holds no raw sensor windows to augment "
        "(copies are made of windows before the backbone embeds them); set augment_copies = 0 or leave it out",
        f"{path} [data] per_user_standardization = true: the features card of {drop} has no population statistics "
        "to shrink the user's towards (a features card's vectors are used as they are); set it to false or leave "
        "it out"]
