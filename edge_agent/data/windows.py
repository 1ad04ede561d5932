"""Time split per recording, then windowing: no window ever straddles the train/test cut.

Overlapping windows cut from one stretch of signal are near-duplicates; splitting windows at random
would put copies of test windows into the training set. We cut each recording in time first (train =
earlier part, test = later part) and window each part on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .watch import WatchDataset


@dataclass(frozen=True)
class WindowConfig:
    length_s: float = 2.0
    stride_s: float = 0.5
    test_fraction: float = 0.3  # the later 30% of every recording is test data

    def samples(self, rate_hz: int) -> tuple[int, int]:
        length = round(self.length_s * rate_hz)
        stride = round(self.stride_s * rate_hz)
        if length < 1 or stride < 1:
            raise ValueError(f"window length and stride must be at least one sample, got {self}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        return length, stride


@dataclass(frozen=True)
class WindowSet:
    """Windows with their provenance; `start` and `stop` index into the source recording."""

    x: np.ndarray  # (n, length, channels) float32
    y: np.ndarray  # (n,) int64
    subject: np.ndarray  # (n,) int64
    recording: np.ndarray  # (n,) int64
    start: np.ndarray  # (n,) int64, first sample of the window
    stop: np.ndarray  # (n,) int64, one past the last sample

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def select(self, mask_or_index: np.ndarray) -> WindowSet:
        columns = (self.x, self.y, self.subject, self.recording, self.start, self.stop)
        return WindowSet(*(a[mask_or_index] for a in columns))


def window_starts(n_samples: int, length: int, stride: int) -> np.ndarray:
    if n_samples < length:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n_samples - length + 1, stride, dtype=np.int64)


def split_and_window(dataset: WatchDataset, config: WindowConfig = WindowConfig()) -> tuple[WindowSet, WindowSet]:
    """Return (train, test) windows of every recording, cut in time before windowing."""
    length, stride = config.samples(dataset.sample_rate_hz)
    parts: dict[str, list[tuple[np.ndarray, ...]]] = {"train": [], "test": []}
    for rec in dataset.recordings:
        n = rec.samples.shape[0]
        cut = round(n * (1.0 - config.test_fraction))
        for name, lo, hi in (("train", 0, cut), ("test", cut, n)):
            starts = window_starts(hi - lo, length, stride) + lo
            if starts.size == 0:
                continue
            idx = starts[:, None] + np.arange(length)[None, :]
            k = starts.size
            parts[name].append((
                rec.samples[idx],
                np.full(k, rec.label, np.int64),
                np.full(k, rec.subject, np.int64),
                np.full(k, rec.index, np.int64),
                starts,
                starts + length,
            ))
    return _concat(parts["train"], length), _concat(parts["test"], length)


def _concat(chunks: list[tuple[np.ndarray, ...]], length: int) -> WindowSet:
    if not chunks:
        empty = np.zeros(0, np.int64)
        return WindowSet(np.zeros((0, length, 6), np.float32), empty, empty, empty, empty, empty)
    cols = list(zip(*chunks, strict=True))
    return WindowSet(*(np.concatenate(c) for c in cols))
