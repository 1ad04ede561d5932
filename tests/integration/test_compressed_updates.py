"""Compressed updates through the real agent and aggregator services (run_simulation: in-process broker, real
codecs, real envelopes and frames) on the real recordings: every codec is decoded and counted, what the devices pay
for is the whole payload, and the lossless frame learns what the float32 envelope learns."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.aggregator.rounds import Outcome
from edge_agent.aggregator.service import AggregatorService
from edge_agent.codec.compression import CodecSpec, payload_bytes
from edge_agent.codec.update_frame import HEADER_SIZE, frame_seeds, pack_update_frame
from edge_agent.config import AggregatorConfig, BrokerConfig, FleetConfig
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.memory_broker import MemoryBroker
from edge_agent.sim import run_simulation

CODECS = ["float32", "float16", "int8", "int8+sr", "int4", "sign1", "sign1+rot", "topk:0.05", "subsample:0.05"]


@pytest.fixture(scope="module")
def natural(embedded: Any) -> FederatedData:
    return federate(embedded, PartitionConfig("natural", seed=0))


def _shapes(data: FederatedData) -> dict[str, tuple[int, ...]]:
    cfg = TrainingConfig(strategy="fedavg")
    svc = AggregatorService(AggregatorConfig(state=":memory:", embedding_dim=data.embedding_dim,
                                             num_classes=data.num_classes, broker=BrokerConfig(host="memory"),
                                             train=cfg), link_factory=MemoryBroker().link_factory)
    return svc.strategy.upload_shapes(svc.server)


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_crosses_the_services_and_every_update_is_counted(natural: FederatedData, codec: str) -> None:
    out = run_simulation(natural, TrainingConfig(strategy="fedavg", rounds=2, seed=0, codec=codec))
    assert [r["clients_reporting"] for r in out["rounds"]] == [len(natural.clients)] * 2
    per_update = out["summary"]["uplink_bytes_per_client_round"]
    ceiling = HEADER_SIZE + payload_bytes(_shapes(natural), CodecSpec.parse(codec))
    # The whole frame: its fixed header plus what the codec says (topk: at most, plus its length bytes).
    slack = 8 if codec.startswith("topk") else 0
    assert HEADER_SIZE < per_update <= ceiling + slack, (per_update, ceiling)


def test_the_lossless_frame_learns_what_the_float32_envelope_learns_in_a_third_less(natural: FederatedData) -> None:
    frame = run_simulation(natural, TrainingConfig(strategy="fedavg", rounds=10, seed=0, codec="float32"))
    envelope = run_simulation(natural, TrainingConfig(strategy="fedavg", rounds=10, seed=0, int8_updates=False))
    # The change from the global model, sent exactly: only float32 rounding of (base + change) differs.
    assert abs(frame["summary"]["mean_acc"] - envelope["summary"]["mean_acc"]) <= 0.005
    assert frame["summary"]["uplink_bytes_per_client_round"] < envelope["summary"]["uplink_bytes_per_client_round"]


@pytest.mark.parametrize("downlink", ["float32", "int8", "sign1+rot"])
def test_every_downlink_codec_crosses_the_services_and_devices_pay_for_it_only(natural: FederatedData,
                                                                             downlink: str) -> None:
    whole = run_simulation(natural, TrainingConfig(strategy="fedavg", rounds=6, seed=0, codec="int8"))
    deltas = run_simulation(natural, TrainingConfig(strategy="fedavg", rounds=6, seed=0, codec="int8",
                                                    downlink_codec=downlink))
    assert [r["clients_reporting"] for r in deltas["rounds"]] == [len(natural.clients)] * 6
    down, down_whole = (r["summary"]["downlink_bytes_per_client_round"] for r in (deltas, whole))
    # A task without tensors and one change, instead of the whole model (int8) in every task and again on
    # model/current; the whole float32 model a device reads once at the start is included. Float32 changes cost
    # more than int8 whole models: they are the exact reference, not a saving.
    ceiling = {"float32": 1.5, "int8": 0.75, "sign1+rot": 0.5}[downlink]
    assert down < down_whole * ceiling, (down, down_whole)
    if downlink == "float32":  # the change sent exactly: devices train from the aggregator's float32 model, not
        # the int8 copy of it whole models go down as, so the results differ by no more than that rounding
        assert abs(deltas["summary"]["mean_acc"] - whole["summary"]["mean_acc"]) <= 0.01


def test_a_frame_that_does_not_fit_the_rounds_tensors_is_refused_with_the_reason(tmp_path: Path,
                                                                                 natural: FederatedData) -> None:
    devices = ["dev-1"]
    cfg = AggregatorConfig(state=str(tmp_path / "agg.db"), fleet_name="c", embedding_dim=natural.embedding_dim,
                           num_classes=natural.num_classes, broker=BrokerConfig(host="memory"),
                           fleet=FleetConfig(expected_clients=1),
                           train=TrainingConfig(strategy="fedavg", rounds=1, codec="int8"))
    svc = AggregatorService(cfg, link_factory=MemoryBroker().link_factory, clock=lambda: 1000.0)
    svc.start()
    svc.online = set(devices)
    svc.maybe_open()
    assert svc.state is not None
    shapes = {k: (s[0] + 1, *s[1:]) for k, s in svc.strategy.upload_shapes(svc.server).items()}  # one row too many
    spec = CodecSpec.parse("int8")
    from edge_agent.codec.compression import encode_tensor

    update_id = uuid.uuid4().hex
    seed_of = frame_seeds("dev-1")
    rng = np.random.default_rng(0)  # not constant: a constant tensor is 5 bytes whatever its shape
    encoded = {k: encode_tensor(rng.normal(0, 0.01, s).astype(np.float32), spec, seed_of(1, update_id, k))
               for k, s in shapes.items()}
    payload = pack_update_frame(round_no=1, model_version=svc.server.version, update_id=update_id, num_examples=5,
                                codec=spec, encoded=encoded, shapes=shapes)
    settled = svc.ingest(payload, svc.topics.update("dev-1", 1), "dev-1")
    assert settled.outcome is Outcome.REJECTED and "malformed update" in settled.reason
    assert svc.store.accepted_count(1) == 0
    svc.shutdown()
