"""Per-user labelled data on disk: a small, versioned, validated directory format (docs/data-format.md).

    DIR/dataset.json          the dataset card: classes, signal layout, which users play which role
    DIR/users/<user_id>.npz   one file per user: x, y and optionally t and session (np.savez, no pickle)

`load_user_dataset` checks everything a training run relies on (the card's schema and version, files
against roles, dtypes, shapes, label range, finite values, time order) and raises `UserDataError`, whose
message names the dataset directory, the user, the file and the field, and says what to do. Nothing is
silently cast to nan or dropped. What is legal but likely to spoil an evaluation (a federated user with
one class, too few windows to split in time) is reported by `UserDataset.problems()`.

`split_in_time` cuts one user's windows into train / validation / test without leakage.

Only numpy and the standard library: a device agent reads this format.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT", "VERSION", "CARD_FILE", "USERS_DIR", "ROLES", "KINDS", "SPLIT_RULES", "UserDataError", "Roles",
    "DatasetCard", "UserData", "UserDataset", "TimeSplit", "split_in_time", "write_user_dataset",
    "load_user_dataset", "valid_user_id",
]

FORMAT = "edge-fl-userdata"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
CARD_FILE = "dataset.json"
USERS_DIR = "users"
ROLES = ("pretrain", "federate", "holdout")
KINDS = ("windows", "features")
SPLIT_RULES = ("auto", "session", "segment")
USER_ARRAYS = ("x", "y", "t", "session")
# The same alphabet and length as device ids (edge_agent/protocol.py): a user id can become a device id and
# a file name without escaping.
_USER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

_CARD_KEYS = ("format", "version", "name", "description", "license", "citation", "kind", "class_names",
              "sample_rate_hz", "channel_names", "feature_dim", "window_length", "window_stride", "roles")
_REQUIRED = ("format", "version", "name", "description", "license", "kind", "class_names", "roles")
_KIND_REQUIRED = {"windows": ("sample_rate_hz", "channel_names", "window_length", "window_stride"),
                  "features": ("feature_dim",)}
_KIND_FORBIDDEN = {"windows": ("feature_dim",), "features": ("channel_names",)}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_tmp_counter = itertools.count()


class UserDataError(ValueError):
    """The data directory (or the data about to be written to it) breaks the format; the message says where
    (directory, user, file, field) and what to do."""


def valid_user_id(user_id: str) -> bool:
    return isinstance(user_id, str) and _USER_ID.fullmatch(user_id) is not None


def _card_error(root: Path, fieldname: str, problem: str, fix: str) -> UserDataError:
    return UserDataError(f"{root / CARD_FILE}, field {fieldname!r}: {problem}; {fix}")


@dataclass(frozen=True)
class _Place:
    """Where a user's arrays come from, for messages."""

    root: Path
    user: str

    @property
    def file(self) -> str:
        return f"{USERS_DIR}/{self.user}.npz"

    def error(self, fieldname: str, problem: str, fix: str) -> UserDataError:
        return UserDataError(f"{self.root}: user {self.user!r} ({self.file}), field {fieldname!r}: {problem}; {fix}")


@dataclass(frozen=True)
class _NamedPlace(_Place):
    """A user file outside a dataset's users/ (an agent's dropped file): messages name that file."""

    where: str = ""

    def error(self, fieldname: str, problem: str, fix: str) -> UserDataError:
        return UserDataError(f"{self.where}, field {fieldname!r}: {problem}; {fix}")


# --- the card ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roles:
    """Disjoint user ids: who trains the backbone, who federates, who is held out as a never-seen user."""

    pretrain: tuple[str, ...] = ()
    federate: tuple[str, ...] = ()
    holdout: tuple[str, ...] = ()

    def all(self) -> tuple[str, ...]:
        return self.pretrain + self.federate + self.holdout

    def of(self, user_id: str) -> str:
        for role in ROLES:
            if user_id in getattr(self, role):
                return role
        raise KeyError(user_id)

    def to_json(self) -> dict[str, list[str]]:
        return {role: list(getattr(self, role)) for role in ROLES}


@dataclass(frozen=True, kw_only=True)
class DatasetCard:
    """dataset.json. Label i means class_names[i]. Windows datasets describe their signal (rate, channels,
    window length and stride in samples); features datasets their feature size, and optionally the windows
    the features were computed from (then the time split knows which neighbours overlap)."""

    name: str
    description: str
    license: str
    kind: str
    class_names: tuple[str, ...]
    roles: Roles
    citation: str | None = None
    sample_rate_hz: float | None = None
    channel_names: tuple[str, ...] | None = None
    feature_dim: int | None = None
    window_length: int | None = None
    window_stride: int | None = None
    version: int = VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one x row: (window_length, channels) or (feature_dim,)."""
        if self.kind == "windows":
            assert self.window_length is not None and self.channel_names is not None
            return (self.window_length, len(self.channel_names))
        assert self.feature_dim is not None
        return (self.feature_dim,)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": FORMAT, "version": self.version, "name": self.name,
                               "description": self.description, "license": self.license}
        if self.citation is not None:
            doc["citation"] = self.citation
        doc["kind"] = self.kind
        doc["class_names"] = list(self.class_names)
        for key in ("sample_rate_hz", "channel_names", "feature_dim", "window_length", "window_stride"):
            value = getattr(self, key)
            if value is not None:
                doc[key] = list(value) if isinstance(value, tuple) else value
        doc["roles"] = self.roles.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: object, root: Path) -> DatasetCard:
        """Parse and check a card document; errors name `root`/dataset.json and the field."""
        if not isinstance(doc, dict):
            raise _card_error(root, "(top level)", f"a JSON object is expected, found {type(doc).__name__}",
                              "see docs/data-format.md for an example card")
        unknown = sorted(set(doc) - set(_CARD_KEYS))
        if unknown:
            raise _card_error(root, unknown[0], f"unknown key(s) {unknown}",
                              f"the known keys are {', '.join(_CARD_KEYS)} (check the spelling)")
        if doc.get("format") != FORMAT:
            raise _card_error(root, "format", f"{doc.get('format')!r} is not {FORMAT!r}",
                              "this directory is not an edge-fl user dataset, or its card is damaged")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise _card_error(root, "version", f"{version!r} is not an integer", f"write \"version\": {VERSION}")
        if version not in SUPPORTED_VERSIONS:
            newer = version > max(SUPPORTED_VERSIONS)
            raise _card_error(root, "version", f"version {version} is not supported (this edge-fl reads "
                              f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
                              "upgrade edge-fl" if newer else f"rewrite the card as version {VERSION}")
        missing = [k for k in _REQUIRED if k not in doc]
        if missing:
            raise _card_error(root, missing[0], f"required key(s) {missing} missing",
                              "see docs/data-format.md for what each means")
        kind = doc["kind"]
        if kind not in KINDS:
            raise _card_error(root, "kind", f"{kind!r} is not one of {list(KINDS)}",
                              "\"windows\" for raw signal windows, \"features\" for pre-computed feature vectors")
        missing = [k for k in _KIND_REQUIRED[kind] if doc.get(k) is None]
        if missing:
            raise _card_error(root, missing[0], f"required for kind {kind!r} but missing",
                              f"a {kind} card needs {', '.join(_KIND_REQUIRED[kind])}")
        extra = [k for k in _KIND_FORBIDDEN[kind] if doc.get(k) is not None]
        if extra:
            raise _card_error(root, extra[0], f"not allowed for kind {kind!r}", "remove it (or change kind)")
        card = cls(
            name=_text(doc, "name", root, empty_ok=False),
            description=_text(doc, "description", root, empty_ok=True),
            license=_text(doc, "license", root, empty_ok=False),
            citation=None if doc.get("citation") is None else _text(doc, "citation", root, empty_ok=False),
            kind=kind,
            class_names=_names(doc, "class_names", root, minimum=2),
            sample_rate_hz=_positive_number(doc, "sample_rate_hz", root),
            channel_names=None if doc.get("channel_names") is None else _names(doc, "channel_names", root, 1),
            feature_dim=_positive_int(doc, "feature_dim", root),
            window_length=_positive_int(doc, "window_length", root),
            window_stride=_positive_int(doc, "window_stride", root),
            roles=_roles(doc["roles"], root),
            version=version,
        )
        return card


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(doc: dict[str, Any], key: str, root: Path, *, empty_ok: bool) -> str:
    value = doc[key]
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise _card_error(root, key, f"{value!r} is not a {'' if empty_ok else 'non-empty '}string",
                          "write a JSON string" + ("" if key != "license" else
                                                   " (an SPDX id such as \"CC-BY-4.0\", or \"unknown\")"))
    return value


def _names(doc: dict[str, Any], key: str, root: Path, minimum: int) -> tuple[str, ...]:
    value = doc[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _card_error(root, key, f"{value!r} is not a list of non-empty strings",
                          "write e.g. [\"walk\", \"run\"]")
    if len(value) < minimum:
        raise _card_error(root, key, f"{len(value)} name(s), at least {minimum} needed",
                          "a classifier needs two classes or more" if key == "class_names" else "name each channel")
    dupes = sorted({v for v in value if value.count(v) > 1})
    if dupes:
        raise _card_error(root, key, f"duplicate name(s) {dupes}", "every name must be unique")
    return tuple(value)


def _positive_int(doc: dict[str, Any], key: str, root: Path) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise _card_error(root, key, f"{value!r} is not a positive integer", "give a count of samples or features")
    return int(value)


def _positive_number(doc: dict[str, Any], key: str, root: Path) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)) or not math.isfinite(value) \
            or value <= 0:
        raise _card_error(root, key, f"{value!r} is not a positive number", "give the sampling rate in Hz")
    return float(value)


def _roles(value: object, root: Path) -> Roles:
    if not isinstance(value, dict):
        raise _card_error(root, "roles", f"{value!r} is not an object",
                          "write {\"pretrain\": [...], \"federate\": [...], \"holdout\": [...]}")
    unknown = sorted(set(value) - set(ROLES))
    if unknown:
        raise _card_error(root, "roles", f"unknown role(s) {unknown}", f"the roles are {', '.join(ROLES)}")
    lists: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for role in ROLES:
        ids = value.get(role, [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise _card_error(root, f"roles.{role}", f"{ids!r} is not a list of user ids", "write [\"u01\", ...]")
        for uid in ids:
            if not valid_user_id(uid):
                raise _card_error(root, f"roles.{role}", f"user id {uid!r} is not 1-64 characters of "
                                  "[A-Za-z0-9._-]", "rename the user (and its file users/<id>.npz)")
            if uid in seen:
                where = f"roles.{seen[uid]}" + ("" if seen[uid] == role else f" and roles.{role}")
                raise _card_error(root, f"roles.{role}", f"user {uid!r} is listed twice ({where})",
                                  "give every user exactly one role")
            seen[uid] = role
        lists[role] = tuple(ids)
    if not lists["federate"]:
        raise _card_error(root, "roles.federate", "no federated user", "name at least one user in roles.federate")
    return Roles(**lists)


# --- one user's arrays ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class UserData:
    """One user's windows (or feature vectors) in time order. x: float32 [n, window_length, channels] or
    [n, feature_dim]; y: int64 [n]; t: float64 [n] window start in seconds (optional); session: int64 [n]
    (optional; each session's windows are contiguous)."""

    user_id: str
    x: np.ndarray
    y: np.ndarray
    t: np.ndarray | None = None
    session: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"x": self.x, "y": self.y}
        if self.t is not None:
            out["t"] = self.t
        if self.session is not None:
            out["session"] = self.session
        return out

    def sessions(self) -> np.ndarray:
        """Session ids in the order they first appear (time order); one pseudo-session 0 if there are none."""
        if self.session is None:
            return np.zeros(1, np.int64)
        _, first = np.unique(self.session, return_index=True)
        return np.asarray(self.session[np.sort(first)])

    def select(self, index: np.ndarray) -> UserData:
        return UserData(self.user_id, self.x[index], self.y[index],
                        None if self.t is None else self.t[index],
                        None if self.session is None else self.session[index])


def _check_user(card: DatasetCard, arrays: Mapping[str, Any], place: _Place) -> UserData:
    """Validate one user's arrays against the card; return them with the format's dtypes."""
    unknown = sorted(set(arrays) - set(USER_ARRAYS))
    if unknown:
        raise place.error(unknown[0], f"unknown array(s) {unknown}",
                          f"a user file holds only {', '.join(USER_ARRAYS)} (t and session optional)")
    for name in ("x", "y"):
        if name not in arrays or arrays[name] is None:
            raise place.error(name, "missing", "every user file needs x (the windows) and y (their labels)")
    x = _as_array(arrays["x"], "x", place)
    n = _check_x_shape(card, x, place)
    x = _finite_float32(x, place)
    y = _labels(_as_array(arrays["y"], "y", place), n, card, place)
    session = None
    if arrays.get("session") is not None:
        session = _sessions(_as_array(arrays["session"], "session", place), n, place)
    t = None
    if arrays.get("t") is not None:
        t = _times(_as_array(arrays["t"], "t", place), n, session, place)
    return UserData(place.user, x, y, t, session)


def _as_array(value: Any, name: str, place: _Place) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:  # ragged lists
            raise place.error(name, f"not an array ({exc})", "give a numpy array of one shape") from None
    if arr.dtype.kind not in "biuf":
        raise place.error(name, f"dtype {arr.dtype} holds no numbers", "store numeric arrays (never objects)")
    return arr


def _check_x_shape(card: DatasetCard, x: np.ndarray, place: _Place) -> int:
    if x.dtype.kind != "f":
        raise place.error("x", f"dtype {x.dtype}, floating point expected",
                          "scale to physical units and store x.astype(np.float32)")
    expected = card.sample_shape()
    layout = ("[n, window_length, channels]" if card.kind == "windows" else "[n, feature_dim]")
    if x.ndim != 1 + len(expected) or tuple(x.shape[1:]) != expected:
        raise place.error("x", f"shape {list(x.shape)}, expected {layout} = [n, {', '.join(map(str, expected))}] "
                          "from dataset.json", "rewindow the data or fix window_length / channel_names / "
                          "feature_dim in dataset.json")
    if x.shape[0] == 0:
        raise place.error("x", "no windows (n = 0)", "remove the user from dataset.json's roles and delete the file")
    return int(x.shape[0])


def _first_bad(bad: np.ndarray) -> tuple[int, int]:
    """(how many, first window index) of a boolean mask over x."""
    rows = bad.reshape(bad.shape[0], -1).any(axis=1)
    return int(bad.sum()), int(np.argmax(rows))


def _finite_float32(x: np.ndarray, place: _Place) -> np.ndarray:
    bad = ~np.isfinite(x)
    if bad.any():
        count, first = _first_bad(bad)
        raise place.error("x", f"{count} non-finite value(s) (nan or inf), the first in window {first}",
                          "drop or repair those windows before writing the dataset; nothing is imputed")
    if x.dtype.itemsize > 4:  # float64 beyond the float32 range would become inf in the cast
        too_big = np.abs(x) > _FLOAT32_MAX
        if too_big.any():
            count, first = _first_bad(too_big)
            raise place.error("x", f"{count} value(s) beyond the float32 range (+-3.4e38), the first in window "
                              f"{first}", "rescale x (physical units) before writing")
    return x.astype(np.float32, copy=False)


def _vector(arr: np.ndarray, name: str, n: int, place: _Place) -> None:
    if arr.ndim != 1 or arr.shape[0] != n:
        raise place.error(name, f"shape {list(arr.shape)}, expected [{n}] (one value per window of x)",
                          "give one value per window, in the order of x")


def _labels(y: np.ndarray, n: int, card: DatasetCard, place: _Place) -> np.ndarray:
    _vector(y, "y", n, place)
    if y.dtype.kind not in "iu":
        raise place.error("y", f"dtype {y.dtype}, integer class indices expected",
                          "store y.astype(np.int64), label i meaning class_names[i]")
    out = (y < 0) | (y >= card.num_classes)
    if out.any():
        first = int(np.argmax(out))
        raise place.error("y", f"{int(out.sum())} label(s) outside 0..{card.num_classes - 1} (class_names has "
                          f"{card.num_classes} entries), the first {int(y[first])} at window {first}",
                          "relabel, or add the missing class to class_names in dataset.json")
    return y.astype(np.int64, copy=False)


def _sessions(session: np.ndarray, n: int, place: _Place) -> np.ndarray:
    _vector(session, "session", n, place)
    if session.dtype.kind not in "iu":
        raise place.error("session", f"dtype {session.dtype}, integer session ids expected",
                          "number the sessions (recordings) 0, 1, 2, ... and store them as int64")
    if session.dtype == np.uint64 and session.max() > np.iinfo(np.int64).max:
        raise place.error("session", "ids beyond the int64 range", "number the sessions 0, 1, 2, ...")
    session = session.astype(np.int64, copy=False)
    starts = np.flatnonzero(np.r_[True, session[1:] != session[:-1]])
    blocks = session[starts]
    if np.unique(blocks).size != blocks.size:
        seen: set[int] = set()
        for start, sid in zip(starts, blocks, strict=True):
            if int(sid) in seen:
                raise place.error("session", f"session {int(sid)} comes back at window {int(start)} after "
                                  "another session", "order the windows by session, then by time")
            seen.add(int(sid))
    return session


def _times(t: np.ndarray, n: int, session: np.ndarray | None, place: _Place) -> np.ndarray:
    _vector(t, "t", n, place)
    if t.dtype.kind == "b":
        raise place.error("t", "dtype bool, times in seconds expected", "store window start times as float64")
    t = t.astype(np.float64, copy=False)
    bad = ~np.isfinite(t)
    if bad.any():
        raise place.error("t", f"{int(bad.sum())} non-finite time(s), the first at window {int(np.argmax(bad))}",
                          "give every window its start time in seconds")
    back = np.diff(t) < 0
    if session is not None:
        back &= session[1:] == session[:-1]  # time may restart with each session
    if back.any():
        i = int(np.argmax(back)) + 1
        raise place.error("t", f"time goes back at window {i} ({t[i - 1]!r} s, then {t[i]!r} s)"
                          + (" within a session" if session is not None else ""),
                          "sort each session's windows by time (or give separate recordings separate session ids)")
    return t


# --- the dataset ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeSplit:
    """Indices into one user's windows. `rule` is how it was cut; `dropped` counts windows left out because
    they overlap the other side of a cut."""

    rule: str
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    dropped: int


@dataclass(frozen=True)
class UserDataset:
    card: DatasetCard
    users: Mapping[str, UserData]  # in the card's role order: pretrain, federate, holdout
    path: Path | None = None

    def role_of(self, user_id: str) -> str:
        return self.card.roles.of(user_id)

    def in_role(self, role: str) -> tuple[UserData, ...]:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
        return tuple(self.users[u] for u in getattr(self.card.roles, role))

    def time_splits(self, user_ids: Iterable[str] | None = None, *, test_fraction: float = 0.3,
                    validation_fraction: float = 0.0, rule: str = "auto") -> dict[str, TimeSplit]:
        """`split_in_time` for several users (default: the federated ones) with ONE rule for all: "auto"
        picks "session" only if every one of them can be split by session, else "segment" for all, so that
        every client is scored the same way."""
        ids = tuple(self.card.roles.federate if user_ids is None else user_ids)
        if rule == "auto":
            fits = all(_session_split_fits(self.users[u], test_fraction, validation_fraction) for u in ids)
            rule = "session" if fits else "segment"
        return {u: split_in_time(self.users[u], self.card, test_fraction=test_fraction,
                                 validation_fraction=validation_fraction, rule=rule) for u in ids}

    def problems(self, *, min_windows: int = 20, test_fraction: float = 0.3) -> list[str]:
        """Legal but suspicious: what would make a federated or held-out user's scores meaningless. One line
        each, for the command line to print (or refuse on)."""
        found: list[str] = []
        names = self.card.class_names
        for role in ("federate", "holdout"):
            for u in self.in_role(role):
                classes = np.unique(u.y)
                if classes.size < 2:
                    found.append(f"user {u.user_id!r} ({role}): windows of one class only ({names[classes[0]]!r})")
                if len(u) < min_windows:
                    found.append(f"user {u.user_id!r} ({role}): only {len(u)} windows (fewer than {min_windows})")
        for uid, split in self.time_splits(test_fraction=test_fraction).items():
            for part in ("train", "test"):
                if getattr(split, part).size == 0:
                    found.append(f"user {uid!r} (federate): no {part} windows after the time split "
                                 f"(rule {split.rule}, test fraction {test_fraction}); it cannot be scored")
        present = set(np.unique(np.concatenate([u.y for u in self.users.values()])).tolist())
        fed = set(np.unique(np.concatenate([u.y for u in self.in_role("federate")])).tolist())
        for i, name in enumerate(names):
            if i not in present:
                found.append(f"class {name!r} (label {i}) has no window in any user file")
            elif i not in fed:
                found.append(f"class {name!r} (label {i}) has no window among the federated users")
        return found

    def describe(self) -> str:
        """A short human summary, then the problems."""
        c = self.card
        shape = "x".join(map(str, c.sample_shape()))
        head = [f"{c.name} (format {FORMAT} v{c.version}, {c.kind} {shape}, {c.num_classes} classes: "
                f"{', '.join(c.class_names)})"]
        if c.kind == "windows":
            head.append(f"  {c.sample_rate_hz:g} Hz, channels {', '.join(c.channel_names or ())}, window "
                        f"{c.window_length} samples, stride {c.window_stride}")
        for role in ROLES:
            users = self.in_role(role)
            head.append(f"  {role}: {len(users)} user(s), {sum(len(u) for u in users)} windows")
            for u in users:
                sessions = "" if u.session is None else f", {u.sessions().size} session(s)"
                head.append(f"    {u.user_id}: {len(u)} windows, {np.unique(u.y).size} classes{sessions}")
        issues = self.problems()
        head += ["problems:", *(f"  - {p}" for p in issues)] if issues else ["problems: none"]
        return "\n".join(head)


# --- the time split ---------------------------------------------------------------------------------------


def _session_counts(k: int, test_fraction: float, validation_fraction: float) -> tuple[int, int, int] | None:
    """(train, validation, test) numbers of whole sessions, or None when k sessions are too few."""
    n_test = max(1, round(k * test_fraction))
    n_val = max(1, round(k * validation_fraction)) if validation_fraction > 0 else 0
    n_train = k - n_test - n_val
    return (n_train, n_val, n_test) if n_train >= 1 else None


def _session_parts(user: UserData, counts: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    order = user.sessions()
    assert user.session is not None
    n_train, n_val, _ = counts
    groups = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    return tuple(np.flatnonzero(np.isin(user.session, g)) for g in groups)


def _session_split_fits(user: UserData, test_fraction: float, validation_fraction: float) -> bool:
    """Whole sessions can be held out, and every part still holds every class the user has."""
    if user.session is None:
        return False
    counts = _session_counts(user.sessions().size, test_fraction, validation_fraction)
    if counts is None:
        return False
    classes = set(np.unique(user.y).tolist())
    train, val, test = _session_parts(user, counts)
    parts = (train, val, test) if validation_fraction > 0 else (train, test)
    return all(set(np.unique(user.y[p]).tolist()) == classes for p in parts)


def window_positions(user: UserData, card: DatasetCard) -> tuple[np.ndarray, float]:
    """Each window's start and every window's length, in one unit, to tell which windows overlap."""
    length, stride, rate = card.window_length, card.window_stride, card.sample_rate_hz
    if user.t is not None and length is not None and rate is not None:
        return user.t, length / rate
    if length is not None and stride is not None:
        # Consecutive windows of a run are `stride` samples apart (an underestimate if there were gaps: safe).
        return np.arange(len(user), dtype=np.float64) * stride, float(length)
    return np.arange(len(user), dtype=np.float64), 1.0  # nothing known: windows taken as disjoint


def split_in_time(user: UserData, card: DatasetCard, *, test_fraction: float = 0.3,
                  validation_fraction: float = 0.0, rule: str = "auto") -> TimeSplit:
    """Cut one user's windows in time: train earliest, then validation, then test; no window of one part
    shares a sample with a window of another.

    rule "session": whole sessions; the last round(k * test_fraction) (at least one) are test, the ones
    before them validation. rule "segment": every run of consecutive windows with the same session and label
    is cut on its own at the fractions of its time span (so every class is in every part, as the bundled
    recordings are cut today), and windows straddling a cut are dropped. rule "auto": "session" when the user
    has enough sessions and every part keeps every class of the user, else "segment".
    """
    if rule not in SPLIT_RULES:
        raise ValueError(f"unknown split rule {rule!r}; choose one of {', '.join(SPLIT_RULES)}")
    if not (0 < test_fraction < 1 and 0 <= validation_fraction < 1 and test_fraction + validation_fraction < 1):
        raise ValueError(f"fractions test {test_fraction}, validation {validation_fraction}: each in [0, 1), "
                         "test > 0, and together below 1")
    if rule == "auto":
        rule = "session" if _session_split_fits(user, test_fraction, validation_fraction) else "segment"
    if rule == "session":
        counts = None if user.session is None else _session_counts(user.sessions().size, test_fraction,
                                                                      validation_fraction)
        if counts is None:
            have = 0 if user.session is None else user.sessions().size
            raise ValueError(f"user {user.user_id!r}: {have} session(s), too few to hold whole sessions out "
                             f"(test {test_fraction}, validation {validation_fraction}); use rule 'segment'")
        train, val, test = _session_parts(user, counts)
        return TimeSplit("session", train, val, test, 0)
    return _split_by_segment(user, card, test_fraction, validation_fraction)


def _split_by_segment(user: UserData, card: DatasetCard, test_fraction: float,
                      validation_fraction: float) -> TimeSplit:
    start, length = window_positions(user, card)
    end = start + length
    key_change = user.y[1:] != user.y[:-1]
    if user.session is not None:
        key_change |= user.session[1:] != user.session[:-1]
    bounds = np.r_[0, np.flatnonzero(key_change) + 1, len(user)]
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for lo, hi in itertools.pairwise(bounds):
        idx = np.arange(lo, hi)
        for part, mask in zip(parts, _cut_run(start[lo:hi], end[lo:hi], test_fraction, validation_fraction),
                              strict=True):
            part.append(idx[mask])
    train, val, test = (np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts)
    # Runs cut from one continuous stretch (windows labelled by majority, say) can overlap their neighbours:
    # a window kept for an earlier part must not share samples with a later part's window of another run.
    val = without_overlap(val, test, start, length, user.session)
    train = without_overlap(train, np.concatenate([val, test]), start, length, user.session)
    return TimeSplit("segment", train, val, test, len(user) - train.size - val.size - test.size)


def without_overlap(keep: np.ndarray, later: np.ndarray, start: np.ndarray, length: float,
                     session: np.ndarray | None) -> np.ndarray:
    """`keep` minus the windows that share samples with a window of `later` in the same session."""
    if keep.size == 0 or later.size == 0:
        return keep
    eps = 1e-9 * max(1.0, float(np.abs(start).max()) + length)
    sessions = np.zeros(start.size, np.int64) if session is None else session
    clash = np.zeros(keep.size, bool)
    for sid in np.unique(sessions[keep]):
        mine = sessions[keep] == sid
        other = np.sort(start[later[sessions[later] == sid]])
        s = start[keep[mine]]
        # equal lengths: two windows overlap iff their starts are less than one length apart
        lo = np.searchsorted(other, s - length + eps, side="left")
        hi = np.searchsorted(other, s + length - eps, side="right")
        clash[np.flatnonzero(mine)] = hi > lo
    return keep[~clash]


def _cut_run(s: np.ndarray, e: np.ndarray, test_fraction: float,
             validation_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks (train, validation, test) over one run of windows starting at s and ending at e. Test: the windows
    starting after the test cut; validation: those after the validation cut that end before the first test
    window starts; train: those ending before the first validation (else test) window starts. Only windows
    that would share samples with a later part are dropped: ceil(length / stride) - 1 per cut on a regular
    grid."""
    first, last = float(s[0]), float(e[-1])
    eps = 1e-9 * max(1.0, abs(last))  # t in seconds is not exact: 0.02 * k
    span = last - first
    cut_test = first + (1.0 - test_fraction) * span
    cut_val = first + (1.0 - test_fraction - validation_fraction) * span
    test = s >= cut_test - eps
    test_from = float(s[test].min()) if test.any() else cut_test
    val = (s >= cut_val - eps) & (e <= test_from + eps) if validation_fraction > 0 else np.zeros(s.size, bool)
    val_from = float(s[val].min()) if val.any() else test_from
    train = (e <= val_from + eps) & ~val & ~test
    return train, val, test


# --- writing and loading ----------------------------------------------------------------------------------


def _check_roles_cover(card: DatasetCard, have: set[str], root: Path) -> None:
    listed = set(card.roles.all())
    for uid in card.roles.all():
        if uid not in have:
            raise _card_error(root, f"roles.{card.roles.of(uid)}", f"user {uid!r} has no data "
                              f"({USERS_DIR}/{uid}.npz missing)", "add the user's file or remove the user from "
                              "the role")
    extra = sorted(have - listed)
    if extra:
        raise _card_error(root, "roles", f"user {extra[0]!r} ({USERS_DIR}/{extra[0]}.npz) has no role"
                          + (f" (nor {extra[1:]})" if len(extra) > 1 else ""),
                          f"add it to one of roles.{', roles.'.join(ROLES)}, or delete its file")


def write_user_dataset(out_dir: str | os.PathLike[str], card: DatasetCard, users: Iterable[UserData], *,
                       overwrite: bool = False, compress: bool = False) -> Path:
    """Validate, then write the directory in a temporary sibling and rename it into place, so a reader never
    sees half a dataset. A non-empty `out_dir` is replaced only with `overwrite`, and only if it holds a
    dataset card (never some other directory)."""
    out = Path(out_dir)
    card = DatasetCard.from_json(json.loads(json.dumps(card.to_json())), out)  # the loader's checks exactly
    checked: dict[str, UserData] = {}
    for u in users:
        if u.user_id in checked:
            raise _Place(out, u.user_id).error("user_id", "given twice", "pass each user once")
        if not valid_user_id(u.user_id):
            raise _Place(out, str(u.user_id)).error("user_id", "not 1-64 characters of [A-Za-z0-9._-]",
                                                    "rename the user")
        checked[u.user_id] = _check_user(card, u.arrays(), _Place(out, u.user_id))
    _check_roles_cover(card, set(checked), out)
    _refuse_to_clobber(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{next(_tmp_counter)}.tmp"
    tmp.mkdir()
    try:
        (tmp / USERS_DIR).mkdir()
        save = np.savez_compressed if compress else np.savez
        for uid in card.roles.all():
            arrays: dict[str, Any] = checked[uid].arrays()
            with open(tmp / USERS_DIR / f"{uid}.npz", "wb") as fh:
                save(fh, **arrays)
        (tmp / CARD_FILE).write_text(json.dumps(card.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        _swap_in(tmp, out)
    except BaseException:
        import shutil  # here: only writers need it

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _refuse_to_clobber(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserDataError(f"{out}: exists and is not a directory; choose another output directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserDataError(f"{out}: exists and is not empty; choose another output directory, or allow "
                            "replacing it (overwrite=True, --force on the command line)")
    if not (out / CARD_FILE).is_file():
        raise UserDataError(f"{out}: holds no {CARD_FILE}, so it is not a dataset this writer made; refusing to "
                            "replace it even with overwrite: choose another output directory")


def _swap_in(tmp: Path, out: Path) -> None:
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    import shutil

    old = out.parent / f".{out.name}.{os.getpid()}.{next(_tmp_counter)}.old"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def read_card(root: Path) -> DatasetCard:
    """A dataset directory's card, checked (UserDataError naming the file and field if it is not valid)."""
    path = root / CARD_FILE
    if not path.is_file():
        raise UserDataError(f"{root}: no {CARD_FILE}; this is not an edge-fl user dataset (create one with "
                            "`edge-fl data import ...` or see docs/data-format.md)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise _card_error(root, "(file)", f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                          "fix the syntax") from None
    except (ValueError, OSError) as exc:  # NaN/Infinity, bad UTF-8, unreadable
        raise _card_error(root, "(file)", f"cannot be read ({exc})", "rewrite it as UTF-8 JSON, numbers finite") \
            from None
    return DatasetCard.from_json(doc, root)


def read_user_file(card: DatasetCard, path: Path, *, where: str | None = None) -> UserData:
    """One user file (an .npz of x, y and optionally t and session) checked against `card`, the user named by the
    file's stem. UserDataError names `where` (default: the dataset's `users/<id>.npz`) and the field."""
    place = _Place(path.parent.parent, path.stem) if where is None else _NamedPlace(path.parent, path.stem, where)
    return _read_user(card, path, place)


def _read_user(card: DatasetCard, path: Path, place: _Place) -> UserData:
    try:
        loaded = np.load(path, allow_pickle=False)  # never pickle: a data file must not run code
    except ValueError as exc:
        raise place.error("(file)", f"refused ({exc})", "store plain numeric arrays with np.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise place.error("(file)", f"cannot be read ({exc})", "rewrite it with np.savez") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise place.error("(file)", "is a single .npy array, not an .npz archive",
                          "write it with np.savez(path, x=..., y=...)")
    with loaded:
        try:
            arrays = {name: loaded[name] for name in loaded.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # object arrays, truncated members
            raise place.error("(file)", f"cannot be read ({exc})", "rewrite it with np.savez") from None
    return _check_user(card, arrays, place)


def load_user_dataset(path: str | os.PathLike[str]) -> UserDataset:
    """Read and validate a dataset directory; UserDataError on the first thing wrong."""
    root = Path(path)
    if not root.is_dir():
        raise UserDataError(f"{root}: not a directory; give the directory that holds {CARD_FILE} and {USERS_DIR}/")
    card = read_card(root)
    users_dir = root / USERS_DIR
    if not users_dir.is_dir():
        raise UserDataError(f"{root}: no {USERS_DIR}/ directory; every user needs {USERS_DIR}/<user_id>.npz")
    files: dict[str, Path] = {}
    for entry in sorted(users_dir.iterdir()):
        if entry.name.startswith("."):
            continue  # editors' and file managers' droppings
        uid = entry.name[:-4] if entry.name.endswith(".npz") else ""
        if not valid_user_id(uid) or not entry.is_file():
            raise UserDataError(f"{root}: unexpected {USERS_DIR}/{entry.name}; {USERS_DIR}/ holds only "
                                "<user_id>.npz files (user ids: 1-64 characters of [A-Za-z0-9._-]): "
                                "rename or remove it")
        files[uid] = entry
    _check_roles_cover(card, set(files), root)
    users = {uid: _read_user(card, files[uid], _Place(root, uid)) for uid in card.roles.all()}
    return UserDataset(card, users, root)
