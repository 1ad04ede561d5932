"""Symmetric int8 quantization, per output channel for weights and per row for activations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

QMAX = 127
# A channel whose weights are all ~0 would get scale 0 and divide by zero; this floor keeps it finite.
MIN_SCALE = 1e-8


@dataclass(frozen=True)
class QuantizedTensor:
    """int8 values with one float32 scale per slice along `axis` (real = q * scale)."""

    q: npt.NDArray[np.int8]
    scale: npt.NDArray[np.float32]  # shape (q.shape[axis],)
    axis: int

    def dequantize(self) -> np.ndarray:
        shape = [1] * self.q.ndim
        shape[self.axis] = -1
        return self.q.astype(np.float32) * self.scale.reshape(shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scale.nbytes)


def quantize_per_channel(w: np.ndarray, axis: int = -1) -> QuantizedTensor:
    """Quantize with one scale per slice along `axis` (the output channel of a (in, out) weight)."""
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    max_abs = np.max(np.abs(w), axis=reduce) if reduce else np.abs(w)
    scale = np.maximum(max_abs / QMAX, MIN_SCALE).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -QMAX, QMAX).astype(np.int8)
    return QuantizedTensor(q, scale, axis)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic per-row activation quantization (as TFLite's hybrid kernels do): (int8 rows, scales)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.maximum(np.max(np.abs(x), axis=1) / QMAX, MIN_SCALE).astype(np.float32)
    q = np.clip(np.round(x / scale[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, scale


def int8_dense(x: np.ndarray, w: QuantizedTensor, b: np.ndarray) -> np.ndarray:
    """y = x @ W + b computed as int8 x int8 -> int32 accumulate, then one float rescale per output."""
    if w.axis != w.q.ndim - 1:
        raise ValueError("int8_dense needs weights quantized along the output (last) axis")
    xq, xs = quantize_rows(x)
    acc = xq.astype(np.int32) @ w.q.astype(np.int32)
    y: np.ndarray = acc.astype(np.float32) * xs[:, None] * w.scale[None, :] + b
    return y
