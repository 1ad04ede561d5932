"""FrozenBackbone on the real bundled .tflite, run by the real interpreter."""

import json
import shutil

import numpy as np
import pytest

from edge_agent.backbone import BackboneError, EmbeddingCache, FrozenBackbone, load_interpreter_module

from ..conftest import MODEL


@pytest.fixture(scope="module")
def sample(windows):  # type: ignore[no-untyped-def]
    train, _ = windows
    return train.x[:: max(1, len(train) // 150)][:150]


def test_embeddings_have_the_documented_shape_and_are_deterministic(backbone, sample) -> None:  # type: ignore[no-untyped-def]
    meta = json.loads(MODEL.with_suffix(".json").read_text())
    e1, e2 = backbone.embed(sample), backbone.embed(sample)
    assert e1.shape == (len(sample), meta["embedding_dim"]) and e1.dtype == np.float32
    np.testing.assert_array_equal(e1, e2)
    assert np.std(e1, axis=0).mean() > 0  # not a constant output


@pytest.mark.parametrize("batch_size, threads", [(1, 1), (7, 2), (256, 1)])
def test_batching_and_threads_do_not_change_the_result(backbone, sample, batch_size, threads) -> None:  # type: ignore[no-untyped-def]
    other = FrozenBackbone(MODEL, batch_size=batch_size, num_threads=threads)
    np.testing.assert_array_equal(other.embed(sample), backbone.embed(sample))


def test_feature_output_by_key_name_or_index_is_the_same_tensor(backbone, sample) -> None:  # type: ignore[no-untyped-def]
    by_key = FrozenBackbone(MODEL, feature_output="embedding")
    by_index = FrozenBackbone(MODEL, feature_output=by_key.feature.index)
    by_name = FrozenBackbone(MODEL, feature_output=by_key.feature.name)
    ref = by_key.embed(sample)
    np.testing.assert_array_equal(by_index.embed(sample), ref)
    np.testing.assert_array_equal(by_name.embed(sample), ref)
    logits = FrozenBackbone(MODEL, feature_output="logits")
    assert logits.embedding_dim == 7 and logits.feature.index != by_key.feature.index


def test_unknown_output_lists_what_exists(sample) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackboneError, match=r"no output tensor 'features'.*key='embedding'.*key='logits'"):
        FrozenBackbone(MODEL, feature_output="features")
    with pytest.raises(BackboneError, match="no output tensor 5"):
        FrozenBackbone(MODEL, feature_output=5)


def test_missing_model_names_the_path_and_suggests_the_build_script_only_for_the_bundled_one(  # type: ignore[no-untyped-def]
        tmp_path) -> None:
    with pytest.raises(BackboneError, match=rf"not found: {tmp_path}/nope.tflite does not exist.*fix the path") as err:
        FrozenBackbone(tmp_path / "nope.tflite")
    assert "build_backbone" not in str(err.value)
    with pytest.raises(BackboneError, match=r"gone_int8.tflite does not exist.*build_backbone.py"):
        FrozenBackbone(MODEL.parent / "gone_int8.tflite")


def test_corrupt_model_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(MODEL.read_bytes()[:2000])
    with pytest.raises(BackboneError, match=rf"{bad}: not a loadable TFLite model.*sha256="):
        FrozenBackbone(bad)
    (tmp_path / "text.tflite").write_text("hello")
    with pytest.raises(BackboneError, match="not a loadable TFLite model"):
        FrozenBackbone(tmp_path / "text.tflite")


def test_wrong_window_shape_says_what_was_expected(backbone, sample) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackboneError, match=r"expects windows of shape \(n, 100, 6\), got \(3, 50, 6\)"):
        backbone.embed(sample[:3, :50])
    with pytest.raises(BackboneError, match="expects windows"):
        backbone.embed(sample[0])


def test_metadata_of_another_model_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "backbone_int8.tflite"
    shutil.copy(MODEL, model)
    meta = json.loads(MODEL.with_suffix(".json").read_text())
    meta["sha256"] = "0" * 64
    model.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(BackboneError, match="do not belong together"):
        FrozenBackbone(model)


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(BackboneError, match="unknown TFLite runtime 'tensorflow'"):
        load_interpreter_module("tensorflow")  # type: ignore[arg-type]


def test_cache_is_keyed_by_model_and_windows(tmp_path, backbone, sample) -> None:  # type: ignore[no-untyped-def]
    cache = EmbeddingCache(tmp_path)
    first = cache.embed(backbone, sample)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and files[0].name.startswith(backbone.sha256[:16])
    # A cache hit returns what is on disk: poison the file and watch it come back.
    np.save(files[0], np.full_like(first, 7.0))
    assert np.all(cache.embed(backbone, sample) == 7.0)
    cache.embed(backbone, sample[:10])  # other windows -> another entry
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_torn_cache_file_is_recomputed(tmp_path, backbone, sample) -> None:  # type: ignore[no-untyped-def]
    cache = EmbeddingCache(tmp_path)
    ref = cache.embed(backbone, sample)
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(path.read_bytes()[:100])
    np.testing.assert_array_equal(cache.embed(backbone, sample), ref)


@pytest.mark.tflite_runtime
def test_tflite_runtime_and_litert_give_the_same_embeddings(sample) -> None:  # type: ignore[no-untyped-def]
    litert = FrozenBackbone(MODEL, runtime="ai-edge-litert")
    tfl = FrozenBackbone(MODEL, runtime="tflite-runtime")
    assert (litert.runtime, tfl.runtime) == ("ai-edge-litert", "tflite-runtime")
    a, b = litert.embed(sample), tfl.embed(sample)
    # LiteRT 2.x runs int8 convolutions through XNNPACK, tflite-runtime 2.14 through its reference
    # kernels: rounding may differ by one output step on a few units, never more.
    step = FrozenBackbone(MODEL).metadata["outputs"][litert.feature.index]["scale"]
    diff = np.abs(a - b)
    assert diff.max() <= step * 1.001, f"max difference {diff.max()} exceeds one int8 step {step}"
    assert np.mean(diff == 0) >= 0.8, f"only {np.mean(diff == 0):.3f} of the values are identical (measured: 0.86)"
    # What a user sees: the backbone's own class decision agrees on (nearly) every window.
    la = FrozenBackbone(MODEL, runtime="ai-edge-litert", feature_output="logits").embed(sample)
    lb = FrozenBackbone(MODEL, runtime="tflite-runtime", feature_output="logits").embed(sample)
    assert np.mean(la.argmax(1) == lb.argmax(1)) >= 0.98


@pytest.mark.tflite_runtime
def test_with_reference_kernels_both_runtimes_are_bit_identical(sample) -> None:  # type: ignore[no-untyped-def]
    a = FrozenBackbone(MODEL, runtime="ai-edge-litert", reference_kernels=True).embed(sample)
    b = FrozenBackbone(MODEL, runtime="tflite-runtime", reference_kernels=True).embed(sample)
    np.testing.assert_array_equal(a, b)


@pytest.mark.tflite_runtime
def test_tflite_runtime_backbone_errors_are_the_same(tmp_path, sample) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackboneError, match="no output tensor 'x'"):
        FrozenBackbone(MODEL, runtime="tflite-runtime", feature_output="x")
    (tmp_path / "bad.tflite").write_bytes(b"\0" * 64)
    with pytest.raises(BackboneError, match="not a loadable"):
        FrozenBackbone(tmp_path / "bad.tflite", runtime="tflite-runtime")


def test_cache_never_serves_embeddings_of_another_op_resolver(tmp_path, sample) -> None:  # type: ignore[no-untyped-def]
    cache = EmbeddingCache(tmp_path)
    default = FrozenBackbone(MODEL, reference_kernels=False, batch_size=64)
    reference = FrozenBackbone(MODEL, reference_kernels=True, batch_size=64)
    a, b = cache.embed(default, sample), cache.embed(reference, sample)
    assert cache.key(default, sample) != cache.key(reference, sample)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    # Each resolver gets its own numbers back (they differ: XNNPACK rounds differently on some values).
    np.testing.assert_array_equal(a, default.embed(sample))
    np.testing.assert_array_equal(b, reference.embed(sample))
    assert not np.array_equal(a, b)


def test_cache_key_follows_everything_that_changes_the_numbers(tmp_path, backbone, sample) -> None:  # type: ignore[no-untyped-def]
    cache = EmbeddingCache(tmp_path)
    base = cache.key(backbone, sample)
    assert base == cache.key(FrozenBackbone(MODEL, batch_size=7, num_threads=2), sample)  # these change nothing
    other_version = FrozenBackbone(MODEL)
    other_version.runtime_version = backbone.runtime_version + ".post1"
    assert cache.key(other_version, sample) != base
    assert cache.key(FrozenBackbone(MODEL, feature_output="logits"), sample) != base
    # Another sidecar for the same model: other input statistics, other embeddings.
    meta = json.loads(MODEL.with_suffix(".json").read_text())
    meta["input"]["channel_std"] = [2 * s for s in meta["input"]["channel_std"]]
    (tmp_path / "other.json").write_text(json.dumps(meta))
    assert cache.key(FrozenBackbone(MODEL, metadata_path=tmp_path / "other.json"), sample) != base


@pytest.mark.tflite_runtime
def test_cache_never_serves_embeddings_of_another_runtime(tmp_path, sample) -> None:  # type: ignore[no-untyped-def]
    cache = EmbeddingCache(tmp_path)
    for kernels in (False, True):
        litert = FrozenBackbone(MODEL, runtime="ai-edge-litert", reference_kernels=kernels)
        tfl = FrozenBackbone(MODEL, runtime="tflite-runtime", reference_kernels=kernels)
        assert cache.key(litert, sample) != cache.key(tfl, sample)
        np.testing.assert_array_equal(cache.embed(litert, sample), litert.embed(sample))
        np.testing.assert_array_equal(cache.embed(tfl, sample), tfl.embed(sample))
    assert len(list(tmp_path.glob("*.npy"))) == 4
