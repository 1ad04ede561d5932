"""Label-preserving copies of labelled IMU windows, for training a head on a few labels.

A device with K labelled windows per class re-embeds a few perturbed copies of each through the frozen
backbone; the head then sees the same activity under small changes the wearer makes anyway:

- time jitter: the window starts a little earlier or later (where the cut fell in the movement);
- scaling: a little more or less vigorous (one factor per copy, or one per channel group);
- rotation: the device sits a little differently on the body: ONE random 3-D rotation per copy, applied to
  every xyz channel triplet alike, because the accelerometer and the gyroscope share the device's axes.

Time jitter mirrors the window at its edge (numpy's "reflect" padding) instead of taking samples from the
neighbouring window or wrapping around: a copy holds only samples of its own window; a mirrored stretch
keeps the local level and the local variability of the signal (edge padding would add a flat stretch, a
gyroscope reading no real movement gives, and a circular shift a jump from one end to the other); and the
sampling rate stays as it is (crop-and-resample would also change the tempo and needs interpolation).
Measured, edge padding and a circular shift did no better or worse than the mirror (within noise).

What it buys, measured with a head trained on K = 1, 2, 5 labelled windows per class alone (watch clients 4-9,
HAPT users 16-25, 5 draws each, accuracy points over no augmentation): the defaults (8 copies) +0.5 / +1.1 /
+0.6 on the watch and +0.9 / +1.0 / +1.1 on HAPT; 4 copies +0.4 / +0.3 / +0.4 and -0.7 / +0.8 / +0.8. The other
settings moved these by about a point either way, which is the noise of the measurement, except rotations up to
30 degrees: -1.9 / -1.1 / +1.0 on HAPT, whose postures differ mainly in the direction of gravity.
bench/augment_cost.py measures what it costs on the device.

Pure numpy; the randomness is the caller's generator. Only the new copies are returned: the caller keeps
its originals and decides how to combine them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ChannelGroup = tuple[int, int, int]  # the (x, y, z) channel indices of one 3-axis sensor

# A triplet name is a sensor prefix, an optional separator, then the axis letter: acc-x, gyro_y, ax, wz, mag.z.
_AXIS_NAME = re.compile(r"^(?P<sensor>.*?)[-_. ]?(?P<axis>[xyz])$", re.IGNORECASE)
MAX_SHIFT_FRACTION = 0.5  # a larger shift mirrors more than half of the window: little of it is still the window


class AugmentError(ValueError):
    """The windows, labels, channel groups or settings cannot be augmented as given."""


@dataclass(frozen=True)
class AugmentConfig:
    """How many copies of each labelled window to make, and how far each may stray from it.

    The defaults suit 2-2.5 s windows at 50 Hz (100-128 samples) of a wrist- or waist-worn IMU: at most 10% of
    the window (0.2-0.26 s) of time jitter, +-10% in amplitude, and up to 15 degrees of device rotation: within
    what the bundled watch backbone was trained with (20 degrees, x0.8-1.2, +-0.2 s; models/MODEL_CARD.md), so a
    copy stays a window the backbone knows how to embed. The HAPT backbone was trained without rotation (a
    waist-worn phone sits one way, and postures differ in the direction of gravity: models/MODEL_CARD_hapt.md);
    on HAPT few-shot heads, 0 to 20 degrees measured alike (within noise) and 30 degrees worse. A sensor
    mounted in one fixed orientation may want a smaller max_rotation_deg.

    copies:
        New windows per labelled window; 0 switches augmentation off.
    max_shift_fraction:
        Largest time shift as a fraction of the window length (rounded down to whole samples), in [0, 0.5].
        A fraction, not samples, so one setting fits backbones with different window lengths.
    scale_range:
        (low, high): every copy is multiplied by a factor drawn uniformly from it; 0 < low <= high.
    max_rotation_deg:
        Largest rotation angle in degrees, in [0, 180]: the axis is uniform on the sphere, the angle uniform in
        [0, max]. Needs at least one xyz channel triplet (see `channel_groups_from_names`) unless it is 0.
    scale_per_group:
        False: one factor per copy for all channels (the whole movement more or less vigorous). True: one factor
        per channel triplet and per channel outside a triplet (the sensors' gains differ).
    """

    copies: int = 8
    max_shift_fraction: float = 0.1
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_rotation_deg: float = 15.0
    scale_per_group: bool = False

    def __post_init__(self) -> None:
        # Settings arrive from TOML and task metadata too: refuse a bad one where the config is made.
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 0:
            raise AugmentError(f"AugmentConfig.copies must be a whole number >= 0 (0 = no augmentation), "
                               f"got {self.copies!r}")
        if not 0.0 <= float(self.max_shift_fraction) <= MAX_SHIFT_FRACTION:
            raise AugmentError(f"AugmentConfig.max_shift_fraction must be in [0, {MAX_SHIFT_FRACTION}] (a fraction of "
                               f"the window length), got {self.max_shift_fraction!r}")
        if len(self.scale_range) != 2:
            raise AugmentError(f"AugmentConfig.scale_range must be (low, high), got {self.scale_range!r}")
        low, high = (float(v) for v in self.scale_range)
        if not (math.isfinite(low) and math.isfinite(high) and 0.0 < low <= high):
            raise AugmentError(f"AugmentConfig.scale_range must satisfy 0 < low <= high (e.g. (0.9, 1.1)), "
                               f"got {self.scale_range!r}")
        if not 0.0 <= float(self.max_rotation_deg) <= 180.0:
            raise AugmentError(f"AugmentConfig.max_rotation_deg must be in [0, 180] degrees, "
                               f"got {self.max_rotation_deg!r}")

    @property
    def enabled(self) -> bool:
        return self.copies > 0

    def max_shift_samples(self, window_length: int) -> int:
        """The largest shift in samples for windows of `window_length` samples."""
        return math.floor(self.max_shift_fraction * window_length)


def channel_groups_from_names(channel_names: Sequence[str]) -> tuple[ChannelGroup, ...]:
    """The xyz triplets among the channel names, each as its (x, y, z) indices, in order of their x channel.

    A triplet is three names that differ only in a last letter x, y, z (any case), after an optional
    separator: ``acc-x, acc-y, acc-z`` (UCI HAPT), ``ax, ay, az`` and ``wx, wy, wz`` (the bundled watch
    recordings), ``gyro_x``, ``mag.X``. A sensor with only some of its axes named is no triplet: those channels
    are scaled and shifted, never rotated. Two channels naming the same axis of one sensor are refused.
    """
    names = [str(n).strip() for n in channel_names]
    axes: dict[str, dict[str, int]] = {}
    for index, name in enumerate(names):
        match = _AXIS_NAME.match(name)
        if match is None:
            continue
        sensor, axis = match["sensor"].lower(), match["axis"].lower()
        seen = axes.setdefault(sensor, {})
        if axis in seen:
            raise AugmentError(
                f"channels {seen[axis]} ({names[seen[axis]]!r}) and {index} ({name!r}) both name axis {axis} of "
                f"sensor {sensor or '(unnamed)'!r}: rename one, or pass channel_groups explicitly")
        seen[axis] = index
    groups = [(a["x"], a["y"], a["z"]) for a in axes.values() if set(a) == {"x", "y", "z"}]
    return tuple(sorted(groups))


def random_rotations(n: int, max_angle_deg: float, rng: np.random.Generator) -> np.ndarray:
    """n rotation matrices (n, 3, 3) float64: axis uniform on the sphere, angle uniform in [0, max_angle_deg]."""
    axis = rng.standard_normal((n, 3))
    angle = rng.uniform(0.0, math.radians(max_angle_deg), size=n)
    norm = np.linalg.norm(axis, axis=1, keepdims=True)
    # A zero draw has probability zero; any axis is then as good as another, the angle still applies.
    axis = np.where(norm > 0, axis / np.where(norm > 0, norm, 1.0), np.array([1.0, 0.0, 0.0]))
    k = np.zeros((n, 3, 3))  # the cross-product matrix of each axis
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k -= k.transpose(0, 2, 1)
    sin, cos = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    rotation: np.ndarray = np.eye(3) + sin * k + (1.0 - cos) * (k @ k)  # Rodrigues' formula
    return rotation


def reflect_shift_index(window_length: int, shifts: np.ndarray) -> np.ndarray:
    """Source sample of every output sample, (len(shifts), window_length): output t holds input t - shift,
    mirrored at the window's edges (numpy's "reflect": the edge sample itself is not repeated)."""
    last = window_length - 1
    if np.any(np.abs(shifts) > last):
        raise AugmentError(f"a shift of {int(np.abs(shifts).max())} samples does not fit a window of "
                           f"{window_length}: shifts must stay below the window length")
    source = np.arange(window_length)[None, :] - np.asarray(shifts, np.int64)[:, None]
    source = np.abs(source)
    index: np.ndarray = np.where(source > last, 2 * last - source, source)
    return index


def augment_windows(x: np.ndarray, y: np.ndarray, config: AugmentConfig, rng: np.random.Generator,
                    channel_groups: Sequence[ChannelGroup]) -> tuple[np.ndarray, np.ndarray]:
    """`config.copies` perturbed copies of every window, with its label; the originals are not included.

    x: (n, time, channels) real windows (raw sensor units, before any standardization); y: (n,) integer labels.
    Returns (x_aug float32 (n * copies, time, channels), y_aug (n * copies,) of y's dtype), window-major: the
    copies of window i are rows i * copies .. (i + 1) * copies - 1. channel_groups: the xyz triplets to rotate
    (`channel_groups_from_names`); channels in none are shifted and scaled only.

    Every copy draws its shift, scale and rotation whatever the config switches off (a zero range draws
    zero), so configs that differ in one range give copies that differ only in it (`scale_per_group` draws
    more factors, so it changes the rotations drawn after them). The same generator state gives the same copies;
    copies=0 draws nothing.
    """
    if not isinstance(rng, np.random.Generator):
        raise AugmentError(f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), "
                           f"got {type(rng).__name__}")
    windows, labels = _checked_windows(x, y)
    n, length, channels = windows.shape
    groups = _checked_groups(channel_groups, channels)
    if config.max_rotation_deg > 0 and not groups:
        raise AugmentError(f"max_rotation_deg is {config.max_rotation_deg} but none of the {channels} channels is in "
                           "an xyz triplet: pass channel_groups_from_names(channel_names), or set "
                           "max_rotation_deg=0")
    total = n * config.copies
    if total == 0:
        return np.zeros((0, length, channels), np.float32), labels[:0].copy()

    max_shift = config.max_shift_samples(length)
    shifts = rng.integers(-max_shift, max_shift + 1, size=total)
    in_group = {c for g in groups for c in g}
    scale_sets = [list(g) for g in groups] + [[c] for c in range(channels) if c not in in_group]
    low, high = config.scale_range
    scales = rng.uniform(low, high, size=(total, len(scale_sets) if config.scale_per_group else 1))
    rotations = random_rotations(total, config.max_rotation_deg, rng).astype(np.float32)

    source = np.repeat(np.arange(n), config.copies)
    out: np.ndarray = windows[source[:, None], reflect_shift_index(length, shifts)]  # (total, length, channels)
    for group in groups if config.max_rotation_deg > 0 else ():
        cols = list(group)
        # v' = R v for every sample of every copy: the same R for every triplet of one copy.
        out[:, :, cols] = np.matmul(out[:, :, cols], rotations.transpose(0, 2, 1))
    if config.scale_per_group:
        factor = np.empty((total, channels), np.float32)
        for j, cols in enumerate(scale_sets):
            factor[:, cols] = scales[:, j: j + 1]
        out *= factor[:, None, :]
    else:
        out *= scales.astype(np.float32)[:, :, None]
    return out, labels[source]


def _checked_windows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = np.asarray(x), np.asarray(y)
    if xa.ndim != 3:
        raise AugmentError(f"windows must be (n, time, channels), got shape {xa.shape}")
    if not (np.issubdtype(xa.dtype, np.floating) or np.issubdtype(xa.dtype, np.integer)):
        raise AugmentError(f"windows must hold real numbers, got dtype {xa.dtype}")
    if ya.ndim != 1 or ya.shape[0] != xa.shape[0]:
        raise AugmentError(f"labels must be one per window: {xa.shape[0]} windows, labels of shape {ya.shape}")
    if not np.issubdtype(ya.dtype, np.integer):
        raise AugmentError(f"labels must be integer class indices, got dtype {ya.dtype}")
    if xa.shape[1] < 1 or xa.shape[2] < 1:
        raise AugmentError(f"windows must have at least one sample and one channel, got shape {xa.shape}")
    windows = xa.astype(np.float32, copy=False)
    bad = ~np.isfinite(windows).all(axis=(1, 2))
    if bad.any():
        raise AugmentError(f"{int(bad.sum())} window(s) hold NaN or infinite values (first: window "
                           f"{int(np.flatnonzero(bad)[0])}): drop or repair them before augmenting")
    return windows, ya


def _checked_groups(channel_groups: Sequence[ChannelGroup], channels: int) -> tuple[ChannelGroup, ...]:
    groups: list[ChannelGroup] = []
    used: dict[int, int] = {}
    for g, group in enumerate(channel_groups):
        cols = tuple(int(c) for c in group)
        if len(cols) != 3 or len(set(cols)) != 3:
            raise AugmentError(f"channel group {g} is {tuple(group)!r}: a group is three distinct channel indices "
                               "(x, y, z)")
        for c in cols:
            if not 0 <= c < channels:
                raise AugmentError(f"channel group {g} {cols} names channel {c}, but the windows have channels "
                                   f"0..{channels - 1}")
            if c in used:
                raise AugmentError(f"channel {c} is in channel groups {used[c]} and {g}: a channel belongs to one "
                                   "sensor")
            used[c] = g
        groups.append((cols[0], cols[1], cols[2]))
    return tuple(groups)
