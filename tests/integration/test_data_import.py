"""The importers on the real recordings: `import_watch` writes the windows the simulation cuts today, and
`import_csv`, fed a CSV made from a few hundred real samples, writes exactly the windows computed directly from
those samples, never across a change of user, session or label or a gap in time, and names the line of a bad
value."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.data.importers import import_csv, watch_user_id
from edge_agent.data.partition import BACKBONE_SUBJECTS, CLIENT_SUBJECTS, NEW_USER_SUBJECTS
from edge_agent.data.userdata import UserDataError, load_user_dataset
from edge_agent.data.watch import WatchDataset
from edge_agent.data.windows import WindowConfig, WindowSet, window_starts

RATE = 50
CHANNELS = ("ax", "ay", "az", "wx", "wy", "wz")


def test_watch_import_holds_the_simulations_windows_and_roles(dataset: WatchDataset, watch_dir: Path) -> None:
    ds = load_user_dataset(watch_dir)
    length, stride = WindowConfig().samples(dataset.sample_rate_hz)
    card = ds.card
    assert (card.window_length, card.window_stride, card.sample_rate_hz) == (length, stride, 50.0) == (100, 25, 50.0)
    assert card.class_names == dataset.class_names and card.channel_names == dataset.channel_names
    assert card.roles.pretrain == tuple(map(watch_user_id, BACKBONE_SUBJECTS)) == ("subject-01", "subject-02",
                                                                                     "subject-03")
    assert card.roles.federate == tuple(map(watch_user_id, CLIENT_SUBJECTS))
    assert card.roles.holdout == tuple(map(watch_user_id, NEW_USER_SUBJECTS)) == ("subject-10",)
    assert ds.problems() == []
    total = 0
    for rec in dataset.recordings:
        user = ds.users[watch_user_id(rec.subject)]
        assert user.session is not None and user.t is not None
        mine = user.session == rec.index
        starts = window_starts(rec.samples.shape[0], length, stride)  # windows.py's own windowing
        assert mine.sum() == starts.size > 0
        np.testing.assert_array_equal(user.x[mine], rec.samples[starts[:, None] + np.arange(length)])
        assert np.all(user.y[mine] == rec.label)
        np.testing.assert_allclose(user.t[mine] * RATE, starts, atol=1e-9)
        total += starts.size
    assert total == sum(len(u) for u in ds.users.values())


def test_every_training_window_of_the_simulation_is_in_the_import(dataset: WatchDataset, watch_dir: Path,
                                                                 windows: tuple[WindowSet, WindowSet]) -> None:
    ds = load_user_dataset(watch_dir)
    train, _ = windows
    for i in range(0, len(train), 97):  # a spread sample of the ~7,000 training windows
        rec = dataset.recordings[train.recording[i]]
        user = ds.users[watch_user_id(rec.subject)]
        assert user.t is not None and user.session is not None
        j = np.flatnonzero((user.session == rec.index) & np.isclose(user.t * RATE, train.start[i]))
        assert j.size == 1
        np.testing.assert_array_equal(user.x[j[0]], train.x[i])
        assert user.y[j[0]] == train.y[i]


def test_the_time_split_of_the_import_matches_the_simulations_cut(dataset: WatchDataset, watch_dir: Path,
                                                                 windows: tuple[WindowSet, WindowSet]) -> None:
    ds = load_user_dataset(watch_dir)
    _, test = windows
    splits = ds.time_splits(test_fraction=WindowConfig().test_fraction)
    for uid, split in splits.items():
        user = ds.users[uid]
        assert user.t is not None and user.session is not None
        assert split.rule == "segment"  # one exercise per recording: holding whole recordings out loses classes
        for rec_index in np.unique(user.session):
            tr = split.train[user.session[split.train] == rec_index]
            te = split.test[user.session[split.test] == rec_index]
            assert user.t[tr].max() + 2.0 <= user.t[te].min() + 1e-9  # 2 s windows: no shared sample
            # windows.py cuts at round(0.7 n) samples and windows each side on its own grid: one window apart at most
            assert abs(te.size - int(np.sum(test.recording == rec_index))) <= 1
        assert split.dropped == 3 * 14  # ceil(100 / 25) - 1 windows at the cut of each of the 14 recordings


# --- CSV --------------------------------------------------------------------------------------------------


@dataclass
class Stretch:
    """Consecutive real samples of one label in one session: the expected windows come from these."""

    user: str
    session: str
    label: str
    samples: np.ndarray  # (n, 6) float32
    times: np.ndarray  # (n,) seconds


def _pick(dataset: WatchDataset, subject: int) -> list[Any]:
    """Two recordings of the subject with different exercises."""
    recs = [r for r in dataset.recordings if r.subject == subject]
    second = next(r for r in recs[1:] if r.label != recs[0].label)
    return [recs[0], second]


def real_stretches(dataset: WatchDataset) -> list[Stretch]:
    """~900 real samples of 3 subjects, laid out to exercise every boundary the importer must respect."""
    names = dataset.class_names
    a1, a2 = _pick(dataset, 4)
    b1, b2 = _pick(dataset, 5)
    c1, c2 = _pick(dataset, 10)
    t = np.arange(300) / RATE
    return [
        # subject 4: two exercises back to back in ONE session: a label change inside a session
        Stretch("s04", "morning", names[a1.label], a1.samples[:150], t[:150]),
        Stretch("s04", "morning", names[a2.label], a2.samples[:150], t[150:300]),
        # subject 5: samples 70-89 lost in the first recording: a gap in time splits the stretch
        Stretch("s05", f"rec{b1.index}", names[b1.label], b1.samples[:70], t[:70]),
        Stretch("s05", f"rec{b1.index}", names[b1.label], b1.samples[90:150], t[90:150]),
        Stretch("s05", f"rec{b2.index}", names[b2.label], b2.samples[:150], t[:150]),
        Stretch("s10", f"rec{c1.index}", names[c1.label], c1.samples[:150], t[:150]),
        Stretch("s10", f"rec{c2.index}", names[c2.label], c2.samples[:150], t[:150]),
    ]


def write_csv(path: Path, stretches: list[Stretch]) -> dict[tuple[str, int], int]:
    """Rows of s10 interleaved with those of s04 (a user's rows need not be contiguous). Returns the CSV line
    of each (user, row within that user)."""
    rows: dict[str, list[list[str]]] = {}
    for s in stretches:
        for values, t in zip(s.samples, s.times, strict=True):
            # repr of a float32 widened to float64 reads back as the very same float32
            rows.setdefault(s.user, []).append([s.user, s.label, s.session, repr(float(t))]
                                               + [repr(float(v)) for v in values])
    order = []
    for k in range(0, 300, 30):
        order += [("s04", i) for i in range(k, k + 30)] + [("s10", i) for i in range(k, k + 30)]
    order += [("s05", i) for i in range(len(rows["s05"]))]
    lines = {}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "activity", "recording", "time_s", *CHANNELS])
        for n, (user, i) in enumerate(order):
            w.writerow(rows[user][i])
            lines[(user, i)] = n + 2
    return lines


def expected_windows(stretches: list[Stretch], user: str, length: int, stride: int,
                     classes: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    xs, ys, ts, sessions = [], [], [], []
    for s in (s for s in stretches if s.user == user):
        starts = window_starts(s.samples.shape[0], length, stride)
        xs.append(s.samples[starts[:, None] + np.arange(length)])
        ys.append(np.full(starts.size, classes.index(s.label)))
        ts.append(s.times[starts])
        sessions.append([s.session] * starts.size)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ts), np.concatenate(sessions)


CSV_ARGS: dict[str, Any] = {"user_column": "user", "label_column": "activity", "channel_columns": CHANNELS,
                            "window_length": 50, "stride": 20, "sample_rate_hz": RATE, "session_column": "recording",
                            "time_column": "time_s",
                            "roles": {"pretrain": ["s04"], "federate": ["s05"], "holdout": ["s10"]}}


def test_csv_import_gives_the_windows_computed_directly_from_the_samples(dataset: WatchDataset,
                                                                        tmp_path: Path) -> None:
    stretches = real_stretches(dataset)
    write_csv(tmp_path / "imu.csv", stretches)
    ds = import_csv(tmp_path / "imu.csv", tmp_path / "out", **CSV_ARGS, license="BSD-3-Clause")
    classes = ds.card.class_names
    assert classes == tuple(sorted({s.label for s in stretches}))
    assert ds.card.roles.federate == ("s05",) and ds.card.name == "imu"
    # sessions named in the file are numbered in the order they first appear in it
    with open(tmp_path / "imu.csv", newline="") as fh:
        first_seen = list(dict.fromkeys(row["recording"] for row in csv.DictReader(fh)))
    assert first_seen[:2] == ["morning", stretches[5].session]  # s10's rows come between s04's
    for user in ("s04", "s05", "s10"):
        x, y, t, session_names = expected_windows(stretches, user, 50, 20, classes)
        got = ds.users[user]
        np.testing.assert_array_equal(got.x, x)
        np.testing.assert_array_equal(got.y, y)
        np.testing.assert_array_equal(got.t, t)
        np.testing.assert_array_equal(got.session, [first_seen.index(n) for n in session_names])
    s04, s05 = ds.users["s04"], ds.users["s05"]
    assert len(s04) == 2 * 6 and set(s04.y.tolist()) == {classes.index(s.label) for s in stretches[:2]}
    assert len(s05) == 2 + 1 + 6  # 70 samples -> 2 windows, 60 -> 1: none spans the lost samples
    last_sample = s05.t[:3] + 49 / RATE
    assert np.all((last_sample < 1.4) | (s05.t[:3] >= 1.8))  # the lost samples 70-89 are 1.4 s to 1.8 s


def test_csv_errors_name_the_file_line_and_column(dataset: WatchDataset, tmp_path: Path) -> None:
    stretches = real_stretches(dataset)
    good = tmp_path / "imu.csv"
    lines = write_csv(good, stretches)
    text = good.read_text().splitlines()

    def refused(mutate: Any, *fragments: str, **args: Any) -> None:
        bad = tmp_path / "bad.csv"
        rows = list(text)
        mutate(rows)
        bad.write_text("\n".join(rows) + "\n")
        with pytest.raises(UserDataError) as err:
            import_csv(bad, tmp_path / "never", **{**CSV_ARGS, **args})
        for fragment in (str(bad), *fragments):
            assert fragment in str(err.value), str(err.value)
        assert not (tmp_path / "never").exists()

    line = lines[("s05", 40)]

    def set_field(column: int, value: str) -> Any:
        def mutate(rows: list[str]) -> None:
            fields = rows[line - 1].split(",")
            fields[column] = value
            rows[line - 1] = ",".join(fields)
        return mutate

    refused(set_field(5, "abc"), f"line {line}, column 'ay'", "'abc' is not a number")
    refused(set_field(4, "nan"), f"line {line}, column 'ax'", "'nan' is not a finite float32 number")
    refused(set_field(9, ""), f"line {line}, column 'wz'", "'' is not a number")
    refused(set_field(3, "0.5"), f"line {line}, column 'time_s'", "before the previous row")
    refused(set_field(1, "JUMP"), f"line {line}", "label 'JUMP' is not in class_names",
            class_names=dataset.class_names)
    refused(lambda rows: rows.__setitem__(line - 1, rows[line - 1] + ",7"), f"line {line}",
            "11 fields, the header has 10")
    refused(lambda rows: None, "column 'gyro_z'", "the header is missing", "header: user, activity",
            channel_columns=(*CHANNELS[:5], "gyro_z"))
    refused(lambda rows: None, "user(s) ['s10'] are in the file but in no role",
            roles={"pretrain": ["s04"], "federate": ["s05"]})
    refused(lambda rows: None, "user 's04' yields no window", "longest stretch of one label is 150 samples",
            window_length=151)
