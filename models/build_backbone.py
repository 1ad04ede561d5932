#!/usr/bin/env python3
"""Build the frozen int8 TFLite backbone: models/backbone_int8.tflite, its .json sidecar and MODEL_CARD.md.

This is a build-time tool. It is the only place in the project that imports TensorFlow; a device only
ever loads the .tflite with a TFLite interpreter and reads the .json.

What it does, in order:
  1. load the watch-exercise windows with the project's own loader (edge_agent.data);
  2. train a small 1D-CNN on the BACKBONE_SUBJECTS' training windows only, choosing the epoch by
     accuracy on those same subjects' test windows;
  3. convert it to a full-int8 TFLite model with two named outputs, `embedding` and `logits`;
  4. check its interface and evaluate float Keras and int8 TFLite accuracy, plus how well the int8
     embedding serves subjects the backbone never saw (per-subject linear probes on CLIENT_SUBJECTS);
  5. only then write the .tflite, the .json sidecar and the model card.

Run from the repository root:
    scripts/setup --bench && .venv-bench/bin/python models/build_backbone.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any, Callable, Iterator

# Quieten TensorFlow's C++ start-up chatter; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
# The script lives in models/, outside the package; make `edge_agent` importable without installing it.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from edge_agent.data.partition import (  # noqa: E402
    BACKBONE_SUBJECTS, CLIENT_SUBJECTS, NEW_USER_SUBJECTS, PartitionConfig, partition_clients)
from edge_agent.data.watch import load_watch_dataset  # noqa: E402
from edge_agent.data.windows import WindowConfig, WindowSet, split_and_window  # noqa: E402
from edge_agent.learning.features import EmbeddingStandardizer  # noqa: E402

MODEL_FILE = "backbone_int8.tflite"
SIDECAR_FILE = "backbone_int8.json"
CARD_FILE = "MODEL_CARD.md"
SIDECAR_FORMAT = "edge-fl-backbone/1"
SIGNATURE_KEY = "serving_default"
INPUT_KEY = "window"
EMBEDDING_KEY = "embedding"
LOGITS_KEY = "logits"
EMBEDDING_DIM = 64
EMBEDDING_ACTIVATION: str | None = None  # linear; see build_model for why
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
DEFAULT_EPOCHS = 40
FEW_SHOT = 5  # labelled windows per class in the few-shot probe (PartitionConfig.shots)


@dataclass(frozen=True)
class Standardizer:
    """Per-channel statistics of the backbone subjects' training windows; the device applies the same."""

    mean: np.ndarray  # (channels,) float32
    std: np.ndarray  # (channels,) float32

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardizer":
        mean = x.reshape(-1, x.shape[-1]).mean(axis=0)
        std = x.reshape(-1, x.shape[-1]).std(axis=0)
        # Guard against a dead channel; no channel of this dataset is constant, but a divide by zero
        # would silently put NaNs into the sidecar.
        return cls(mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Augmentation (numpy, in raw sensor units, so that a rotation moves accelerometer and gyroscope
# together the way a differently worn watch would)
# --------------------------------------------------------------------------------------------------

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


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light, label-preserving perturbations of raw (n, 100, 6) windows.

    The embedding has to serve people the backbone never saw. Between people the same exercise
    differs mostly in watch orientation on the wrist, in how vigorously it is done, and in where the
    window happens to start within the repetition; each perturbation imitates one of those.
    """
    n, length, _ = x.shape
    rot = _random_rotations(rng, n, max_deg=20.0).astype(np.float32)
    out = np.empty_like(x)
    out[..., 0:3] = np.einsum("nij,ntj->nti", rot, x[..., 0:3])  # accelerometer
    out[..., 3:6] = np.einsum("nij,ntj->nti", rot, x[..., 3:6])  # gyroscope, same rotation
    # Amplitude: one factor per window (effort) times a milder one per channel.
    out *= rng.uniform(0.8, 1.2, size=(n, 1, 1)).astype(np.float32)
    out *= rng.uniform(0.95, 1.05, size=(n, 1, 6)).astype(np.float32)
    # Time shift by up to 0.2 s; the exercises are periodic, so a circular shift stays plausible.
    shifts = rng.integers(-10, 11, size=n)
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
    for filters, kernel, stride in ((24, 5, 2), (48, 5, 2), (64, 3, 1)):
        h = keras.layers.Conv1D(filters, kernel, strides=stride, padding="same", kernel_regularizer=reg)(h)
        # BatchNorm trains faster on 1.9k windows and folds into the convolution when converted.
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
          standardize: Standardizer, epochs: int, seed: int) -> tuple[int, list[float]]:
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
        x = standardize(augment(train_x, rng))
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
    def load(cls, flatbuffer: bytes) -> "Int8Backbone":
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


def _check_interface(backbone: Int8Backbone) -> None:
    """Fail the build if the converted model does not have the interface the device code relies on."""
    inp = backbone.input_detail
    if inp["dtype"] != np.int8 or list(inp["shape"]) != [1, 100, 6]:
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
                     few_shot_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> dict[int, dict[str, Any]]:
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


def write_card(path: Path, facts: dict[str, Any]) -> None:
    """Write MODEL_CARD.md. Every number in it comes from this run, except the section of development
    findings (DEVELOPMENT_FINDINGS), which records comparisons made once when the script was written."""
    f = facts
    acc = f["accuracy"]
    outputs_rows = "\n".join(
        f"| `{o['key']}` | {o['index']} | `{o['name']}` | {o['tensor_index']} | {o['shape']} | int8 | "
        f"{o['scale']:.6g} | {o['zero_point']} |" for o in f["outputs_full"])
    per_subject_rows = "\n".join(
        f"| {s} | {r['train']} | {r['test']} | {r['logits']:.3f} | {r['probe']:.3f} | "
        f"{np.mean(r['few_shot']):.3f} ({min(r['few_shot']):.3f}–{max(r['few_shot']):.3f}) |"
        for s, r in f["per_subject"].items())
    history = ", ".join(f"{a:.3f}" for a in f["val_history"])
    inp = f["input_detail"]
    text = f"""# Backbone model card: `{MODEL_FILE}`

A frozen, fully int8-quantized 1D-CNN that turns a 2 s six-axis wrist-IMU window into a
{EMBEDDING_DIM}-d embedding. Devices run it with a TFLite interpreter and train only a small int8
head on top of the embedding (per user, federated). This card and `{SIDECAR_FILE}` are generated by
`models/build_backbone.py`; edit the script, not this file.

## Files

| file | size | sha256 |
|---|---|---|
| `{MODEL_FILE}` | {f['size_bytes']} bytes | `{f['sha256']}` |
| `{SIDECAR_FILE}` | metadata, format `{SIDECAR_FORMAT}` | |

## Rebuild

```
cd <repo root>
scripts/setup --bench   # TensorFlow + LiteRT in .venv-bench, never on a device
.venv-bench/bin/python models/build_backbone.py --epochs {f['epochs']} --seed {f['seed']}
```

Any Python with TensorFlow (the `build-model` extra), `ai-edge-litert` and the dataset (the `data`
extra) will do; `--out-dir DIR` writes elsewhere. This build: TensorFlow {f['tf_version']},
Keras {f['keras_version']}, ai-edge-litert {f['litert_version']}, numpy {f['numpy_version']},
Python {f['python_version']}, {f['machine']}. Seeds are fixed (`tf.keras.utils.set_random_seed`, a seeded numpy
generator for augmentation) and `tf.config.experimental.enable_op_determinism()` is on; a different TF
version or CPU may still give different bytes. Build time {f['total_s']:.0f} s, of which TFLite conversion
with int8 calibration {f['convert_s']:.1f} s.

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
  mean `{[round(v, 4) for v in f['mean']]}`, std `{[round(v, 4) for v in f['std']]}`
  (full precision in the sidecar).

## Architecture

```
window (100, 6), standardized
Conv1D 24, k5, stride 2, same + BatchNorm + ReLU   -> (50, 24)
Conv1D 48, k5, stride 2, same + BatchNorm + ReLU   -> (25, 48)
Conv1D 64, k3, stride 1, same + BatchNorm + ReLU   -> (25, 64)
GlobalAveragePooling1D                             -> (64,)
Dense 64, linear                                   -> embedding (64,)
Dropout 0.3 (training only)
Dense 7, linear                                    -> logits (7,)
```

{f['params']} parameters; BatchNorm folds into the convolutions at conversion. L2 weight decay {WEIGHT_DECAY}
on all kernels.

**Why a linear embedding.** A ReLU embedding leaves units that are dead (constant 0) or 0 for most
windows; a downstream int8 head then gets constant inputs and one-sided distributions that waste half of
the int8 range. A linear embedding uses the whole symmetric range of every unit, and weight decay plus
the averaging in the pooling keep its range compact, which matters because the embedding is quantized
per tensor (one scale for all 64 units). tanh would bound it, but measured slightly worse for the
linear probe (see development findings).

**Training.** Adam, learning rate {LEARNING_RATE} with cosine decay, batch {BATCH_SIZE}, {f['epochs']} epochs,
softmax cross-entropy on the logits; the weights of the best validation epoch are kept. Fresh augmentation
every epoch, applied to raw windows before standardization: one random 3-D rotation of up to 20°
applied to accelerometer and gyroscope alike (watch worn differently), amplitude ×0.8–1.2 per window and
×0.95–1.05 per channel (effort), a circular time shift of up to ±0.2 s (window phase), then Gaussian noise
of 0.05 std (sensor noise).

## Tensors (as `ai_edge_litert.interpreter.Interpreter` reports them)

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
order is not guaranteed across converter versions.

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
{per_subject_rows}

Int8 vs float on the backbone test windows: predictions agree on {f['agreement']:.3f} of windows; the
embedding's mean absolute error is {f['emb_mae']:.4f} against a spread (std) of {f['emb_std']:.3f}.

**Reading these numbers.** The logits row is what the frozen backbone alone does for a stranger: clearly
worse than on its own subjects, and uneven between people. The probe rows are roughly what a per-user
head on the frozen embedding can reach with that user's labels; that, not the logits, is what the
federation builds on.

Validation accuracy per epoch: {history}.

## How it was validated

Every run of the script, on the converted bytes (exactly what is written to `{MODEL_FILE}`) with `ai_edge_litert`:
- the input is int8 with shape (1, 100, 6); both outputs are int8; the build fails otherwise;
- the signature runner's output keys are exactly `{EMBEDDING_KEY}` and `{LOGITS_KEY}`; they are mapped to
  `get_output_details()` entries by tensor index, which is what the table above and the sidecar report;
- all evaluations resize the batch dimension to 256 with `resize_tensor_input`, and every accuracy in this
  card is computed from that interpreter (default options, so XNNPACK), except the float Keras row;
- the sidecar's `sha256` and `size_bytes` are computed from the same bytes that are written to the file.

{DEVELOPMENT_FINDINGS.format(epochs=DEFAULT_EPOCHS)}"""
    path.write_text(text)


# --------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train, int8-convert and document the frozen backbone (build-time tool; needs TensorFlow).")
    parser.add_argument("--out-dir", type=Path, default=HERE,
                        help=f"where to write {MODEL_FILE}, {SIDECAR_FILE} and {CARD_FILE} (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for TF, numpy and augmentation (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.epochs < 1:
        raise SystemExit("--epochs must be at least 1")
    t_start = time.perf_counter()

    import tensorflow as tf  # imported here so `--help` stays instant

    tf.keras.utils.set_random_seed(args.seed)  # python, numpy and TF global seeds
    tf.config.experimental.enable_op_determinism()

    dataset = load_watch_dataset()
    train_set, test_set = split_and_window(dataset, WindowConfig())
    num_classes = dataset.num_classes
    in_backbone_train = np.isin(train_set.subject, BACKBONE_SUBJECTS)
    in_backbone_test = np.isin(test_set.subject, BACKBONE_SUBJECTS)
    bb_train = train_set.select(in_backbone_train)
    bb_test = test_set.select(in_backbone_test)
    standardize = Standardizer.fit(bb_train.x)
    length, channels = bb_train.x.shape[1:]
    print(f"backbone subjects {BACKBONE_SUBJECTS}: {len(bb_train)} train / {len(bb_test)} test windows")

    model = build_model(tf, length, channels, num_classes, EMBEDDING_ACTIVATION)
    best_epoch, history = train(tf, model, bb_train.x, bb_train.y, bb_test.x, bb_test.y,
                                standardize, args.epochs, args.seed)
    float_out = model.predict(standardize(bb_test.x), batch_size=512, verbose=0)
    float_acc = float(np.mean(float_out[LOGITS_KEY].argmax(axis=1) == bb_test.y))
    print(f"best epoch {best_epoch}/{args.epochs}; float test accuracy {float_acc:.3f}")

    # Calibrate on the (unaugmented) standardized training windows: the distribution the device sees.
    flatbuffer, convert_s = convert(tf, model, standardize(bb_train.x))
    print(f"converted: {len(flatbuffer)} bytes in {convert_s:.1f} s")

    # Everything below runs on these exact bytes; the files are written only at the end, together,
    # so a failed build never leaves a .tflite next to a sidecar that does not match it.
    backbone = Int8Backbone.load(flatbuffer)
    _check_interface(backbone)
    # Describe the outputs now, while the batch dimension is still the converted model's 1.
    outputs = describe_outputs(backbone)

    # What a device needs to standardize embeddings without the backbone subjects' data: the same
    # statistics `edge_agent.sim` fits at run time, shipped with the model.
    emb_stats = EmbeddingStandardizer.fit(backbone.run(standardize(bb_train.x))[EMBEDDING_KEY])

    bb_int8 = backbone.run(standardize(bb_test.x))
    int8_acc = float(np.mean(bb_int8[LOGITS_KEY].argmax(axis=1) == bb_test.y))
    agreement = float(np.mean(bb_int8[LOGITS_KEY].argmax(axis=1) == float_out[LOGITS_KEY].argmax(axis=1)))
    emb_mae = float(np.mean(np.abs(bb_int8[EMBEDDING_KEY] - float_out[EMBEDDING_KEY])))
    emb_std = float(np.std(float_out[EMBEDDING_KEY]))
    print(f"int8 test accuracy {int8_acc:.3f} (agreement with float {agreement:.3f})")

    per_subject = evaluate_clients(backbone, train_set, test_set, standardize, num_classes)
    n_client_test = sum(r["test"] for r in per_subject.values())
    client_logits = sum(r["logits"] * r["test"] for r in per_subject.values()) / n_client_test
    client_probe = float(np.mean([r["probe"] for r in per_subject.values()]))
    few_shot_mean = float(np.mean([np.mean(r["few_shot"]) for r in per_subject.values()]))
    print(f"client subjects: int8 logits {client_logits:.3f}, linear probe {client_probe:.3f}, "
          f"{FEW_SHOT}-shot probe {few_shot_mean:.3f}")

    size_bytes = len(flatbuffer)
    digest = hashlib.sha256(flatbuffer).hexdigest()
    accuracy = {
        "backbone_test_float": round(float_acc, 4),
        "backbone_test_int8": round(int8_acc, 4),
        "client_subjects_logits_int8": round(float(client_logits), 4),
        "client_subjects_linear_probe_int8": round(client_probe, 4),
    }
    sidecar = {
        "format": SIDECAR_FORMAT,
        "model_file": MODEL_FILE,
        "sha256": digest,
        "size_bytes": size_bytes,
        "input": {
            "window_length": int(length),
            "channels": int(channels),
            "sample_rate_hz": int(dataset.sample_rate_hz),
            "channel_names": list(dataset.channel_names),
            "channel_mean": [float(v) for v in standardize.mean],
            "channel_std": [float(v) for v in standardize.std],
        },
        "feature_output": EMBEDDING_KEY,
        "embedding_dim": EMBEDDING_DIM,
        "embedding_standardization": {
            "mean": [float(v) for v in emb_stats.mean], "std": [float(v) for v in emb_stats.std],
            "fit_on": f"int8 embeddings of the training windows of subjects {list(BACKBONE_SUBJECTS)}",
        },
        "outputs": outputs,
        "classes": list(dataset.class_names),
        "train_subjects": list(BACKBONE_SUBJECTS),
        "accuracy": accuracy,
        "built_with": {"tensorflow": tf.__version__, "seed": args.seed, "epochs": args.epochs},
    }

    inp = backbone.input_detail
    in_scale, in_zero = inp["quantization"]
    tensor_index_by_key = {key: int(d["index"]) for key, d in backbone.output_by_key.items()}
    order = [o["key"] for o in outputs]
    order_note = (f"`get_output_details()` lists the outputs in the order {order}"
                  + (", the same as the signature's keys." if order == [EMBEDDING_KEY, LOGITS_KEY]
                     else f", not in the signature's key order [{EMBEDDING_KEY!r}, {LOGITS_KEY!r}]."))

    facts = {
        **sidecar,
        "outputs_full": [{**o, "tensor_index": tensor_index_by_key[o["key"]]} for o in outputs],
        "epochs": args.epochs, "seed": args.seed, "best_epoch": best_epoch, "val_history": history,
        "tf_version": tf.__version__, "keras_version": tf.keras.__version__,
        "litert_version": dist_version("ai-edge-litert"), "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "convert_s": convert_s, "total_s": time.perf_counter() - t_start,
        "n_train": len(bb_train), "n_val": len(bb_test),
        "client_subjects": CLIENT_SUBJECTS, "mean": standardize.mean.tolist(), "std": standardize.std.tolist(),
        "params": model.count_params(), "per_subject": per_subject,
        "agreement": agreement, "emb_mae": emb_mae, "emb_std": emb_std,
        "input_detail": {"name": inp["name"], "index": int(inp["index"]), "shape": inp["shape"].tolist(),
                         "shape_signature": inp["shape_signature"].tolist(),
                         "scale": float(in_scale), "zero_point": int(in_zero)},
        "order_note": order_note,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "channel_names": list(dataset.channel_names), "sample_rate_hz": dataset.sample_rate_hz,
        "new_user_subjects": NEW_USER_SUBJECTS, "n_client_test": n_client_test,
        "few_shot_mean": few_shot_mean, "n_few_shot_draws": len(next(iter(per_subject.values()))["few_shot"]),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / MODEL_FILE).write_bytes(flatbuffer)
    (args.out_dir / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")
    write_card(args.out_dir / CARD_FILE, facts)
    print(f"wrote {MODEL_FILE} ({size_bytes} bytes, sha256 {digest[:16]}...), {SIDECAR_FILE} and {CARD_FILE} "
          f"to {args.out_dir} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
