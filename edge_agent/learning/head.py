"""The personalization head: an optional adapter (dense + ReLU) and a linear classifier, in numpy.

Master weights are float32 and only they take gradient steps (int8 steps would round small updates
away). Storage, inference and transmission use the int8 twin from `PersonalizationHead.quantized()`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from .quant import QuantizedTensor, int8_dense, quantize_per_channel

Params = dict[str, np.ndarray]
ADAPTER_KEYS: tuple[str, str] = ("adapter.w", "adapter.b")
CLASSIFIER_KEYS: tuple[str, str] = ("classifier.w", "classifier.b")


@dataclass(frozen=True)
class HeadConfig:
    in_dim: int
    num_classes: int
    adapter_dim: int = 32  # 0 = no adapter: a linear classifier straight on the embedding

    @property
    def keys(self) -> tuple[str, ...]:
        return (ADAPTER_KEYS if self.adapter_dim else ()) + CLASSIFIER_KEYS


@dataclass(frozen=True)
class OptimizerConfig:
    kind: Literal["adam", "sgd"] = "adam"
    lr: float = 0.003
    momentum: float = 0.9  # sgd
    beta1: float = 0.9  # adam
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 1
    batch_size: int = 32
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    weight_decay: float = 1e-4  # L2 on weight matrices, not on biases
    class_weighting: bool = False  # weight each class by n / (classes * count) on the client's data

    def with_epochs(self, epochs: int) -> "FitConfig":
        return replace(self, epochs=epochs)


def init_params(config: HeadConfig, rng: np.random.Generator) -> Params:
    params: Params = {}
    width = config.in_dim
    if config.adapter_dim:
        params["adapter.w"] = (rng.standard_normal((config.in_dim, config.adapter_dim)) * np.sqrt(2.0 / config.in_dim)).astype(np.float32)
        params["adapter.b"] = np.zeros(config.adapter_dim, np.float32)
        width = config.adapter_dim
    params["classifier.w"] = (rng.standard_normal((width, config.num_classes)) * np.sqrt(1.0 / width)).astype(np.float32)
    params["classifier.b"] = np.zeros(config.num_classes, np.float32)
    return params


def features(params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """What the classifier sees: the adapter's ReLU output, or the embedding itself."""
    if "adapter.w" in params:
        return np.maximum(x @ params["adapter.w"] + params["adapter.b"], 0.0)
    return x


def logits(params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return features(params, x) @ params["classifier.w"] + params["classifier.b"]


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


class _Optimizer:
    """Adam or SGD with momentum over a named parameter dict; state lives for one `fit` call."""

    def __init__(self, config: OptimizerConfig) -> None:
        self.c = config
        self.t = 0
        self.m: Params = {}
        self.v: Params = {}

    def step(self, params: Params, grads: Mapping[str, np.ndarray]) -> None:
        c = self.c
        self.t += 1
        for k, g in grads.items():
            m = self.m.get(k, np.zeros_like(g))
            if c.kind == "sgd":
                m = c.momentum * m + g
                params[k] = params[k] - c.lr * m
            else:
                m = c.beta1 * m + (1 - c.beta1) * g
                v = c.beta2 * self.v.get(k, np.zeros_like(g)) + (1 - c.beta2) * g * g
                self.v[k] = v
                mhat = m / (1 - c.beta1**self.t)
                vhat = v / (1 - c.beta2**self.t)
                params[k] = (params[k] - c.lr * mhat / (np.sqrt(vhat) + c.eps)).astype(np.float32)
            self.m[k] = m


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
    """Mini-batch training; returns new params and leaves the input untouched. Frozen keys keep their values."""
    out = {k: v.copy() for k, v in params.items()}
    if x.shape[0] == 0 or config.epochs <= 0:
        return out
    keys = set(out) if trainable is None else set(trainable)
    opt = _Optimizer(config.optimizer)
    k_classes = num_classes or out["classifier.b"].shape[0]
    cw = class_weights(y, k_classes) if config.class_weighting else None
    for _ in range(config.epochs):
        order = rng.permutation(x.shape[0])
        for lo in range(0, order.size, config.batch_size):
            idx = order[lo: lo + config.batch_size]
            _, grads = loss_and_grads(
                out, x[idx], y[idx],
                sample_weight=None if cw is None else cw[y[idx]],
                weight_decay=config.weight_decay, prox_center=prox_center, prox_lambda=prox_lambda,
            )
            opt.step(out, {k: g for k, g in grads.items() if k in keys})
    return out


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
        return np.argmax(self.logits(x), axis=1)

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


@dataclass(frozen=True)
class PersonalizationHead:
    """A head's float32 master weights with its config; `quantized()` gives what the device runs and sends."""

    config: HeadConfig
    params: Params

    @classmethod
    def initial(cls, config: HeadConfig, rng: np.random.Generator) -> "PersonalizationHead":
        return cls(config, init_params(config, rng))

    def fit(self, x: np.ndarray, y: np.ndarray, fit_config: FitConfig, rng: np.random.Generator, **kw: object) -> "PersonalizationHead":
        return PersonalizationHead(self.config, fit(self.params, x, y, fit_config, rng, num_classes=self.config.num_classes, **kw))  # type: ignore[arg-type]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return logits(self.params, x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(x), axis=1)

    def quantized(self) -> Int8Head:
        return quantize_head(self.params)
