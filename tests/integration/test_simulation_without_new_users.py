"""A dataset whose users all federate (no held-out user) has no new-user accuracy: `None` in every round and in
the summary, not the nan of an empty mean, and the rest of the results are those of the same fleet with its
held-out users (they never take part in training)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from edge_agent.data.federated import federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.sim import run_simulation


def _without(result: dict[str, Any], key: str) -> dict[str, Any]:
    """`result` with `key` left out of its summary and of every round's record."""
    return {"rounds": [{k: v for k, v in r.items() if k != key} for r in result["rounds"]],
            "summary": {k: v for k, v in result["summary"].items() if k != key}}


def test_no_new_users_means_no_new_user_accuracy(embedded: Any) -> None:
    data = federate(embedded, PartitionConfig("natural", seed=0))
    alone = replace(data, new_user_x=data.new_user_x[:0], new_user_y=data.new_user_y[:0])
    config = TrainingConfig(strategy="fedavg", rounds=2, seed=3)  # a strategy that has a head for a new user

    result = run_simulation(alone, config)
    with_new_users = run_simulation(data, config)

    assert [r["new_user_acc"] for r in result["rounds"]] == [None, None]
    assert result["summary"]["new_user_acc"] is None
    assert all(isinstance(r["new_user_acc"], float) for r in with_new_users["rounds"])
    assert _without(result, "new_user_acc") == _without(with_new_users, "new_user_acc")
    json.dumps(result, allow_nan=False)  # what `edge-fl simulate --out` writes
