"""One round engine: `simulate` is the real aggregator and agents on the in-memory broker.

The golden file holds what `edge-fl simulate` computed with its own loop, before it ran the services;
the engine must reproduce it exactly (fraction 1), for several strategies and regimes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.data.partition import PartitionConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.data.federated import federate
from edge_agent.sim import run_simulation

GOLDEN = Path(__file__).parent / "golden" / "simulate_fraction1.json"


def test_simulate_reproduces_the_golden_results_exactly(embedded: Any) -> None:
    golden = json.loads(GOLDEN.read_text())
    digest = hashlib.sha256(embedded.train_emb.tobytes() + embedded.test_emb.tobytes()).hexdigest()
    assert digest == golden["embeddings_sha256"], (
        "this machine's backbone gives other embeddings than the machine that wrote the golden file, so the "
        "comparison would test the interpreter, not the engine")
    checked = 0
    for key, want in golden["results"].items():
        regime, strategy = key.split("/")
        data = federate(embedded, PartitionConfig(regime, seed=0))
        got = run_simulation(data, TrainingConfig(strategy=strategy, rounds=3, seed=0))
        assert got["summary"] == want["summary"], key
        assert got["rounds"] == want["rounds"], key
        checked += 1
    assert checked == 12


@pytest.mark.parametrize("fraction", [0.5, 0.34])
def test_a_sampled_round_takes_the_devices_the_aggregator_selects(embedded: Any, fraction: float) -> None:
    from edge_agent.aggregator import rounds
    from edge_agent.learning import rng

    data = federate(embedded, PartitionConfig("natural", seed=0))
    got = run_simulation(data, TrainingConfig(strategy="fedavg", rounds=4, seed=3, fraction=fraction))
    for record in got["rounds"]:
        want = rounds.select_devices(sorted(data.client_ids), fraction, rng.selection(3, record["round"]))
        assert record["clients_reporting"] == len(want) == max(1, round(fraction * len(data.clients)))
    assert np.isfinite(got["summary"]["mean_acc"])
