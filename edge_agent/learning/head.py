"""The personalization head: an optional adapter (dense + ReLU) and a linear classifier, in numpy.

Master weights are float32 and only they take gradient steps (int8 steps would round small updates
away). Storage, inference and transmission use the int8 twin from `PersonalizationHead.quantized()`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from .quant import MIN_SCALE, QMAX, QuantizedTensor, int8_dense, quantize_per_channel

Params = dict[str, np.ndarray]
ADAPTER_KEYS: tuple[str, str] = ("adapter.w", "adapter.b")
CLASSIFIER_KEYS: tuple[str, str] = ("classifier.w", "classifier.b")
OptimizerKind = Literal["adam", "sgd"]
OPTIMIZER_KINDS: tuple[OptimizerKind, ...] = ("adam", "sgd")


@dataclass(frozen=True)
class HeadConfig:
    in_dim: int
    num_classes: int
    adapter_dim: int = 32  # 0 = no adapter: a linear classifier straight on the embedding

    @property
    def keys(self) -> tuple[str, ...]:
        return (ADAPTER_KEYS if self.adapter_dim else ()) + CLASSIFIER_KEYS

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, without building the tensors (the aggregator checks uploads against it)."""
        width = self.adapter_dim or self.in_dim
        adapter = ({"adapter.w": (self.in_dim, self.adapter_dim), "adapter.b": (self.adapter_dim,)}
                   if self.adapter_dim else {})
        return {**adapter, "classifier.w": (width, self.num_classes), "classifier.b": (self.num_classes,)}


@dataclass(frozen=True)
class OptimizerConfig:
    kind: OptimizerKind = "adam"
    lr: float = 0.003
    momentum: float = 0.9  # sgd
    beta1: float = 0.9  # adam
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZER_KINDS:  # `fit` would otherwise quietly run Adam for a misspelt name
            raise ValueError(f"unknown optimizer {self.kind!r}; choose one of {', '.join(OPTIMIZER_KINDS)}")


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 1
    batch_size: int = 32
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    weight_decay: float = 1e-4  # L2 on weight matrices, not on biases
    class_weighting: bool = False  # weight each class by n / (classes * count) on the client's data

    def with_epochs(self, epochs: int) -> FitConfig:
        return replace(self, epochs=epochs)


def init_params(config: HeadConfig, rng: np.random.Generator) -> Params:
    params: Params = {}
    width = config.in_dim
    if config.adapter_dim:
        scale = np.sqrt(2.0 / config.in_dim)  # He initialization for the ReLU layer
        params["adapter.w"] = (rng.standard_normal((config.in_dim, config.adapter_dim)) * scale).astype(np.float32)
        params["adapter.b"] = np.zeros(config.adapter_dim, np.float32)
        width = config.adapter_dim
    scale = np.sqrt(1.0 / width)
    params["classifier.w"] = (rng.standard_normal((width, config.num_classes)) * scale).astype(np.float32)
    params["classifier.b"] = np.zeros(config.num_classes, np.float32)
    return params


def features(params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """What the classifier sees: the adapter's ReLU output, or the embedding itself."""
    if "adapter.w" in params:
        h: np.ndarray = np.maximum(x @ params["adapter.w"] + params["adapter.b"], 0.0)
        return h
    return x


def logits(params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    z: np.ndarray = features(params, x) @ params["classifier.w"] + params["classifier.b"]
    return z


def class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = y.size / (present.sum() * counts[present])
    return w.astype(np.float32)


def loss_and_grads(
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    sample_weight: np.ndarray | None = None,
    weight_decay: float = 0.0,
    prox_center: Mapping[str, np.ndarray] | None = None,
    prox_lambda: float = 0.0,
) -> tuple[float, Params]:
    """Mean (weighted) softmax cross-entropy + L2 + optional proximal term, and its exact gradient."""
    n = x.shape[0]
    sw = np.ones(n, np.float32) if sample_weight is None else sample_weight.astype(np.float32)
    norm = float(sw.sum()) or 1.0
    has_adapter = "adapter.w" in params
    pre = x @ params["adapter.w"] + params["adapter.b"] if has_adapter else x
    h = np.maximum(pre, 0.0) if has_adapter else x
    z = h @ params["classifier.w"] + params["classifier.b"]
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-(sw * logp[np.arange(n), y]).sum() / norm)
    dz = np.exp(logp)
    dz[np.arange(n), y] -= 1.0
    dz *= (sw / norm)[:, None]
    grads: Params = {"classifier.w": h.T @ dz, "classifier.b": dz.sum(axis=0)}
    if has_adapter:
        dpre = (dz @ params["classifier.w"].T) * (pre > 0)
        grads["adapter.w"] = x.T @ dpre
        grads["adapter.b"] = dpre.sum(axis=0)
    if weight_decay:
        for k in grads:
            if k.endswith(".w"):
                loss += 0.5 * weight_decay * float(np.sum(params[k] ** 2))
                grads[k] = grads[k] + weight_decay * params[k]
    if prox_center is not None and prox_lambda:
        for k, center in prox_center.items():
            diff = params[k] - center
            loss += 0.5 * prox_lambda * float(np.sum(diff**2))
            grads[k] = grads[k] + prox_lambda * diff
    return loss, {k: g.astype(np.float32) for k, g in grads.items()}


class _FlatParams:
    """All tensors as views into one contiguous float32 vector, gradients likewise.

    A head has a few thousand weights: numpy's per-call overhead, not arithmetic, dominates a step.
    One optimizer update over one vector instead of one per tensor makes training ~3x faster.
    """

    def __init__(self, params: Mapping[str, np.ndarray]) -> None:
        self.keys = list(params)
        self.flat = np.concatenate([np.asarray(params[k], np.float32).ravel() for k in self.keys])
        self.grad = np.zeros_like(self.flat)
        self.p: Params = {}
        self.g: Params = {}
        self.slices: dict[str, slice] = {}
        off = 0
        for k in self.keys:
            n, shape = params[k].size, params[k].shape
            self.slices[k] = slice(off, off + n)
            self.p[k] = self.flat[off:off + n].reshape(shape)
            self.g[k] = self.grad[off:off + n].reshape(shape)
            off += n

    def mask(self, keys: Collection[str]) -> np.ndarray:
        m = np.zeros_like(self.flat)
        for k in keys:
            if k in self.slices:
                m[self.slices[k]] = 1.0
        return m

    def vector(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        v = np.zeros_like(self.flat)
        for k, t in tensors.items():
            v[self.slices[k]] = np.asarray(t, np.float32).ravel()
        return v

    def data_grads(self, x: np.ndarray, y: np.ndarray, sw: np.ndarray | None) -> None:
        """Cross-entropy gradient written into `self.grad` (the maths of `loss_and_grads`, in place)."""
        p, g = self.p, self.g
        n = x.shape[0]
        adapter = "adapter.w" in p
        if adapter:
            pre = x @ p["adapter.w"]
            pre += p["adapter.b"]
            h = np.maximum(pre, 0.0)
        else:
            h = x
        z = h @ p["classifier.w"]
        z += p["classifier.b"]
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        z[np.arange(n), y] -= 1.0
        if sw is None:
            z /= n
        else:
            z *= (sw / sw.sum())[:, None]
        np.matmul(h.T, z, out=g["classifier.w"])
        np.sum(z, axis=0, out=g["classifier.b"])
        if adapter:
            dpre = z @ p["classifier.w"].T
            dpre *= pre > 0
            np.matmul(x.T, dpre, out=g["adapter.w"])
            np.sum(dpre, axis=0, out=g["adapter.b"])


def fit(
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    config: FitConfig,
    rng: np.random.Generator,
    *,
    trainable: Collection[str] | None = None,
    prox_center: Mapping[str, np.ndarray] | None = None,
    prox_lambda: float = 0.0,
    num_classes: int | None = None,
) -> Params:
    """Mini-batch training; returns new params and leaves the input untouched. Frozen keys keep their values.

    Minimizes the objective `loss_and_grads` defines (weighted cross-entropy, L2 on weight matrices,
    proximal term); a test checks single steps against it.
    """
    fp = _FlatParams(params)
    if x.shape[0] == 0 or config.epochs <= 0:
        return {k: fp.p[k].copy() for k in fp.keys}
    x = np.asarray(x, np.float32)
    # Masks only where they change something: each skipped vector op is a few % of a step.
    train_mask = None if trainable is None or set(fp.keys) <= set(trainable) else fp.mask(trainable)
    wkeys = [k for k in fp.keys if k.endswith(".w")]
    decay = config.weight_decay * fp.mask(wkeys) if config.weight_decay else None
    center = fp.vector(prox_center) if prox_center is not None and prox_lambda else None
    prox = prox_lambda * fp.mask(prox_center) if prox_center is not None and prox_lambda else None
    cw = class_weights(y, num_classes or fp.p["classifier.b"].shape[0]) if config.class_weighting else None
    c = config.optimizer
    m = np.zeros_like(fp.flat)
    v = np.zeros_like(fp.flat)
    scratch = np.empty_like(fp.flat)
    g = fp.grad
    t = 0
    bs = config.batch_size
    for _ in range(config.epochs):
        order = rng.permutation(x.shape[0])
        # One gather per epoch, then contiguous slices: cheaper than fancy-indexing every batch.
        xs, ys = x[order], y[order]
        sws = None if cw is None else cw[ys]
        for lo in range(0, order.size, bs):
            fp.data_grads(xs[lo:lo + bs], ys[lo:lo + bs], None if sws is None else sws[lo:lo + bs])
            if decay is not None:
                np.multiply(decay, fp.flat, out=scratch)
                g += scratch
            if center is not None and prox is not None:
                np.subtract(fp.flat, center, out=scratch)
                scratch *= prox
                g += scratch
            if train_mask is not None:
                g *= train_mask
            t += 1
            if c.kind == "sgd":
                m *= c.momentum
                m += g
                np.multiply(m, c.lr, out=scratch)
                fp.flat -= scratch
            else:
                m *= c.beta1
                g *= 1 - c.beta1
                m += g
                g *= g
                g *= (1 - c.beta2) / (1 - c.beta1) ** 2  # g now holds (1 - beta2) * grad^2
                v *= c.beta2
                v += g
                # Bias corrections folded into the step size (Kingma & Ba, section 2).
                step = c.lr * np.sqrt(1 - c.beta2**t) / (1 - c.beta1**t)
                np.sqrt(v, out=scratch)
                scratch += c.eps * np.sqrt(1 - c.beta2**t)
                np.divide(m, scratch, out=scratch)
                scratch *= step
                fp.flat -= scratch
    return {k: fp.p[k].copy() for k in fp.keys}


@dataclass(frozen=True)
class Int8Head:
    """The int8 twin: per-output-channel int8 weights, float32 biases, int8 x int8 -> int32 matmuls."""

    weights: dict[str, QuantizedTensor]
    biases: dict[str, np.ndarray]

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, np.float32)
        if "adapter.w" in self.weights:
            h = np.maximum(int8_dense(h, self.weights["adapter.w"], self.biases["adapter.b"]), 0.0)
        return int8_dense(h, self.weights["classifier.w"], self.biases["classifier.b"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        labels: np.ndarray = np.argmax(self.logits(x), axis=1)
        return labels

    def dequantized(self) -> Params:
        return {**{k: q.dequantize() for k, q in self.weights.items()}, **{k: b.copy() for k, b in self.biases.items()}}

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.weights.values()) + sum(b.nbytes for b in self.biases.values())


def quantize_head(params: Mapping[str, np.ndarray]) -> Int8Head:
    return Int8Head(
        weights={k: quantize_per_channel(v, axis=-1) for k, v in params.items() if k.endswith(".w")},
        biases={k: np.asarray(v, np.float32).copy() for k, v in params.items() if k.endswith(".b")},
    )


# float32 slack of the interval bounds below: a few float32 roundings (2**-24 each) per value, generously.
_F32_SLACK = 1e-6


def _widen(lo: np.ndarray, hi: np.ndarray, magnitude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pad = _F32_SLACK * (magnitude + 1.0)
    return lo - pad, hi + pad


def int8_logit_intervals(head: Int8Head, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds (zlo, zhi) on `head.logits(x)` for every input with lo <= x <= hi (rows, features).

    Interval arithmetic through exactly the int8 arithmetic of `Int8Head.logits` (and of the head blob
    an MCU runs): per layer the row's activation scale a = max|x| / 127 lies in [a_lo, a_hi], each
    x / a in [min, max] over the corners, its int8 value in [rint(min), rint(max)] (rint is monotone),
    the int32 accumulator in [q_lo, q_hi] @ W (positive and negative weights apart), the rescaled
    output acc * a * scale + bias over the corners; ReLU is monotone. Pure float64 numpy, padded by
    a few float32 roundings so the float32 computation is inside.
    """
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    layers = [("adapter", True)] if "adapter.w" in head.weights else []
    for name, relu in [*layers, ("classifier", False)]:
        w, b = head.weights[f"{name}.w"], np.asarray(head.biases[f"{name}.b"], np.float64)
        lo, hi = _widen(lo, hi, np.maximum(np.abs(lo), np.abs(hi)))
        mag_lo = np.where((lo <= 0) & (hi >= 0), 0.0, np.minimum(np.abs(lo), np.abs(hi)))
        mag_hi = np.maximum(np.abs(lo), np.abs(hi))
        a_lo = np.maximum(mag_lo.max(axis=1, keepdims=True) / QMAX, MIN_SCALE) * (1 - _F32_SLACK)
        a_hi = np.maximum(mag_hi.max(axis=1, keepdims=True) / QMAX, MIN_SCALE) * (1 + _F32_SLACK)
        ratios = np.stack([lo / a_lo, lo / a_hi, hi / a_lo, hi / a_hi])
        v_lo, v_hi = _widen(ratios.min(axis=0), ratios.max(axis=0), np.abs(ratios).max(axis=0))
        q_lo = np.clip(np.rint(v_lo), -QMAX, QMAX)
        q_hi = np.clip(np.rint(v_hi), -QMAX, QMAX)
        wq = w.q.astype(np.float64)  # integer-valued: the accumulators below are exact
        w_pos, w_neg = np.maximum(wq, 0.0), np.minimum(wq, 0.0)
        acc_lo, acc_hi = q_lo @ w_pos + q_hi @ w_neg, q_hi @ w_pos + q_lo @ w_neg
        s = np.asarray(w.scale, np.float64)[None, :]
        scaled = np.stack([acc_lo * a_lo, acc_lo * a_hi, acc_hi * a_lo, acc_hi * a_hi]) * s
        lo, hi = _widen(scaled.min(axis=0) + b, scaled.max(axis=0) + b, np.abs(scaled).max(axis=0) + np.abs(b))
        if relu:
            lo, hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
    return lo, hi


def prediction_flip_bound(head: Int8Head, x: np.ndarray, radius: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(margin, bound) per row: when can another input x' with |x' - x| <= radius change the prediction?

    margin = z[top] - max_{c != top} z[c] of `head.logits(x)`. B[c] = how far the logit c of any x' in
    the box can be from z[c] (`int8_logit_intervals`). x' predicts some c != top only if
    z[top] - z[c] <= B[top] + B[c], hence only where margin <= bound = B[top] + max_{c != top} B[c].
    A row with margin > bound predicts the same class for every input in the box.
    """
    x32 = np.asarray(x, np.float32)
    r = np.broadcast_to(np.asarray(radius, np.float64), x32.shape)
    z = head.logits(x32).astype(np.float64)
    zlo, zhi = int8_logit_intervals(head, x32 - r, x32 + r)
    if z.shape[1] < 2:  # one class: nothing to flip to
        return np.full(z.shape[0], np.inf), np.zeros(z.shape[0])
    spread = np.maximum(np.maximum(zhi - z, z - zlo), 0.0)
    rows, top = np.arange(z.shape[0]), np.argmax(z, axis=1)
    others, other_spread = z.copy(), spread.copy()
    others[rows, top] = -np.inf
    other_spread[rows, top] = -np.inf
    return z[rows, top] - others.max(axis=1), spread[rows, top] + other_spread.max(axis=1)


@dataclass(frozen=True)
class PersonalizationHead:
    """A head's float32 master weights with its config; `quantized()` gives what the device runs and sends."""

    config: HeadConfig
    params: Params

    @classmethod
    def initial(cls, config: HeadConfig, rng: np.random.Generator) -> PersonalizationHead:
        return cls(config, init_params(config, rng))

    def fit(self, x: np.ndarray, y: np.ndarray, fit_config: FitConfig, rng: np.random.Generator, *,
            trainable: Collection[str] | None = None, prox_center: Mapping[str, np.ndarray] | None = None,
            prox_lambda: float = 0.0) -> PersonalizationHead:
        params = fit(self.params, x, y, fit_config, rng, trainable=trainable, prox_center=prox_center,
                     prox_lambda=prox_lambda, num_classes=self.config.num_classes)
        return PersonalizationHead(self.config, params)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return logits(self.params, x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        labels: np.ndarray = np.argmax(self.logits(x), axis=1)
        return labels

    def quantized(self) -> Int8Head:
        return quantize_head(self.params)
