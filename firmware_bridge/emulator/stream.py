"""The emulated MCU's sensor: which windows it streams, their ids and labels, and when.

A subject's real IMU windows (the test split by default) in order, round and round, as int16 with one
fixed scale (an IMU's full-scale range is fixed); window ids count up from 0 and wrap at 2^32; labels
go along only when the stream is labelled (-1 otherwise). Pure apart from loading the recordings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..messages import SensorWindow, choose_scale, window_to_int16


@dataclass(frozen=True)
class StreamedWindow:
    msg: SensorWindow
    index: int  # into the subject's windows
    label: int  # what the message carries: the true label, or -1 in an unlabelled stream


class SensorStream:
    """Windows (n, samples, channels) and labels in, one SENSOR_WINDOW at a time out, every `interval` s."""

    def __init__(self, windows_x: np.ndarray, windows_y: np.ndarray, *, interval: float,
                 labelled: bool = True) -> None:
        if len(windows_x) == 0:
            raise ValueError("a sensor stream needs at least one window")
        self.windows_x, self.windows_y = windows_x, windows_y
        self.labelled = labelled
        self.interval = interval
        self.scale = choose_scale(windows_x)  # one fixed scale for the whole stream
        self._next_index = 0
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.windows_x)

    def next_window(self) -> StreamedWindow:
        i = self._next_index
        self._next_index = (i + 1) % len(self.windows_x)
        wid = self._next_id
        self._next_id = (wid + 1) & 0xFFFFFFFF
        label = int(self.windows_y[i]) if self.labelled else -1
        return StreamedWindow(SensorWindow(wid, window_to_int16(self.windows_x[i], self.scale), self.scale, label),
                              i, label)

    def next_due(self, due: float, now: float) -> float:
        """When the window after the one due at `due` is due: one interval on, but never more than one
        interval behind `now` (a stream that fell behind, e.g. while frozen, does not catch up in a burst)."""
        return max(due + self.interval, now - self.interval)


def subject_windows(subject: int, *, split: str = "test", window_s: float = 2.0,
                    stride_s: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One subject's windows and labels from the bundled watch recordings (`split`: "test" or "train")."""
    from edge_agent.data.watch import load_watch_dataset
    from edge_agent.data.windows import WindowConfig, split_and_window

    train, test = split_and_window(load_watch_dataset(), WindowConfig(length_s=window_s, stride_s=stride_s))
    ws = test if split == "test" else train
    ws = ws.select(ws.subject == subject)
    if len(ws) == 0:
        raise ValueError(f"subject {subject} has no {split} windows")
    return ws.x, ws.y
