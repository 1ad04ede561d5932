"""Any tensor of a model as its features, clear errors for models edge-fl did not build, and `[backbone]
feature_output`: on the bundled backbone, run by the real interpreter. The third-party models (int8 and
float, batch-1, stateful) are in tests/integration/test_foreign_backbones.py.

An integer feature_output is a position among the outputs (what it always meant); "tensor:N" is the tensor
with index N. The bundled model's outputs are tensor:25 (position 0, the embedding) and tensor:26 (position
1, the logits); tensor:24 is the pooled layer before the embedding, an intermediate tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent.sources import open_backbone
from edge_agent.backbone import (
    DEFAULT_MODEL,
    PRESERVE_BUDGET_BYTES,
    BackboneError,
    FrozenBackbone,
    changes_with_history,
    describe_model,
    is_bundled,
    load_interpreter_module,
    open_interpreter,
)
from edge_agent.backbone_plan import PlanKey, candidates
from edge_agent.codec.digest import sha256
from edge_agent.config import AgentConfig, BackboneConfig, ConfigError, load_toml, parse_set

from ..conftest import MODEL

POOLED = "backbone_1/global_average_pooling1d_1/Mean"  # tensor:24, [1, 64]: not an output


@pytest.fixture(scope="module")
def sample(windows):  # type: ignore[no-untyped-def]
    train, _ = windows
    return train.x[:: max(1, len(train) // 100)][:100]


def test_an_integer_is_an_output_position_and_tensor_n_a_tensor_index(sample) -> None:  # type: ignore[no-untyped-def]
    logits = FrozenBackbone(MODEL, feature_output=1)
    by_index = FrozenBackbone(MODEL, feature_output=f"tensor:{logits.feature.tensor_index}")
    assert (logits.feature.key, logits.feature.tensor_index, by_index.feature) == ("logits", 26, logits.feature)
    assert not by_index.preserves_all_tensors  # an output is read as an output, whichever way it is named
    np.testing.assert_array_equal(by_index.embed(sample), logits.embed(sample))
    with pytest.raises(BackboneError, match=rf"{MODEL}: tensor:1 .* cannot be the features: it is a constant"):
        FrozenBackbone(MODEL, feature_output="tensor:1")  # tensor 1 is a weight, whatever output 1 is
    with pytest.raises(BackboneError, match=rf"{MODEL}: no output tensor 7.*write \"tensor:7\" for the tensor"):
        FrozenBackbone(MODEL, feature_output=7)
    with pytest.raises(BackboneError, match=rf"{MODEL}: no tensor 'tensor:999'.*tensor:0 to tensor:26"):
        FrozenBackbone(MODEL, feature_output="tensor:999")


def test_an_intermediate_tensor_by_name_or_index_is_the_features(sample) -> None:  # type: ignore[no-untyped-def]
    by_name = FrozenBackbone(MODEL, feature_output=POOLED)
    by_index = FrozenBackbone(MODEL, feature_output="tensor:24")
    assert by_name.feature == by_index.feature
    assert (by_name.feature.index, by_name.feature.tensor_index, by_name.embedding_dim) == (-1, 24, 64)
    assert by_name.preserves_all_tensors and by_name.output_quant.scale > 0  # int8, dequantized like an output
    pooled = by_name.embed(sample)
    assert pooled.shape == (len(sample), 64) and np.isfinite(pooled).all() and pooled.std(axis=0).mean() > 0
    np.testing.assert_array_equal(by_index.embed(sample), pooled)
    # Not the embedding output (a dense layer further), and the same at every batch size.
    assert not np.array_equal(pooled, FrozenBackbone(MODEL).embed(sample))
    one_at_a_time = FrozenBackbone(MODEL, feature_output=POOLED, batch_size=1, reference_kernels=False)
    np.testing.assert_array_equal(one_at_a_time.embed(sample), pooled)


def test_every_tensor_is_kept_only_for_an_intermediate_tensor_and_the_batch_is_capped(sample) -> None:  # type: ignore[no-untyped-def]
    plain = FrozenBackbone(MODEL)
    # The keys a backbone always had: embeddings cached before this change keep their keys.
    assert sorted(plain.numbers_identity()) == sorted([
        "model_sha256", "runtime", "runtime_version", "reference_kernels", "machine", "feature_output",
        "input_quantization", "output_quantization", "input_standardization"])
    pooled = FrozenBackbone(MODEL, feature_output=POOLED)
    identity = pooled.numbers_identity()
    assert (identity["feature_tensor"], identity["preserve_all_tensors"]) == (24, True)
    assert "the feature tensor is not an output" in pooled.batch_limit
    mib_a_window = float(pooled.batch_limit.split(", ")[-1].split(" MiB")[0])
    assert pooled.batch_size <= max(1, PRESERVE_BUDGET_BYTES // int(mib_a_window * 2**20))


def test_unknown_names_name_the_model_and_say_how_to_list_its_tensors() -> None:
    with pytest.raises(BackboneError) as err:
        FrozenBackbone(MODEL, feature_output="pooled")
    text = str(err.value)
    assert text.startswith(f"{MODEL}: no output tensor 'pooled'") and "key='embedding'" in text
    assert f"python -m edge_agent.backbone {MODEL}" in text


def test_describe_model_lists_outputs_and_intermediate_tensors() -> None:
    text = describe_model(MODEL)
    assert "input tensor:0 'serving_default_window:0' shape [-1, 100, 6] int8 (batch: any)" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  tensor:")}
    assert "output 0" in lines["tensor:25"] and "output 1" in lines["tensor:26"]
    assert "intermediate" in lines["tensor:24"] and POOLED in lines["tensor:24"] and "dim 64" in lines["tensor:24"]
    assert "tensor:1" not in lines  # a constant is not offered


def test_the_bundled_model_has_no_state() -> None:
    backbone = FrozenBackbone(MODEL)
    assert not backbone.stateful and "state" not in backbone.numbers_identity()
    _, module = load_interpreter_module()
    interp = open_interpreter(module, MODEL, num_threads=1, reference_kernels=False, preserve_all_tensors=True)
    interp.allocate_tensors()
    assert not changes_with_history(interp, interp.get_input_details()[0])  # every tensor, A before and after B


# --- errors: the model file, the cause, and the build script only for the bundled backbone ---------------


def test_a_missing_model_gets_the_build_hint_only_where_edge_fl_ships_its_own(tmp_path: Path) -> None:
    with pytest.raises(BackboneError) as err:
        FrozenBackbone(tmp_path / "wakeword.tflite")
    assert f"{tmp_path}/wakeword.tflite does not exist" in str(err.value) and "fix the path" in str(err.value)
    assert "build_backbone" not in str(err.value)
    assert is_bundled(MODEL) and is_bundled(DEFAULT_MODEL.parent / "gone_int8.tflite")
    with pytest.raises(BackboneError, match=r"gone_int8.tflite does not exist.*`python models/build_backbone.py`"):
        FrozenBackbone(DEFAULT_MODEL.parent / "gone_int8.tflite")


def test_a_corrupt_foreign_model_names_the_file_and_the_cause_without_the_build_hint(tmp_path: Path) -> None:
    bad = tmp_path / "wakeword.tflite"
    bad.write_bytes(MODEL.read_bytes()[:2000])
    with pytest.raises(BackboneError) as err:
        FrozenBackbone(bad)
    assert str(err.value).startswith(f"{bad}: not a loadable TFLite model (") and "sha256=" in str(err.value)
    assert "build_backbone" not in str(err.value) and "good copy" in str(err.value)


def test_a_foreign_sidecar_of_another_model_says_what_to_fix(tmp_path: Path) -> None:
    model = tmp_path / "mine.tflite"
    shutil.copy(MODEL, model)
    meta = json.loads(MODEL.with_suffix(".json").read_text())
    meta["sha256"] = "0" * 64
    model.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(BackboneError) as err:
        FrozenBackbone(model)
    assert f"but {model} has sha256" in str(err.value) and "fix the sidecar's sha256" in str(err.value)
    assert "build_backbone" not in str(err.value)


def test_json_of_another_tool_beside_a_model_is_not_read_as_its_sidecar(tmp_path: Path) -> None:
    model = tmp_path / "okay_nabu.tflite"
    shutil.copy(MODEL, model)
    other = {"type": "micro", "wake_word": "Okay Nabu", "input": {"channel_mean": [9.0] * 6}}
    model.with_suffix(".json").write_text(json.dumps(other))  # what pymicro-wakeword ships beside its models
    assert FrozenBackbone(model).metadata == {}
    with pytest.raises(BackboneError, match=rf"{model.with_suffix('.json')}: not backbone metadata for {model}"):
        FrozenBackbone(model, metadata_path=model.with_suffix(".json"))


# --- the runner plan: no batching for a model that cannot batch, verdicts of before still valid -----------


def test_a_batch_limit_narrows_the_candidates_and_leaves_old_verdict_keys_alone() -> None:
    assert candidates(None, None, 1) == [(1, False), (1, True)]
    assert candidates(None, False, 14) == [(14, False), (1, False)]
    assert candidates(None, None) == [(64, False), (64, True), (1, False), (1, True)]
    assert candidates(8, None, 1) == [(8, False), (8, True)]  # an explicit batch is the caller's (FrozenBackbone
    #                                                          lowers it to 1 for a model that cannot batch)
    key = PlanKey("ab" * 32, "ai-edge-litert", "2.3.0", "x86_64", 1, None, None)
    h = sha256()
    h.update(json.dumps({"model_sha256": "ab" * 32, "runtime": "ai-edge-litert", "runtime_version": "2.3.0",
                         "machine": "x86_64", "num_threads": 1, "asked_batch_size": None,
                         "asked_reference_kernels": None}, sort_keys=True).encode())
    assert key.digest() == h.hexdigest()[:24]  # the digest a verdict file was named by before the new fields
    assert PlanKey("ab" * 32, "ai-edge-litert", "2.3.0", "x86_64", 1, None, None, max_batch_size=1).digest() != \
        key.digest()


# --- [backbone] feature_output in the agent's config ----------------------------------------------------

AGENT = 'device_id = "pi-1"\nstate_dir = "/tmp/x"\n'


def load(tmp_path: Path, text: str, *overrides: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT + text)
    return load_toml(path, AgentConfig, [parse_set(o) for o in overrides])


def test_the_agent_config_names_the_feature_tensor(tmp_path: Path) -> None:
    assert load(tmp_path, "").backbone.feature_output is None
    assert load(tmp_path, f'[backbone]\nfeature_output = "{POOLED}"\n').backbone.feature_output == POOLED
    assert load(tmp_path, "[backbone]\nfeature_output = 1\n").backbone.feature_output == 1
    assert load(tmp_path, "", "backbone.feature_output=tensor:24").backbone.feature_output == "tensor:24"
    assert load(tmp_path, "", "backbone.feature_output=1").backbone.feature_output == 1  # digits: a position
    for text, problem in (("feature_output = -1\n", "feature_output -1 is not an output position"),
                          ('feature_output = " "\n', "feature_output is empty"),
                          ("feature_output = 1.5\n", "feature_output must be an integer or a string, got 1.5")):
        with pytest.raises(ConfigError) as err:
            load(tmp_path, "[backbone]\n" + text)
        assert any(problem in p for p in err.value.problems), err.value.problems


def test_the_configured_feature_tensor_reaches_the_agents_backbone(sample) -> None:  # type: ignore[no-untyped-def]
    cfg = AgentConfig("pi-1", "/tmp/x", backbone=BackboneConfig(str(MODEL), feature_output="tensor:24"))
    backbone = open_backbone(cfg)
    assert (backbone.feature.tensor_index, backbone.feature.name, backbone.embedding_dim) == (24, POOLED, 64)
    np.testing.assert_array_equal(backbone.embed(sample[:10]),
                                  FrozenBackbone(MODEL, feature_output=POOLED).embed(sample[:10]))
    assert open_backbone(AgentConfig("pi-1", "/tmp/x", backbone=BackboneConfig(str(MODEL), feature_output=1))
                         ).feature.key == "logits"
    with pytest.raises(BackboneError, match=rf"{MODEL}: no output tensor 'nope'"):
        open_backbone(AgentConfig("pi-1", "/tmp/x", backbone=BackboneConfig(str(MODEL), feature_output="nope")))
