"""Error feedback's residual on the device: stored with the update it belongs to, in one transaction, and dropped
when it no longer means anything. And a task whose codec this build does not know is refused, saying so."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent.store import AgentStore, OutboxItem, Residual
from edge_agent.codec.envelope import decode_envelope
from edge_agent.fleet import FleetMessageError, GlobalModel, decode_global, encode_global
from edge_agent.learning.head import HeadConfig
from edge_agent.learning.strategies import ClientState
from edge_agent.learning.training import TrainingConfig

SHAPES = {"adapter.w": (4, 3), "adapter.b": (3,)}


def _residual(version: int = 2, codec: str = "topk:0.05", fill: float = 0.5) -> Residual:
    return Residual(codec, version, {k: np.full(s, fill, np.float32) for k, s in SHAPES.items()})


def _item(update_id: str, round_no: int) -> OutboxItem:
    return OutboxItem(update_id, round_no, f"edgefl/f/update/d/{round_no}", b"frame", None)


def test_the_residual_is_committed_with_its_update_and_not_without_it(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    state = ClientState({"classifier.w": np.zeros((3, 2), np.float32)})
    store.commit_round(1, 0, state, _item("u1", 1), _residual(0, fill=0.5))
    saved = store.residual()
    assert saved is not None and saved.codec == "topk:0.05" and saved.model_version == 0
    assert all(np.array_equal(saved.arrays[k], np.full(s, 0.5, np.float32)) for k, s in SHAPES.items())
    # Round 1 again: the round log refuses it, and the whole transaction goes, the new residual with it.
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_round(1, 1, state, _item("u2", 1), _residual(1, fill=9.0))
    again = store.residual()
    assert again is not None and again.model_version == 0 and float(again.arrays["adapter.b"][0]) == 0.5
    assert [i.update_id for i in store.outbox(include_sent=True)] == ["u1"]
    store.close()
    reopened = AgentStore(tmp_path / "agent.db")  # and it survives a restart
    kept = reopened.residual()
    assert kept is not None and float(kept.arrays["adapter.w"][0, 0]) == 0.5
    reopened.close()


def test_a_residual_is_dropped_for_another_codec_other_tensors_or_a_model_long_gone() -> None:
    r = _residual(version=10)
    assert r.stale("topk:0.05", SHAPES, 11, max_age=8) is None
    assert r.stale("topk:0.05", SHAPES, 10, max_age=8) is None  # a failed round: the same version again
    assert "codec changed from topk:0.05 to sign1" in (r.stale("sign1", SHAPES, 11, max_age=8) or "")
    assert "shared tensors changed" in (r.stale("topk:0.05", {"adapter.w": (4, 3)}, 11, max_age=8) or "")
    assert "shared tensors changed" in (r.stale("topk:0.05", {**SHAPES, "adapter.w": (4, 4)}, 11, max_age=8) or "")
    assert "9 behind" in (r.stale("topk:0.05", SHAPES, 19, max_age=8) or "")


def _model(codec: str) -> GlobalModel:
    head = HeadConfig(4, 2, 0)
    return GlobalModel(1, TrainingConfig(strategy="fedavg", codec=codec), head,
                       {"classifier.w": np.zeros((4, 2), np.float32), "classifier.b": np.zeros(2, np.float32)})


def test_a_model_announces_its_codec_and_an_unknown_one_is_refused_by_name() -> None:
    model = decode_global(decode_envelope(encode_global(_model("sign1+rot"))))
    assert model.training.codec == "sign1+rot" and str(model.update_codec) == "sign1+rot"
    env = decode_envelope(encode_global(_model("topk:0.05")))
    env.meta["train.codec"] = "zstd:9"  # type: ignore[index]  # a codec of a newer edge-fl
    with pytest.raises(FleetMessageError, match="codec 'zstd:9'.*valid forms"):
        decode_global(env)


def test_a_model_from_an_aggregator_without_codecs_means_whole_int8_tensors() -> None:
    env = decode_envelope(encode_global(_model("")))
    del env.meta["train.codec"]  # type: ignore[attr-defined]  # what an earlier release sends
    model = decode_global(env)
    assert model.training.codec == "" and model.update_codec is None and model.codec == "int8"
