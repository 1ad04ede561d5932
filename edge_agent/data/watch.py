"""Loader for the smartwatch shoulder-exercise recordings shipped in the seglearn 1.2.5 wheel.

10 subjects, 6-axis IMU (accelerometer + gyroscope) at 50 Hz, 7 exercises, each performed with the
left and the right arm: 140 recordings. We read the file directly instead of importing seglearn,
which needs scipy/scikit-learn/pandas that a device should not carry. `edge-fl data fetch`
(edge_agent/data/fetch.py) puts the one file in the user's data directory without installing seglearn.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fetch import WATCH_REQUIREMENT, fetched_watch_dataset

DATASET_ENV = "EDGEFL_WATCH_DATASET"
SAMPLE_RATE_HZ = 50
INSTALL_HINT = (
    f"run `edge-fl data fetch` (downloads the pinned {WATCH_REQUIREMENT} wheel with pip and keeps only the "
    f"recordings; scripts/setup does this), or `pip install --no-deps {WATCH_REQUIREMENT}`, "
    f"or point {DATASET_ENV} at a copy of watch_dataset.npy"
)


class DatasetError(RuntimeError):
    """The recordings are missing or not in the expected layout."""


@dataclass(frozen=True)
class Recording:
    """One continuous recording of one exercise by one subject."""

    index: int
    subject: int
    label: int
    side: int
    samples: np.ndarray  # (n_samples, 6) float32


@dataclass(frozen=True)
class WatchDataset:
    recordings: tuple[Recording, ...]
    class_names: tuple[str, ...]
    channel_names: tuple[str, ...]
    sample_rate_hz: int = SAMPLE_RATE_HZ

    @property
    def subjects(self) -> tuple[int, ...]:
        return tuple(sorted({r.subject for r in self.recordings}))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def locate_watch_dataset(path: str | os.PathLike[str] | None = None) -> Path:
    """Find watch_dataset.npy: explicit path, else $EDGEFL_WATCH_DATASET, else the user's data directory
    (`edge-fl data fetch`), then an installed seglearn wheel."""
    candidates: list[Path] = []
    if path is not None:
        candidates.append(Path(path))
    elif os.environ.get(DATASET_ENV):
        candidates.append(Path(os.environ[DATASET_ENV]))
    else:
        candidates.append(fetched_watch_dataset())
        # find_spec locates the package without executing its __init__ (which imports scipy).
        spec = importlib.util.find_spec("seglearn")
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidates.append(Path(location) / "data" / "watch_dataset.npy")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetError(f"watch_dataset.npy not found (looked in: {looked}); {INSTALL_HINT}")


def load_watch_dataset(path: str | os.PathLike[str] | None = None) -> WatchDataset:
    file = locate_watch_dataset(path)
    try:
        # The file is a pickled dict inside an .npy (that is how seglearn ships it). We only ever
        # open it from the pinned wheel, checked by sha256 (edge-fl data fetch) or installed by pip, or from
        # a path the user named; never straight from the network.
        raw = np.load(file, allow_pickle=True).item()
    except Exception as exc:  # numpy raises several types for a damaged file
        raise DatasetError(f"{file}: cannot read the recordings ({exc}); reinstall: {INSTALL_HINT}") from exc
    expected = {"X", "y", "subject", "side", "y_labels", "X_labels"}
    if not isinstance(raw, dict) or not expected <= set(raw):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DatasetError(f"{file}: expected keys {sorted(expected)}, found {found}")
    lengths = {k: len(raw[k]) for k in ("X", "y", "subject", "side")}
    if len(set(lengths.values())) != 1:
        raise DatasetError(f"{file}: the per-recording arrays differ in length: {lengths}")
    recordings = []
    for i, (x, y, subject, side) in enumerate(zip(raw["X"], raw["y"], raw["subject"], raw["side"], strict=True)):
        samples = np.asarray(x, dtype=np.float32)
        if samples.ndim != 2 or samples.shape[1] != len(raw["X_labels"]):
            raise DatasetError(f"{file}: recording {i} has shape {samples.shape}, expected (n, 6)")
        recordings.append(Recording(i, int(subject), int(y), int(side), samples))
    return WatchDataset(
        recordings=tuple(recordings),
        class_names=tuple(str(s).strip() for s in raw["y_labels"]),
        channel_names=tuple(str(s).strip() for s in raw["X_labels"]),
    )
