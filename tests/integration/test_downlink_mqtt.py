"""The global model as deltas through a real Mosquitto: the real aggregator publishes each version's change on
model/delta/<version>, the real agents (paho links) rebuild the aggregator's model bit for bit from them, and stop
reading model/current once they hold a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_agent.broker import LocalBroker
from edge_agent.codec.downlink import model_digest
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.transport import MqttLink

from .mqtt_fleet import running_fleet


@pytest.fixture(scope="module")
def fed(embedded: Any) -> FederatedData:
    return federate(embedded, PartitionConfig())


def test_agents_follow_the_changes_and_hold_the_aggregators_model_exactly(broker: LocalBroker, fed: FederatedData,
                                                                          tmp_path: Path) -> None:
    train = TrainingConfig(strategy="fedavg", rounds=3, seed=0, codec="sign1+rot", downlink_codec="int8")
    with running_fleet(broker, fed, tmp_path, rounds=3, train=train) as fleet:
        fleet.wait_for("every round scored by every device", fleet.all_rounds_have_accuracy)
        agg = fleet.aggregator
        fleet.wait_for("the devices to hold the last version", lambda: all(
            a.held is not None and a.held.version == agg.server.version for a in fleet.agents))
        assert agg.server.version == 3
        want = model_digest(agg.server.params)
        for agent in fleet.agents:
            assert agent.held is not None and model_digest(agent.held.params) == want
            assert not agent.whole_models
            assert isinstance(agent.link, MqttLink)
            assert agent.link._subscriptions.keys() == {  # model/current only to start: not restored any more
                agg.topics.round_current, agg.topics.model_delta_filter, agg.topics.receipt(agent.cfg.device_id)}
            assert agent.refusals.total() == 0
