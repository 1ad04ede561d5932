"""The global model as deltas (codec/downlink.py): what a device rebuilds is the aggregator's model bit for bit, the
residual carries what compression left out, and a frame that cannot give the version it claims is refused with why."""

from __future__ import annotations

from dataclasses import replace

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.aggregator import downlink_store
from edge_agent.codec.compression import CodecSpec
from edge_agent.codec.downlink import (
    DownlinkError,
    apply_delta,
    compress_version,
    frame_versions,
    model_digest,
)
from edge_agent.codec.envelope import EnvelopeError, decode_envelope
from edge_agent.fleet import (
    FleetMessageError,
    GlobalModel,
    RoundTask,
    decode_global,
    decode_task,
    encode_global,
    encode_task,
)
from edge_agent.learning.head import HeadConfig
from edge_agent.learning.training import TrainingConfig

CODECS = ["float32", "float16", "int8", "int4", "int4+sr", "sign1", "sign1+rot", "topk:0.05", "subsample:0.1"]


def _model(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _walk(codec: str, versions: int, *, feedback: bool = True, seed: int = 0) -> tuple[float, float, bool]:
    """Run `versions` rounds whose aggregate moves the model by a random step; returns (|V - G| / |G - G0| at the
    end, the largest relative gap on the way, whether the device's copy matched the aggregator's every time)."""
    rng = np.random.default_rng(seed)
    g0 = _model(rng, {"w": (7, 64), "b": (7,)})
    official, truth, device, residual = dict(g0), dict(g0), dict(g0), {}
    gaps, same = [], True
    for v in range(1, versions + 1):
        step = {k: (0.01 * rng.normal(size=t.shape)).astype(np.float32) for k, t in truth.items()}
        truth = {k: truth[k] + step[k] for k in truth}
        aggregate = {k: official[k] + step[k] for k in official}  # what a round computes from the official model
        result = compress_version(official, aggregate, residual if feedback else {}, CodecSpec.parse(codec),
                                  version=v)
        assert result is not None
        got_version, device = apply_delta(device, v - 1, result.frame)
        same = same and got_version == v and model_digest(device) == model_digest(result.params)
        official, residual = result.params, result.residual
        moved = np.sqrt(sum(float(np.sum((truth[k] - g0[k]) ** 2)) for k in truth))
        gaps.append(np.sqrt(sum(float(np.sum((official[k] - truth[k]) ** 2)) for k in truth)) / moved)
    return gaps[-1], max(gaps[versions // 2:]), same


@pytest.mark.parametrize("codec", CODECS)
def test_the_device_rebuilds_the_aggregators_model_bit_for_bit_and_the_gap_stays_bounded(codec: str) -> None:
    final, worst_late, same = _walk(codec, 40)
    assert same, "a device applying every frame must hold exactly the aggregator's model"
    # Error feedback: the official model trails the true aggregate by about one version's compression error,
    # never by an error that accumulates: over the second half the gap stays below the distance travelled.
    assert final < 1.0 and worst_late < 1.0, (final, worst_late)


@pytest.mark.parametrize("codec", ["sign1", "topk:0.05", "subsample:0.1"])
def test_without_the_residual_the_coarse_codecs_drift(codec: str) -> None:
    with_feedback, _, _ = _walk(codec, 40)
    without, _, _ = _walk(codec, 40, feedback=False)
    assert with_feedback < without / 2, (with_feedback, without)


@settings(max_examples=30, deadline=None)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=40),
       scale=st.floats(-4, 3), codec=st.sampled_from(CODECS), seed=st.integers(0, 2**16))
def test_any_shape_and_scale_round_trips_and_official_plus_residual_is_the_aggregate(
        shape: tuple[int, ...], scale: float, codec: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    previous = {"t": (rng.normal(size=shape) * 10.0 ** scale).astype(np.float32)}
    target = {"t": (previous["t"] + rng.normal(size=shape) * 10.0 ** (scale - 1)).astype(np.float32)}
    residual = {"t": (rng.normal(size=shape) * 10.0 ** (scale - 2)).astype(np.float32)}
    result = compress_version(previous, target, residual, CodecSpec.parse(codec), version=5)
    assert result is not None
    assert frame_versions(result.frame) == (5, 4)
    version, rebuilt = apply_delta(previous, 4, result.frame)
    assert version == 5 and model_digest(rebuilt) == model_digest(result.params)
    if CodecSpec.parse(codec).error_feedback:  # nothing is lost: what is not in V yet is in R
        want = target["t"].astype(np.float64) + residual["t"]
        got = result.params["t"].astype(np.float64) + result.residual["t"]
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6 * 10.0 ** scale)


def test_a_frame_for_another_version_or_a_damaged_one_is_refused_with_why() -> None:
    rng = np.random.default_rng(1)
    v1 = _model(rng, {"w": (3, 8)})
    target = {"w": v1["w"] + 0.1}
    frame = compress_version(v1, target, {}, CodecSpec.parse("int8"), version=2)
    assert frame is not None
    with pytest.raises(DownlinkError, match="applies to version 1, not to version 3"):
        apply_delta(v1, 3, frame.frame)
    other = {"w": v1["w"] + np.float32(1e-3)}  # a device whose copy differs: the digest says so
    with pytest.raises(DownlinkError, match="does not match the aggregator's"):
        apply_delta(other, 1, frame.frame)
    damaged = bytearray(frame.frame)
    damaged[-1] ^= 0xFF
    with pytest.raises(EnvelopeError, match="corrupted"):
        apply_delta(v1, 1, bytes(damaged))
    with pytest.raises(EnvelopeError):
        apply_delta({"w": np.zeros((4, 8), np.float32)}, 1, frame.frame)  # other shapes: not this frame's
    with pytest.raises(EnvelopeError, match="not a delta frame"):
        frame_versions(b"{}")


def test_other_tensors_make_no_delta_and_a_stale_residual_is_dropped() -> None:
    rng = np.random.default_rng(2)
    v1 = _model(rng, {"w": (3, 8)})
    assert compress_version(v1, _model(rng, {"w": (4, 8)}), {}, CodecSpec.parse("int8"), version=2) is None
    stale = {"w": np.ones((2, 2), np.float32), "gone": np.ones(3, np.float32)}
    result = compress_version(v1, {"w": v1["w"] + 0.5}, stale, CodecSpec.parse("float32"), version=2)
    assert result is not None
    np.testing.assert_array_equal(result.params["w"], v1["w"] + np.float32(0.5))


def test_the_digest_tells_models_apart_by_value_name_and_shape() -> None:
    base = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert model_digest(base) == model_digest({"w": base["w"].astype(np.float64)})  # float32 is what is held
    assert model_digest(base) != model_digest({"w": base["w"].reshape(3, 2)})
    assert model_digest(base) != model_digest({"v": base["w"]})
    changed = {"w": base["w"].copy()}
    changed["w"][1, 2] = np.nextafter(np.float32(5), np.float32(6))
    assert model_digest(base) != model_digest(changed)


def test_the_store_keeps_the_residual_of_one_version_and_the_frames_of_the_last_ones() -> None:
    residual = {"w": np.full((2, 3), 0.25, np.float32)}
    text = downlink_store.encode_residual(7, residual)
    np.testing.assert_array_equal(downlink_store.decode_residual(text, 7)["w"], residual["w"])
    assert downlink_store.decode_residual(text, 8) == {}  # left after another version: meaningless
    assert downlink_store.decode_residual("7:not base64!", 7) == {}
    assert downlink_store.decode_residual(None, 7) == {}
    rng = np.random.default_rng(3)
    model, meta, keep = _model(rng, {"w": (2, 4)}), {}, 3
    for v in range(1, 8):
        step = compress_version(model, {"w": model["w"] + 0.1}, {}, CodecSpec.parse("int8"), version=v)
        assert step is not None
        model = step.params
        meta[downlink_store.frame_key(v, keep)] = downlink_store.encode_frame(step.frame)
    kept = downlink_store.kept_frames(meta.get, 7, keep)
    assert sorted(kept) == [5, 6, 7] and all(frame_versions(f)[0] == v for v, f in kept.items())
    assert sorted(downlink_store.kept_frames(meta.get, 9, keep)) == [7]  # slots since overwritten are not kept


# --- the task and model of a fleet with a downlink codec (fleet.py) ---------------------------------------------

def _global(downlink: str = "int8", **training: object) -> GlobalModel:
    head = HeadConfig(4, 2, 0)
    return GlobalModel(3, TrainingConfig(strategy="fedavg", downlink_codec=downlink, **training),  # type: ignore[arg-type]
                       head, {"classifier.w": np.ones((4, 2), np.float32), "classifier.b": np.zeros(2, np.float32)})


def test_a_task_names_its_model_by_digest_and_sends_only_the_settings_that_differ_from_the_defaults() -> None:
    model = _global(lr=0.01)
    task = RoundTask(4, 1.7e9, None, model, model_digest=model_digest(model.params), downlink_keep=5)
    payload = encode_task(task)
    env = decode_envelope(payload)
    assert env.tensors == {} and env.codec == "float32"
    assert {k for k in env.meta if k.startswith("train.")} == {"train.strategy", "train.lr", "train.downlink_codec",
                                                                "train.digest"}
    got = decode_task(env)
    assert got.model.training == model.training and got.model_digest == task.model_digest
    assert got.downlink_keep == 5 and got.model.params == {}
    whole = RoundTask(4, 1.7e9, None, replace(model, training=replace(model.training, downlink_codec="")))
    assert len(payload) < len(encode_task(whole)) - 400  # the tensors and the default settings are not sent


def test_a_task_whose_settings_rebuild_to_another_digest_or_codec_is_refused_with_why() -> None:
    model = _global()
    env = decode_envelope(encode_task(RoundTask(4, 1.7e9, None, model, model_digest="ab" * 16)))
    env.meta["train.digest"] = "0" * 16  # type: ignore[index]  # what an aggregator with other defaults sends
    with pytest.raises(FleetMessageError, match="defaults differ from the aggregator's"):
        decode_task(env)
    env = decode_envelope(encode_task(RoundTask(4, 1.7e9, None, model, model_digest="ab" * 16)))
    env.meta["train.downlink_codec"] = "zstd:9"  # type: ignore[index]  # a codec of a newer edge-fl
    with pytest.raises(FleetMessageError, match="codec 'zstd:9'"):
        decode_task(env)
    env = decode_envelope(encode_task(RoundTask(4, 1.7e9, None, model, model_digest="ab" * 16)))
    del env.meta["model.digest"]  # type: ignore[attr-defined]
    with pytest.raises(FleetMessageError, match="model.digest"):
        decode_task(env)
    with pytest.raises(ValueError, match="needs the model's digest"):
        encode_task(RoundTask(4, 1.7e9, None, model))
    whole = decode_global(decode_envelope(encode_global(model)))  # model/current: whole, float32, exact
    assert model_digest(whole.params) == model_digest(model.params) and whole.training == model.training
