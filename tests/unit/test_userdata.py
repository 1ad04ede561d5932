"""The per-user data format: what is written is read back unchanged, every broken file is refused with a message
naming the directory, the user, the file and the field, and the time split never lets a test window share a
sample with a training window."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.data.userdata import (
    CARD_FILE,
    DatasetCard,
    Roles,
    UserData,
    UserDataError,
    load_user_dataset,
    split_in_time,
    write_user_dataset,
)

LENGTH, STRIDE, RATE = 8, 4, 10.0
CLASSES = ("sit", "walk", "run")


def windows_card(**changes: Any) -> DatasetCard:
    card = DatasetCard(name="probe", description="synthetic windows", license="CC0-1.0", kind="windows",
                       class_names=CLASSES, sample_rate_hz=RATE, channel_names=("ax", "ay"), window_length=LENGTH,
                       window_stride=STRIDE, roles=Roles(pretrain=("p1",), federate=("f1", "f2"), holdout=("h1",)))
    return dataclasses.replace(card, **changes)


def make_user(user_id: str, seed: int, sessions: int = 2, run: int = 10) -> UserData:
    """`sessions` recordings, each with a run of `run` consecutive windows of every class, in time order; like
    windows cut from each stretch of one label, a run's last window ends where the next run's first begins."""
    rng = np.random.default_rng(seed)
    per_session = run * len(CLASSES)
    n = sessions * per_session
    y = np.tile(np.repeat(np.arange(len(CLASSES)), run), sessions)
    run_span = ((run - 1) * STRIDE + LENGTH) / RATE
    in_run = np.arange(run) * STRIDE / RATE
    t = np.tile(np.concatenate([r * run_span + in_run for r in range(len(CLASSES))]), sessions)
    session = np.repeat(np.arange(sessions) + 10, per_session)
    x = rng.normal(size=(n, LENGTH, 2)).astype(np.float32)
    return UserData(user_id, x, y.astype(np.int64), t, session.astype(np.int64))


def write_probe(root: Path, **card_changes: Any) -> Path:
    users = [make_user(u, i) for i, u in enumerate(("p1", "f1", "f2", "h1"))]
    return write_user_dataset(root, windows_card(**card_changes), users)


def refused(root: Path, *fragments: str) -> list[str]:
    """The fragments the loader's refusal of `root` does NOT contain (the test asserts there are none)."""
    with pytest.raises(UserDataError) as err:
        load_user_dataset(root)
    return [f for f in fragments if f not in str(err.value)] + ([] if fragments else ["(nothing to look for)"])


def user_refused(root: Path, user: str, fieldname: str, *fragments: str) -> list[str]:
    """As `refused`, with the dataset, the user, its file and the field named in the message too."""
    return refused(root, str(root), f"user {user!r}", f"users/{user}.npz", f"field {fieldname!r}", *fragments)


def rewrite_user(root: Path, user: str, **arrays: Any) -> None:
    """Replace a user's file behind the writer's back, as a hand-made or damaged file would be."""
    good = dict(np.load(root / "users" / f"{user}.npz"))
    good.update(arrays)
    np.savez(root / "users" / f"{user}.npz", **{k: v for k, v in good.items() if v is not None})


def edit_card(root: Path, **changes: Any) -> None:
    doc = json.loads((root / CARD_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    (root / CARD_FILE).write_text(json.dumps(doc))


# --- round trip -------------------------------------------------------------------------------------------


def test_windows_round_trip_keeps_card_arrays_and_dtypes(tmp_path: Path) -> None:
    users = [make_user(u, i) for i, u in enumerate(("p1", "f1", "f2", "h1"))]
    card = windows_card(citation="A. Author, Some Journal 2024")
    write_user_dataset(tmp_path / "ds", card, users)
    ds = load_user_dataset(tmp_path / "ds")
    assert ds.card == card
    assert list(ds.users) == ["p1", "f1", "f2", "h1"]
    for u in users:
        got = ds.users[u.user_id]
        for name in ("x", "y", "t", "session"):
            np.testing.assert_array_equal(getattr(got, name), getattr(u, name))
        assert (got.x.dtype, got.y.dtype, got.t.dtype, got.session.dtype) == (np.float32, np.int64, np.float64,
                                                                              np.int64)
    assert ds.role_of("h1") == "holdout" and [u.user_id for u in ds.in_role("federate")] == ["f1", "f2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary directory left behind
    assert sorted(p.name for p in (tmp_path / "ds" / "users").iterdir()) == ["f1.npz", "f2.npz", "h1.npz", "p1.npz"]


def test_features_round_trip_without_optional_arrays_and_casts_to_the_format_dtypes(tmp_path: Path) -> None:
    card = DatasetCard(name="emb", description="", license="unknown", kind="features", class_names=("a", "b"),
                       feature_dim=5, roles=Roles(federate=("u1",)))
    x = np.arange(20, dtype=np.float64).reshape(4, 5)
    y = np.array([0, 1, 0, 1], dtype=np.uint8)
    write_user_dataset(tmp_path / "ds", card, [UserData("u1", x, y)], compress=True)
    ds = load_user_dataset(tmp_path / "ds")
    u = ds.users["u1"]
    assert u.t is None and u.session is None
    assert u.x.dtype == np.float32 and u.y.dtype == np.int64
    np.testing.assert_array_equal(u.x, x.astype(np.float32))
    np.testing.assert_array_equal(u.y, y)
    assert "channel_names" not in json.loads((tmp_path / "ds" / CARD_FILE).read_text())


def test_a_non_empty_directory_is_replaced_only_when_asked_and_only_if_it_is_a_dataset(tmp_path: Path) -> None:
    root = write_probe(tmp_path / "ds")
    with pytest.raises(UserDataError, match=r"not empty.*overwrite=True"):
        write_probe(root)
    smaller = windows_card(roles=Roles(federate=("f1",)))
    write_user_dataset(root, smaller, [make_user("f1", 7)], overwrite=True)
    assert list(load_user_dataset(root).users) == ["f1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UserDataError, match="not a dataset this writer made"):
        write_user_dataset(other, smaller, [make_user("f1", 7)], overwrite=True)
    assert (other / "cat.jpg").exists()


def test_the_writer_checks_before_it_writes_anything(tmp_path: Path) -> None:
    bad = make_user("f2", 1)
    bad.x[3, 0, 1] = np.nan
    users = [make_user("p1", 0), make_user("f1", 2), bad, make_user("h1", 3)]
    with pytest.raises(UserDataError) as err:
        write_user_dataset(tmp_path / "ds", windows_card(), users)
    assert "user 'f2' (users/f2.npz), field 'x'" in str(err.value) and "window 3" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserDataError, match="'h1' has no data"):
        write_user_dataset(tmp_path / "ds", windows_card(), [*users[:2], make_user("f2", 1)])
    assert list(tmp_path.iterdir()) == []


# --- the card ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "fieldname", "says"), [
    ({"colour": "red"}, "colour", "the known keys are format, version, name"),
    ({"format": "something-else"}, "format", "not an edge-fl user dataset"),
    ({"version": 2}, "version", "upgrade edge-fl"),
    ({"version": "1"}, "version", "not an integer"),
    ({"window_length": None}, "window_length", "required for kind 'windows'"),
    ({"feature_dim": 12}, "feature_dim", "not allowed for kind 'windows'"),
    ({"window_stride": 0}, "window_stride", "not a positive integer"),
    ({"sample_rate_hz": True}, "sample_rate_hz", "not a positive number"),
    ({"class_names": ["sit"]}, "class_names", "at least 2"),
    ({"class_names": ["sit", "walk", "sit"]}, "class_names", "duplicate name(s) ['sit']"),
    ({"channel_names": ["ax", 3]}, "channel_names", "not a list of non-empty strings"),
    ({"license": ""}, "license", "\"unknown\""),
    ({"kind": "images"}, "kind", "not one of ['windows', 'features']"),
    ({"roles": {"pretrain": ["p1"], "federate": ["f1", "f2", "p1"], "holdout": ["h1"]}}, "roles.federate",
     "user 'p1' is listed twice (roles.pretrain and roles.federate)"),
    ({"roles": {"pretrain": ["p1", "f1", "f2", "h1"], "federate": []}}, "roles.federate", "no federated user"),
    ({"roles": {"federate": ["f1", "f2"], "trainers": ["p1"]}}, "roles", "unknown role(s) ['trainers']"),
    ({"roles": {"pretrain": ["p 1"], "federate": ["f1"]}}, "roles.pretrain", "'p 1' is not 1-64 characters"),
])
def test_a_bad_card_is_refused_naming_the_field(tmp_path: Path, changes: dict[str, Any], fieldname: str,
                                                 says: str) -> None:
    root = write_probe(tmp_path / "ds")
    edit_card(root, **changes)
    assert refused(root, str(root / CARD_FILE), f"field {fieldname!r}", says) == []


def test_nan_in_the_card_is_not_a_number_it_is_an_error(tmp_path: Path) -> None:
    root = write_probe(tmp_path / "ds")
    good = (root / CARD_FILE).read_text()
    (root / CARD_FILE).write_text(good.replace('"sample_rate_hz": 10.0', '"sample_rate_hz": NaN'))
    assert refused(root, str(root / CARD_FILE), "NaN is not a number JSON allows") == []
    (root / CARD_FILE).write_text(good[:-20])
    assert refused(root, "not valid JSON", "line ") == []


def test_files_and_roles_must_match(tmp_path: Path) -> None:
    root = write_probe(tmp_path / "ds")
    os.rename(root / "users" / "h1.npz", root / "users" / "h2.npz")
    assert refused(root, "field 'roles.holdout'", "user 'h1' has no data (users/h1.npz missing)") == []
    os.rename(root / "users" / "h2.npz", root / "users" / "h1.npz")
    np.savez(root / "users" / "extra.npz", x=np.zeros((1, LENGTH, 2), np.float32), y=np.zeros(1, np.int64))
    assert refused(root, "field 'roles'", "user 'extra' (users/extra.npz) has no role",
                   "roles.pretrain, roles.federate") == []
    os.remove(root / "users" / "extra.npz")
    (root / "users" / "notes.txt").write_text("hello")
    assert refused(root, "unexpected users/notes.txt") == []
    os.remove(root / "users" / "notes.txt")
    (root / "users" / ".DS_Store").write_bytes(b"")  # hidden files are ignored
    assert len(load_user_dataset(root).users) == 4
    assert refused(tmp_path / "nowhere", "not a directory") == []
    (tmp_path / "empty").mkdir()
    assert refused(tmp_path / "empty", f"no {CARD_FILE}") == []


# --- one user's file --------------------------------------------------------------------------------------


def test_non_finite_windows_are_counted_and_located(tmp_path: Path) -> None:
    root = write_probe(tmp_path / "ds")
    x = make_user("f1", 1).x
    x[5, 2, 0], x[5, 3, 1], x[9, 0, 0] = np.nan, np.inf, -np.inf
    rewrite_user(root, "f1", x=x)
    assert user_refused(root, "f1", "x", "3 non-finite value(s) (nan or inf), the first in window 5",
                        "nothing is imputed") == []


def test_float64_beyond_float32_does_not_become_inf(tmp_path: Path) -> None:
    root = write_probe(tmp_path / "ds")
    x = make_user("f1", 1).x.astype(np.float64)
    x[4, 0, 0] = 1e39
    rewrite_user(root, "f1", x=x)
    assert user_refused(root, "f1", "x", "1 value(s) beyond the float32 range", "window 4") == []


@pytest.mark.parametrize(("user", "arrays", "fieldname", "says"), [
    ("f1", {"x": np.zeros((60, LENGTH, 3), np.float32)}, "x", "shape [60, 8, 3], expected [n, window_length, "
     "channels] = [n, 8, 2]"),
    ("f1", {"x": np.zeros((60, LENGTH, 2), np.int16)}, "x", "dtype int16, floating point expected"),
    ("h1", {"x": np.zeros((0, LENGTH, 2), np.float32), "y": np.zeros(0, np.int64), "t": None, "session": None},
     "x", "no windows (n = 0)"),
    ("f2", {"y": np.zeros(60, np.float64)}, "y", "dtype float64, integer class indices expected"),
    ("f2", {"y": np.zeros(59, np.int64)}, "y", "shape [59], expected [60]"),
    ("f2", {"y": np.r_[np.zeros(40, np.int64), np.full(20, 3)]}, "y",
     "20 label(s) outside 0..2 (class_names has 3 entries), the first 3 at window 40"),
    ("f2", {"y": np.r_[np.zeros(59, np.int64), -1]}, "y", "the first -1 at window 59"),
    ("p1", {"t": np.r_[np.arange(30.0), np.arange(30.0)][::-1].copy()}, "t", "time goes back at window 1"),
    ("p1", {"t": np.r_[np.arange(59.0), np.nan]}, "t", "1 non-finite time(s), the first at window 59"),
    ("p1", {"session": np.r_[np.zeros(20), np.ones(20), np.zeros(20)].astype(np.int64)}, "session",
     "session 0 comes back at window 40"),
    ("p1", {"session": np.zeros(60, np.float32)}, "session", "integer session ids expected"),
    ("p1", {"y": None}, "y", "missing"),
    ("p1", {"weights": np.ones(60)}, "weights", "unknown array(s) ['weights']"),
])
def test_a_bad_user_file_is_refused_naming_user_file_and_field(tmp_path: Path, user: str, arrays: dict[str, Any],
                                                                fieldname: str, says: str) -> None:
    root = write_probe(tmp_path / "ds")
    if arrays.get("y", 0) is None:
        good = dict(np.load(root / "users" / f"{user}.npz"))
        np.savez(root / "users" / f"{user}.npz", x=good["x"])
    else:
        rewrite_user(root, user, **arrays)
    assert user_refused(root, user, fieldname, says) == []


def test_time_may_restart_with_each_session(tmp_path: Path) -> None:
    root = write_probe(tmp_path / "ds")  # t runs 0.. in each of two sessions
    assert load_user_dataset(root).users["f1"].t[30] == 0.0
    rewrite_user(root, "f1", session=None)  # the same times as one session: time goes back
    assert user_refused(root, "f1", "t", "time goes back at window 30") == []


class _Payload:
    """Unpickling this would create a directory: proof of whether the loader ran pickled code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def test_a_pickled_array_is_refused_without_running_it(tmp_path: Path) -> None:
    root = write_probe(tmp_path / "ds")
    marker = tmp_path / "pwned"
    payload = np.empty(60, dtype=object)
    payload[:] = [_Payload(str(marker))] * 60
    rewrite_user(root, "f1", y=payload)
    assert b"mkdir" in (root / "users" / "f1.npz").read_bytes()  # really a pickle inside
    assert user_refused(root, "f1", "(file)", "allow_pickle=False") == []
    assert not marker.exists()


def test_a_damaged_or_foreign_file_is_refused(tmp_path: Path) -> None:
    root = write_probe(tmp_path / "ds")
    path = root / "users" / "f1.npz"
    path.write_bytes(path.read_bytes()[:200])
    assert user_refused(root, "f1", "(file)", "cannot be read") == []
    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3))
    assert user_refused(root, "f1", "(file)", "a single .npy array, not an .npz archive") == []


# --- the time split ---------------------------------------------------------------------------------------


def overlaps(a: np.ndarray, b: np.ndarray, user: UserData, duration: float) -> bool:
    """Does any window in a share a sample with a window in b (same session)?"""
    assert user.t is not None and user.session is not None
    for i in a:
        same = b[user.session[b] == user.session[i]]
        if np.any((user.t[same] < user.t[i] + duration - 1e-9) & (user.t[i] < user.t[same] + duration - 1e-9)):
            return True
    return False


def test_segment_split_keeps_every_class_in_each_part_and_drops_only_the_overlapping_windows() -> None:
    user, card = make_user("f1", 0, sessions=1, run=40), windows_card()
    split = split_in_time(user, card, test_fraction=0.25, validation_fraction=0.25, rule="segment")
    duration = LENGTH / RATE
    for a, b in [(split.train, split.validation), (split.train, split.test), (split.validation, split.test)]:
        assert not overlaps(a, b, user, duration)
    for part in (split.train, split.validation, split.test):
        assert set(user.y[part]) == {0, 1, 2}
    # within each run train comes first, then validation, then test
    for c in range(3):
        tr, va, te = (p[user.y[p] == c] for p in (split.train, split.validation, split.test))
        assert tr.max() < va.min() and va.max() < te.min()
    # windows are 2 strides long: exactly one window straddles each cut of each run
    assert split.dropped == 3 * 2
    assert split.train.size + split.validation.size + split.test.size + split.dropped == len(user)


def test_without_times_the_gap_follows_from_window_length_and_stride() -> None:
    user = make_user("f1", 0, sessions=1, run=40)
    plain = UserData("f1", user.x, user.y)
    for length, stride, dropped_per_cut in [(8, 4, 1), (8, 3, 2), (8, 8, 0), (100, 25, 3)]:
        card = windows_card(window_length=length, window_stride=stride)
        split = split_in_time(plain, card, test_fraction=0.3)
        # ceil(length / stride) - 1 at each of the 3 cuts, and as many training windows at the start of the 2
        # later runs: without t, a run may have begun right after the previous run's test windows
        assert split.rule == "segment" and split.dropped == 5 * dropped_per_cut, (length, stride)
        for c in range(3):  # consecutive windows `gap` apart share no sample
            tr, te = split.train[user.y[split.train] == c], split.test[user.y[split.test] == c]
            assert (te.min() - tr.max()) * stride >= length


def test_runs_that_overlap_their_neighbours_do_not_leak() -> None:
    user = make_user("f1", 0, sessions=1, run=40)
    # windows cut across label changes (labelled by majority): one continuous grid of starts
    glued = UserData("f1", user.x, user.y, np.arange(len(user)) * STRIDE / RATE, user.session)
    split = split_in_time(glued, windows_card(), test_fraction=0.25, validation_fraction=0.25, rule="segment")
    for a, b in [(split.train, split.validation), (split.train, split.test), (split.validation, split.test)]:
        assert not overlaps(a, b, glued, LENGTH / RATE)
    assert split.dropped == 3 * 2 + 2  # the first training window of runs 2 and 3 touched the last test window


def test_session_split_holds_out_the_last_sessions_when_each_keeps_every_class() -> None:
    user, card = make_user("f1", 0, sessions=4), windows_card()
    split = split_in_time(user, card, test_fraction=0.25, validation_fraction=0.25)
    assert split.rule == "session" and split.dropped == 0
    assert set(user.session[split.train]) == {10, 11}
    assert set(user.session[split.validation]) == {12} and set(user.session[split.test]) == {13}
    # one class per session (as in the bundled recordings): whole sessions would take classes away from test
    y = np.repeat(np.arange(3), 20)
    one_class = UserData("f1", user.x[:60], y, np.tile(np.arange(20) * STRIDE / RATE, 3), y + 10)
    assert split_in_time(one_class, card).rule == "segment"
    with pytest.raises(ValueError, match="too few to hold whole sessions out"):
        split_in_time(make_user("f1", 0, sessions=1), card, rule="session")


def test_problems_report_users_that_cannot_be_scored(tmp_path: Path) -> None:
    write_probe(tmp_path / "ds")
    assert load_user_dataset(tmp_path / "ds").problems() == []
    lonely = make_user("f2", 1).select(np.arange(3))  # 3 windows of one class
    users = [make_user("p1", 0), make_user("f1", 2), lonely, make_user("h1", 3)]
    write_user_dataset(tmp_path / "ds", windows_card(), users, overwrite=True)
    ds = load_user_dataset(tmp_path / "ds")
    found = ds.problems()
    assert "user 'f2' (federate): windows of one class only ('sit')" in found
    assert "user 'f2' (federate): only 3 windows (fewer than 20)" in found
    assert any(p.startswith("user 'f2' (federate): no test windows") for p in found)
    assert "problems:\n  - user 'f2'" in ds.describe()


def test_the_format_module_needs_only_numpy_and_the_standard_library() -> None:
    import ast
    import sys

    source = Path(__file__).resolve().parents[2] / "edge_agent" / "data" / "userdata.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import: the reader must not pull in the rest of edge-fl"
            imported.add((node.module or "").split(".")[0])
    assert imported - {"numpy"} <= set(sys.stdlib_module_names), imported
    assert "numpy" in imported
