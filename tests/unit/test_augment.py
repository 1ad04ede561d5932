"""Augmenting labelled IMU windows: on the bundled watch recordings, each perturbation alone and all together."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.data.augment import (
    AugmentConfig,
    AugmentError,
    augment_windows,
    channel_groups_from_names,
    reflect_shift_index,
)
from edge_agent.data.hapt import HAPT_CHANNELS
from edge_agent.data.windows import WindowSet

WATCH_GROUPS = ((0, 1, 2), (3, 4, 5))  # ax ay az, wx wy wz
MODELS = Path(__file__).resolve().parents[2] / "models"
# One perturbation at a time: the others switched off.
SHIFT_ONLY = AugmentConfig(copies=5, max_rotation_deg=0.0, scale_range=(1.0, 1.0))
SCALE_ONLY = AugmentConfig(copies=5, max_shift_fraction=0.0, max_rotation_deg=0.0)
ROTATE_ONLY = AugmentConfig(copies=5, max_shift_fraction=0.0, scale_range=(1.0, 1.0), max_rotation_deg=15.0)


@pytest.fixture(scope="module")
def labelled(windows: tuple[WindowSet, WindowSet]) -> tuple[np.ndarray, np.ndarray]:
    """Two real training windows of every exercise, from different subjects and recordings."""
    train, _ = windows
    rng = np.random.default_rng(0)
    pick = np.concatenate([rng.choice(np.flatnonzero(train.y == c), 2, replace=False) for c in np.unique(train.y)])
    return train.x[pick], train.y[pick]


def rotation_from(original: np.ndarray, rotated: np.ndarray) -> np.ndarray:
    """The matrix R with rotated[t] = R @ original[t] for every sample t (least squares over the window)."""
    r_transposed, *_ = np.linalg.lstsq(original.astype(np.float64), rotated.astype(np.float64), rcond=None)
    result: np.ndarray = r_transposed.T
    return result


def angle_deg(rotation: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def test_the_bundled_datasets_name_two_triplets(dataset) -> None:  # type: ignore[no-untyped-def]
    assert dataset.channel_names == ("ax", "ay", "az", "wx", "wy", "wz")
    assert channel_groups_from_names(dataset.channel_names) == WATCH_GROUPS
    assert channel_groups_from_names(HAPT_CHANNELS) == WATCH_GROUPS
    for sidecar in ("backbone_int8.json", "backbone_hapt_int8.json"):
        names = json.loads((MODELS / sidecar).read_text())["input"]["channel_names"]
        assert channel_groups_from_names(names) == WATCH_GROUPS


def test_triplets_are_found_by_axis_letter_and_incomplete_sensors_are_left_out() -> None:
    names = ["temp", "Gyro_X", "acc.x", "Gyro_Y", "acc.y", "Gyro_Z", "acc.z", "mag-x", "mag-y", "x", "y", "z"]
    assert channel_groups_from_names(names) == ((1, 3, 5), (2, 4, 6), (9, 10, 11))
    assert channel_groups_from_names(["heart-rate", "pressure"]) == ()


def test_two_channels_naming_one_axis_are_refused() -> None:
    with pytest.raises(AugmentError, match=r"channels 0 \('acc-x'\) and 3 \('acc_x'\) both name axis x"):
        channel_groups_from_names(["acc-x", "acc-y", "acc-z", "acc_x"])


def test_copies_keep_shape_dtype_and_labels(labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    x_aug, y_aug = augment_windows(x, y, AugmentConfig(copies=3), np.random.default_rng(1), WATCH_GROUPS)
    assert x_aug.shape == (3 * len(y), *x.shape[1:])
    assert x_aug.dtype == np.float32 and y_aug.dtype == y.dtype
    np.testing.assert_array_equal(y_aug, np.repeat(y, 3))  # window-major: window i's copies are rows 3i..3i+2
    assert np.isfinite(x_aug).all()
    assert not np.any(np.all(x_aug == np.repeat(x, 3, axis=0), axis=(1, 2)))  # every copy is changed


def test_copies_zero_returns_nothing_and_draws_nothing(labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    rng = np.random.default_rng(2)
    before = rng.bit_generator.state
    x_aug, y_aug = augment_windows(x, y, AugmentConfig(copies=0), rng, WATCH_GROUPS)
    assert x_aug.shape == (0, *x.shape[1:]) and x_aug.dtype == np.float32
    assert y_aug.shape == (0,) and y_aug.dtype == y.dtype
    assert rng.bit_generator.state == before
    assert not AugmentConfig(copies=0).enabled and AugmentConfig().enabled


def test_rotation_preserves_every_triplets_norm(labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    x_aug, _ = augment_windows(x, y, ROTATE_ONLY, np.random.default_rng(3), WATCH_GROUPS)
    original = np.repeat(x, ROTATE_ONLY.copies, axis=0)
    for group in WATCH_GROUPS:
        cols = list(group)
        np.testing.assert_allclose(np.linalg.norm(x_aug[:, :, cols], axis=2),
                                   np.linalg.norm(original[:, :, cols], axis=2), rtol=1e-5, atol=1e-6)


def test_one_rotation_per_copy_within_the_bound_turns_acc_and_gyro_alike(
        labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    x_aug, _ = augment_windows(x, y, ROTATE_ONLY, np.random.default_rng(4), WATCH_GROUPS)
    original = np.repeat(x, ROTATE_ONLY.copies, axis=0)
    angles = []
    for orig, aug in zip(original, x_aug, strict=True):
        rotation = rotation_from(orig[:, :3], aug[:, :3])  # found from the accelerometer ...
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-4)
        assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-4)
        np.testing.assert_allclose(aug[:, 3:], orig[:, 3:] @ rotation.T, atol=1e-4)  # ... turns the gyro too
        angles.append(angle_deg(rotation))
    assert max(angles) <= ROTATE_ONLY.max_rotation_deg + 0.01
    assert max(angles) > ROTATE_ONLY.max_rotation_deg / 2  # the bound is used, not just respected
    assert len(set(np.round(angles, 3))) == len(angles)  # a new rotation for every copy


def test_channels_outside_a_triplet_are_not_rotated(labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    x_aug, _ = augment_windows(x, y, ROTATE_ONLY, np.random.default_rng(5), ((0, 1, 2),))
    original = np.repeat(x, ROTATE_ONLY.copies, axis=0)
    np.testing.assert_array_equal(x_aug[:, :, 3:], original[:, :, 3:])
    assert not np.allclose(x_aug[:, :, :3], original[:, :, :3])


def test_scaling_is_one_factor_per_copy_within_the_range(labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    x_aug, _ = augment_windows(x, y, SCALE_ONLY, np.random.default_rng(6), WATCH_GROUPS)
    original = np.repeat(x, SCALE_ONLY.copies, axis=0).astype(np.float64)
    factors = np.linalg.norm(x_aug, axis=(1, 2)) / np.linalg.norm(original, axis=(1, 2))
    np.testing.assert_allclose(x_aug, original * factors[:, None, None], rtol=1e-5, atol=1e-6)
    low, high = SCALE_ONLY.scale_range
    assert np.all((factors >= low - 1e-6) & (factors <= high + 1e-6))
    assert np.ptp(factors) > (high - low) / 2


def test_per_group_scaling_gives_each_sensor_its_own_factor(labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    config = AugmentConfig(copies=5, max_shift_fraction=0.0, max_rotation_deg=0.0, scale_per_group=True)
    x_aug, _ = augment_windows(x, y, config, np.random.default_rng(7), WATCH_GROUPS)
    original = np.repeat(x, config.copies, axis=0).astype(np.float64)
    acc, gyro = (np.linalg.norm(x_aug[:, :, g], axis=(1, 2)) / np.linalg.norm(original[:, :, g], axis=(1, 2))
                 for g in ([0, 1, 2], [3, 4, 5]))
    np.testing.assert_allclose(x_aug[:, :, :3], original[:, :, :3] * acc[:, None, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_aug[:, :, 3:], original[:, :, 3:] * gyro[:, None, None], rtol=1e-5, atol=1e-6)
    assert np.all((np.concatenate([acc, gyro]) >= 0.9 - 1e-6) & (np.concatenate([acc, gyro]) <= 1.1 + 1e-6))
    assert not np.allclose(acc, gyro)


def test_time_jitter_shifts_within_the_bound_using_only_the_windows_own_samples(
        labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    x_aug, _ = augment_windows(x, y, SHIFT_ONLY, np.random.default_rng(8), WATCH_GROUPS)
    length = x.shape[1]
    bound = SHIFT_ONLY.max_shift_samples(length)
    assert bound == 10  # 10% of a 2 s window at 50 Hz
    candidates = np.arange(-bound, bound + 1)
    index = reflect_shift_index(length, candidates)
    found = []
    for i, aug in enumerate(x_aug):
        orig = x[i // SHIFT_ONLY.copies]
        matches = [int(s) for s, idx in zip(candidates, index, strict=True) if np.array_equal(aug, orig[idx])]
        assert matches, f"copy {i} is no shift of its window by at most {bound} samples"
        found.append(matches[0])
    assert min(found) < 0 < max(found)


def test_reflect_shift_index_mirrors_at_the_edges() -> None:
    np.testing.assert_array_equal(reflect_shift_index(6, np.array([2, -2, 0])),
                                  [[2, 1, 0, 1, 2, 3], [2, 3, 4, 5, 4, 3], [0, 1, 2, 3, 4, 5]])
    with pytest.raises(AugmentError, match="does not fit a window of 6"):
        reflect_shift_index(6, np.array([6]))


def test_the_same_generator_state_gives_the_same_copies(labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    a = augment_windows(x, y, AugmentConfig(), np.random.default_rng(9), WATCH_GROUPS)
    b = augment_windows(x, y, AugmentConfig(), np.random.default_rng(9), WATCH_GROUPS)
    c = augment_windows(x, y, AugmentConfig(), np.random.default_rng(10), WATCH_GROUPS)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_switching_rotation_off_changes_nothing_else(labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    rotated, _ = augment_windows(x, y, AugmentConfig(), np.random.default_rng(11), WATCH_GROUPS)
    unrotated, _ = augment_windows(x, y, AugmentConfig(max_rotation_deg=0.0), np.random.default_rng(11), WATCH_GROUPS)
    for cols in ([0, 1, 2], [3, 4, 5]):  # same shifts and scales: the same norms, sample by sample
        np.testing.assert_allclose(np.linalg.norm(rotated[:, :, cols], axis=2),
                                   np.linalg.norm(unrotated[:, :, cols], axis=2), rtol=1e-5, atol=1e-6)
    assert not np.allclose(rotated, unrotated)


def test_hapt_length_windows_get_their_own_shift_bound() -> None:
    assert AugmentConfig().max_shift_samples(128) == 12
    assert AugmentConfig(max_shift_fraction=0.0).max_shift_samples(128) == 0


@pytest.mark.parametrize(("settings", "complaint"), [
    ({"copies": -1}, "copies must be a whole number >= 0"),
    ({"copies": 1.5}, "copies must be a whole number >= 0"),
    ({"copies": True}, "copies must be a whole number >= 0"),
    ({"max_shift_fraction": 0.6}, r"max_shift_fraction must be in \[0, 0.5\]"),
    ({"max_shift_fraction": -0.1}, r"max_shift_fraction must be in \[0, 0.5\]"),
    ({"scale_range": (0.0, 1.1)}, "0 < low <= high"),
    ({"scale_range": (1.2, 1.1)}, "0 < low <= high"),
    ({"scale_range": (0.9, float("nan"))}, "0 < low <= high"),
    ({"scale_range": (1.0,)}, r"must be \(low, high\)"),
    ({"max_rotation_deg": 181.0}, r"max_rotation_deg must be in \[0, 180\]"),
    ({"max_rotation_deg": float("nan")}, r"max_rotation_deg must be in \[0, 180\]"),
])
def test_bad_settings_are_refused(settings: dict, complaint: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(AugmentError, match=complaint):
        AugmentConfig(**settings)


@pytest.mark.parametrize(("case", "complaint"), [
    ("2-D windows", r"windows must be \(n, time, channels\)"),
    ("one label too few", "labels must be one per window"),
    ("float labels", "labels must be integer class indices"),
    ("a NaN sample", r"1 window\(s\) hold NaN or infinite values \(first: window 3\)"),
    ("group past the last channel", "names channel 6, but the windows have channels 0..5"),
    ("channel in two groups", "channel 2 is in channel groups 0 and 1"),
    ("group of two", "a group is three distinct channel indices"),
    ("no triplet but rotation", "none of the 6 channels is in an xyz triplet"),
    ("a seed for a generator", "rng must be a numpy.random.Generator"),
])
def test_bad_input_is_refused(labelled: tuple[np.ndarray, np.ndarray], case: str, complaint: str) -> None:
    x, y = labelled
    groups: tuple[tuple[int, ...], ...] = WATCH_GROUPS
    rng: object = np.random.default_rng(12)
    if case == "2-D windows":
        x = x[:, :, 0]
    elif case == "one label too few":
        y = y[:-1]
    elif case == "float labels":
        y = y.astype(np.float64)
    elif case == "a NaN sample":
        x = x.copy()
        x[3, 50, 4] = np.nan
    elif case == "group past the last channel":
        groups = ((0, 1, 2), (4, 5, 6))
    elif case == "channel in two groups":
        groups = ((0, 1, 2), (2, 3, 4))
    elif case == "group of two":
        groups = ((0, 1),)
    elif case == "no triplet but rotation":
        groups = ()
    elif case == "a seed for a generator":
        rng = 12
    with pytest.raises(AugmentError, match=complaint):
        augment_windows(x, y, AugmentConfig(), rng, groups)  # type: ignore[arg-type]


def test_without_triplets_windows_are_still_shifted_and_scaled(labelled: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = labelled
    config = AugmentConfig(copies=4, max_rotation_deg=0.0)
    x_aug, y_aug = augment_windows(x, y, config, np.random.default_rng(13), ())
    assert x_aug.shape == (4 * len(y), *x.shape[1:])
    np.testing.assert_array_equal(y_aug, np.repeat(y, 4))
    assert not np.any(np.all(x_aug == np.repeat(x, 4, axis=0), axis=(1, 2)))
