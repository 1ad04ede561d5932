"""run_simulation's hooks for data that changes over a run (bench/continual.py): a staged source's new windows are
trained on from the round they arrive, and the heads handed to `watch_heads` are the ones the devices score their
telemetry with."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from edge_agent.data.federated import federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.learning.head import Int8Head
from edge_agent.learning.metrics import accuracy
from edge_agent.learning.strategies import ClientData
from edge_agent.learning.training import TrainingConfig
from edge_agent.sim import SimClient, StagedSource, run_simulation

ARRIVES = 3  # the round the second stage's windows arrive in
ROUNDS = 6
LATE_CLASS = 0  # absent from every device's first stage


def _without_late_class(cd: ClientData) -> ClientData:
    keep = cd.y_train != LATE_CLASS
    return replace(cd, x_train=cd.x_train[keep], y_train=cd.y_train[keep])


@pytest.mark.parametrize("strategy", ["ditto", "fedavg"])
def test_a_class_that_arrives_late_is_learned_only_from_its_round(embedded: Any, strategy: str) -> None:
    data = federate(embedded, PartitionConfig("natural", seed=0))
    data = replace(data, new_user_x=data.new_user_x[:0], new_user_y=data.new_user_y[:0])
    assert all(LATE_CLASS in cd.y_train and LATE_CLASS in cd.y_test for cd in data.clients)

    def staged(client: SimClient) -> StagedSource:
        return StagedSource([(1, _without_late_class(client.data)), (ARRIVES, client.data)], client.round_open,
                            client.client_id)

    heads: dict[int, dict[str, Int8Head]] = {}
    result = run_simulation(data, TrainingConfig(strategy=strategy, rounds=ROUNDS, seed=1), sources=staged,
                            watch_heads=lambda round_no, by_device: heads.update({round_no: dict(by_device)}))

    assert sorted(heads) == list(range(1, ROUNDS + 1))
    late_recall: dict[int, float] = {}
    for record in result["rounds"]:
        round_heads = heads[record["round"]]
        assert sorted(round_heads) == sorted(data.client_ids)
        hits, late = 0, 0
        for cid, cd in zip(data.client_ids, data.clients, strict=True):
            predicted = round_heads[cid].predict(cd.x_test)
            # The head handed over is the one the device's telemetry scored: the same accuracy, exactly.
            assert accuracy(predicted, cd.y_test) == record["client_acc"][cid], (record["round"], cid)
            is_late = cd.y_test == LATE_CLASS
            hits += int(np.sum(predicted[is_late] == LATE_CLASS))
            late += int(np.sum(is_late))
        late_recall[record["round"]] = hits / late
    # Before its windows arrive no device predicts the late class; from the round they arrive, devices recognise it.
    assert all(late_recall[r] == 0.0 for r in range(1, ARRIVES)), late_recall
    assert all(late_recall[r] > 0.5 for r in range(ARRIVES, ROUNDS + 1)), late_recall


def test_a_staged_source_refuses_stages_out_of_order(embedded: Any) -> None:
    cd = federate(embedded, PartitionConfig("natural", seed=0)).clients[0]
    with pytest.raises(ValueError, match="stages must start at round 1"):
        StagedSource([(2, cd)], lambda: 0, "client x")
    with pytest.raises(ValueError, match="increasing rounds"):
        StagedSource([(1, cd), (3, cd), (3, cd)], lambda: 0, "client x")
