"""The head blob an agent pushes to an MCU (PROTOCOL.md, "Head push") and its reference inference.

Layout (little-endian): "EFHD", version u8 = 1, n_layers u8, embedding_dim u16, mean f32[dim],
std f32[dim], then per layer: in u16, out u16, relu u8, weights i8[in*out] (row-major in x out),
scales f32[out], bias f32[out].

`HeadBlob.predict` re-implements the spec's inference in plain numpy instead of calling
`edge_agent.learning.quant`: it is the executable form of the spec that the C firmware is checked
against, and a test checks it agrees with `Int8Head.predict((emb - mean) / std)`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only for annotations: the blob codec needs no learning code at run time
    from edge_agent.learning.head import Int8Head

MAGIC = b"EFHD"
BLOB_VERSION = 1
QMAX = 127
# Same floor as edge_agent.learning.quant.MIN_SCALE: an all-zero row must not divide by zero.
MIN_ACT_SCALE = 1e-8
# Layer order of an Int8Head: the optional adapter (ReLU) feeds the classifier (no ReLU).
_HEAD_LAYERS = (("adapter", True), ("classifier", False))

_PREFIX = struct.Struct("<4sBBH")  # magic, version, n_layers, embedding_dim
_LAYER = struct.Struct("<HHB")  # in, out, relu


class HeadBlobError(ValueError):
    """A blob that is not a valid head: the message says which field and offset."""


@dataclass(frozen=True, eq=False)
class HeadLayer:
    weights: np.ndarray  # int8 (in, out)
    scales: np.ndarray  # float32 (out,): per-output-channel weight scale
    bias: np.ndarray  # float32 (out,)
    relu: bool

    @property
    def in_dim(self) -> int:
        return int(self.weights.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.weights.shape[1])

    def forward(self, x: np.ndarray) -> np.ndarray:
        """int8 dense: per-row symmetric int8 activations, int32 accumulate, one float rescale."""
        x = np.asarray(x, np.float32)
        x_scale = np.maximum(np.max(np.abs(x), axis=1) / np.float32(QMAX), np.float32(MIN_ACT_SCALE)).astype(np.float32)
        # np.rint rounds half to even: the C side must use lrintf/nearbyintf, not roundf.
        xq = np.clip(np.rint(x / x_scale[:, None]), -QMAX, QMAX).astype(np.int32)
        acc = xq @ self.weights.astype(np.int32)
        y = acc.astype(np.float32) * x_scale[:, None] * self.scales[None, :] + self.bias
        out: np.ndarray = np.maximum(y, np.float32(0.0)) if self.relu else y
        return out


@dataclass(frozen=True, eq=False)
class HeadBlob:
    mean: np.ndarray  # float32 (embedding_dim,)
    std: np.ndarray  # float32 (embedding_dim,)
    layers: tuple[HeadLayer, ...]
    version: int = BLOB_VERSION

    @property
    def embedding_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def num_classes(self) -> int:
        return self.layers[-1].out_dim

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Raw (not standardized) embeddings (n, dim) or (dim,) -> float32 logits (n, classes)."""
        x = np.atleast_2d(np.asarray(embeddings, np.float32))
        if x.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings have {x.shape[1]} features, the head expects {self.embedding_dim}")
        h: np.ndarray = ((x - self.mean) / self.std).astype(np.float32)
        for layer in self.layers:
            h = layer.forward(h)
        return h

    def predict(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(classes int64 (n,), scores float32 (n,)): argmax and its softmax probability."""
        z = self.logits(embeddings).astype(np.float64)
        classes = np.argmax(z, axis=1)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        scores = (1.0 / p.sum(axis=1)).astype(np.float32)  # exp(max - max) = 1 over the partition sum
        return classes, scores

    def to_bytes(self) -> bytes:
        _validate(self)
        out = bytearray(_PREFIX.pack(MAGIC, self.version, len(self.layers), self.embedding_dim))
        out += self.mean.astype("<f4").tobytes() + self.std.astype("<f4").tobytes()
        for layer in self.layers:
            out += _LAYER.pack(layer.in_dim, layer.out_dim, int(layer.relu))
            out += layer.weights.astype(np.int8).tobytes(order="C")  # row-major (in, out)
            out += layer.scales.astype("<f4").tobytes() + layer.bias.astype("<f4").tobytes()
        return bytes(out)


def _validate(blob: HeadBlob) -> None:
    if not 1 <= len(blob.layers) <= 0xFF:
        raise HeadBlobError(f"a head needs 1..255 layers, got {len(blob.layers)}")
    dim = blob.embedding_dim
    if not 1 <= dim <= 0xFFFF or blob.mean.shape != (dim,) or blob.std.shape != (dim,):
        raise HeadBlobError(f"mean {blob.mean.shape} and std {blob.std.shape} must both be (embedding_dim,) "
                            "with 1 <= dim <= 65535")
    _check_values("mean", blob.mean, positive=False)
    _check_values("std", blob.std, positive=True)
    width = dim
    for i, layer in enumerate(blob.layers):
        if layer.weights.ndim != 2 or layer.in_dim != width:
            raise HeadBlobError(f"layer {i}: weights {layer.weights.shape} do not take the previous width {width}")
        if not 1 <= layer.out_dim <= 0xFFFF:
            raise HeadBlobError(f"layer {i}: out={layer.out_dim} must be 1..65535")
        if layer.weights.dtype != np.int8:
            raise HeadBlobError(f"layer {i}: weights must be int8, got {layer.weights.dtype}")
        if layer.scales.shape != (layer.out_dim,) or layer.bias.shape != (layer.out_dim,):
            raise HeadBlobError(f"layer {i}: scales {layer.scales.shape} and bias {layer.bias.shape} "
                                f"must be ({layer.out_dim},)")
        _check_values(f"layer {i} scales", layer.scales, positive=True)
        _check_values(f"layer {i} bias", layer.bias, positive=False)
        width = layer.out_dim


def _check_values(name: str, values: np.ndarray, *, positive: bool) -> None:
    """Every float of a head must be finite (a NaN would reach the MCU's float-to-int8 conversion,
    undefined behaviour in C); std and scales must also be > 0 (they divide and scale)."""
    v = np.asarray(values, np.float32)
    bad = ~np.isfinite(v) | (v <= 0) if positive else ~np.isfinite(v)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        need = "finite and > 0" if positive else "finite"
        raise HeadBlobError(f"{name}[{i}] = {float(v[i])!r}: every value must be {need}")


def head_blob_from_int8(int8_head: Int8Head, mean: np.ndarray, std: np.ndarray) -> HeadBlob:
    layers = []
    for name, relu in _HEAD_LAYERS:
        key = f"{name}.w"
        if key not in int8_head.weights:
            continue
        q = int8_head.weights[key]
        if q.q.ndim != 2 or q.axis != 1:
            raise HeadBlobError(f"{key}: need (in, out) int8 weights quantized per output channel (axis 1), "
                                f"got axis {q.axis}")
        layers.append(HeadLayer(np.ascontiguousarray(q.q, np.int8), np.asarray(q.scale, np.float32),
                                np.asarray(int8_head.biases[f"{name}.b"], np.float32), relu))
    if not layers or "classifier.w" not in int8_head.weights:
        raise HeadBlobError("an Int8Head needs a classifier layer")
    blob = HeadBlob(np.asarray(mean, np.float32).ravel(), np.asarray(std, np.float32).ravel(), tuple(layers))
    _validate(blob)
    return blob


def encode_head(int8_head: Int8Head, mean: np.ndarray, std: np.ndarray) -> bytes:
    """The blob of an int8 head plus the embedding standardization it was trained behind."""
    return head_blob_from_int8(int8_head, mean, std).to_bytes()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise HeadBlobError(f"truncated: {what} needs {n} bytes at offset {self.pos}, blob has {len(self.data)}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def f32(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * count, what), dtype="<f4").astype(np.float32)


def decode_head(blob: bytes) -> HeadBlob:
    """Parse and validate a blob; HeadBlobError names the first thing wrong."""
    r = _Reader(bytes(blob))
    magic, version, n_layers, dim = _PREFIX.unpack(r.take(_PREFIX.size, "header"))
    if magic != MAGIC:
        raise HeadBlobError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != BLOB_VERSION:
        raise HeadBlobError(f"blob version {version}, this side reads {BLOB_VERSION}")
    if n_layers == 0:
        raise HeadBlobError("n_layers is 0")
    if dim == 0:
        raise HeadBlobError("embedding_dim is 0")
    mean = r.f32(dim, f"mean[{dim}]")
    std = r.f32(dim, f"std[{dim}]")
    layers = []
    width = dim
    for i in range(n_layers):
        n_in, n_out, relu = _LAYER.unpack(r.take(_LAYER.size, f"layer {i} header"))
        if n_in != width:
            raise HeadBlobError(f"layer {i}: in={n_in} but the previous width is {width}")
        if n_out == 0:
            raise HeadBlobError(f"layer {i}: out is 0")
        if relu not in (0, 1):
            raise HeadBlobError(f"layer {i}: relu flag is {relu}, must be 0 or 1")
        raw = r.take(n_in * n_out, f"layer {i} weights[{n_in}x{n_out}]")
        weights = np.frombuffer(raw, dtype=np.int8).reshape(n_in, n_out).copy()
        scales = r.f32(n_out, f"layer {i} scales[{n_out}]")
        bias = r.f32(n_out, f"layer {i} bias[{n_out}]")
        layers.append(HeadLayer(weights, scales, bias, bool(relu)))
        width = n_out
    if r.pos != len(r.data):
        raise HeadBlobError(f"{len(r.data) - r.pos} trailing bytes after the last layer (offset {r.pos})")
    head = HeadBlob(mean, std, tuple(layers), version)
    _validate(head)  # finite values, std > 0, scales > 0: the byte layout alone does not guarantee them
    return head


def blob_size(embedding_dim: int, layer_dims: list[tuple[int, int]]) -> int:
    """Bytes of a blob with these (in, out) layers: for RAM budgets on the MCU side."""
    return _PREFIX.size + 8 * embedding_dim + sum(_LAYER.size + i * o + 8 * o for i, o in layer_dims)


__all__ = ["BLOB_VERSION", "MAGIC", "HeadBlob", "HeadBlobError", "HeadLayer", "blob_size", "decode_head",
           "encode_head", "head_blob_from_int8"]
