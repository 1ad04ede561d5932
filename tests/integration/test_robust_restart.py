"""A trimmed-mean or median round keeps every update it accepted across a restart of the aggregator (the same
state file, as after SIGKILL: the accumulator and its norms are committed with each accepted update), so the
round's result is what it would have been without the restart; and the adaptive norm bound persists."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from edge_agent.aggregator.service import AggregatorService
from edge_agent.codec.envelope import Envelope, Kind, encode_envelope
from edge_agent.config import AggregatorConfig, BrokerConfig, FleetConfig
from edge_agent.learning.robust import RobustConfig, StackedUpdates
from edge_agent.learning.training import TrainingConfig
from edge_agent.memory_broker import MemoryBroker

DEVICES = ("d0", "d1", "d2", "d3")


def _service(state: Path, broker: MemoryBroker, rule: str) -> AggregatorService:
    cfg = AggregatorConfig(state=str(state), fleet_name="r", embedding_dim=8, num_classes=3,
                           broker=BrokerConfig(host="memory"), fleet=FleetConfig(expected_clients=4),
                           train=TrainingConfig(strategy="fedavg", rounds=2, adapter_dim=4),
                           aggregator=RobustConfig(rule=rule, clip="clip", clip_ceiling=1.0))
    svc = AggregatorService(cfg, link_factory=broker.link_factory, clock=lambda: 1000.0)
    svc.start()
    return svc


def _send(svc: AggregatorService, device: str, scale: float) -> None:
    assert svc.state is not None
    tensors = {k: (v + scale).astype(np.float32) for k, v in svc.server.params.items()}
    env = Envelope(kind=Kind.UPDATE, device_id=device, round=svc.state.round, model_version=svc.server.version,
                   strategy="fedavg", update_id=uuid.uuid4().hex, num_examples=10, tensors=tensors, codec="float32")
    svc.ingest(encode_envelope(env), svc.topics.update(device, svc.state.round), device)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_a_restart_loses_no_accepted_update_of_a_stacked_round(tmp_path: Path, rule: str) -> None:
    broker = MemoryBroker()
    state = tmp_path / "agg.db"
    svc = _service(state, broker, rule)
    svc.online = set(DEVICES)
    svc.maybe_open()
    for device, scale in zip(DEVICES[:3], (0.01, 0.02, 5.0), strict=True):  # the last one is clipped
        _send(svc, device, scale)
    before = svc.acc.to_arrays()
    norms, counts = list(svc.round_norms), list(svc.round_counts)
    svc.shutdown()  # the state file is all a SIGKILL leaves: nothing is written at shutdown

    again = _service(state, broker, rule)
    assert isinstance(again.acc, StackedUpdates) and again.acc.count == 3
    assert again.round_norms == norms and len(norms) == 3
    assert again.round_counts == counts == [10, 10, 10]
    for k, v in before.items():
        np.testing.assert_array_equal(again.acc.to_arrays()[k], v)
    _send(again, DEVICES[3], 0.03)
    again.online = set(DEVICES)
    again.maybe_close()  # every selected device reported
    assert again.server.version == 1
    bound = again.norm_bound
    assert bound < 1.0  # adapted to the fleet's norms (the ceiling is 1.0)
    assert again.count_cap == 20  # count_factor 2 x the median claim (10), where it was max_examples
    again.shutdown()
    third = _service(state, broker, rule)
    assert third.norm_bound == bound  # the norm history is part of the durable state ...
    assert third.count_cap == 20  # ... and so is the count history
    third.shutdown()
