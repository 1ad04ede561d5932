"""Bounded influence through a real Mosquitto: one authenticated device sends an update of 1e30 values and updates
that claim 2^62 examples; with the robust configuration (median, norm clipping) the fleet's model is unharmed.
And the default configuration still computes the golden simulation exactly (test_engine.py checks the file;
here the default [aggregator] table is checked to be the one that file was made with: no bound bites)."""

from __future__ import annotations

import queue
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.agent.service import AgentService
from edge_agent.agent.sources import FixedSource
from edge_agent.aggregator.service import AggregatorService
from edge_agent.broker import LocalBroker
from edge_agent.codec.envelope import Envelope, Kind, decode_envelope, encode_envelope
from edge_agent.config import AgentConfig, AggregatorConfig, BrokerConfig, FleetConfig
from edge_agent.data.federated import federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.db import MEMORY
from edge_agent.fleet import decode_task
from edge_agent.learning.robust import RobustConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.protocol import Topics
from edge_agent.sim import Attack, run_simulation
from edge_agent.transport import Message, MqttLink

from .mqtt_fleet import _serve

FLEET = "poison"
ROUNDS = 3
HONEST = 3


def test_a_malicious_device_cannot_harm_the_model_with_the_robust_config(broker: LocalBroker, tmp_path: Path,
                                                                          embedded: Any) -> None:
    fed = federate(embedded, PartitionConfig("natural", seed=0))
    topics = Topics(FLEET)

    def broker_cfg(user: str) -> BrokerConfig:
        return BrokerConfig(host=broker.host, port=broker.port, username=user, password=broker.users[user])

    agg_cfg = AggregatorConfig(
        state=str(tmp_path / "aggregator.db"), fleet_name=FLEET, embedding_dim=fed.embedding_dim,
        num_classes=fed.num_classes, broker=broker_cfg("aggregator"),
        fleet=FleetConfig(expected_clients=HONEST + 1, min_clients=HONEST, deadline_s=60),
        train=TrainingConfig(strategy="fedavg", rounds=ROUNDS, seed=0),
        aggregator=RobustConfig(rule="median", clip="clip"))
    stop = threading.Event()
    aggregators: list[AggregatorService] = []
    agents: list[AgentService] = []
    threads = []

    def spawn(build: Any, started: list[Any]) -> None:
        ready = threading.Event()
        threads.append(threading.Thread(target=_serve, args=(build, started, ready, stop), daemon=True))
        threads[-1].start()
        assert ready.wait(30) and started, "a service did not start: see the log above"

    evil = MqttLink("dev-evil", broker.host, broker.port, username="device", password=broker.users["device"],
                    clean_start=True)
    try:
        spawn(lambda: AggregatorService(agg_cfg), aggregators)
        for i in range(HONEST):
            spawn(lambda i=i: AgentService(AgentConfig(device_id=f"dev-{i}", state_dir=MEMORY, fleet=FLEET,
                                                       rng_stream=i, broker=broker_cfg("device")),
                                           FixedSource(fed.clients[i], f"dev-{i}")), agents)
        evil.connect(timeout=10)
        evil.subscribe(topics.round_current, qos=1)
        evil.publish(topics.presence("dev-evil"), b"online", retain=True)
        aggregator = aggregators[0]
        seen: set[int] = set()
        while len(seen) < ROUNDS:
            try:
                msg = evil.inbox.get(timeout=60)
            except queue.Empty:
                raise AssertionError(f"no round task after round(s) {sorted(seen)}") from None
            if not isinstance(msg, Message) or not msg.payload:
                continue
            task = decode_task(decode_envelope(msg.payload))
            if task.round in seen:
                continue
            seen.add(task.round)
            assert task.bounds["rule"] == "median" and task.bounds["norm_bound"] > 0  # announced
            g = task.model.params

            def send(tensors: dict[str, np.ndarray], n: int, t: Any = task) -> None:
                env = Envelope(kind=Kind.UPDATE, device_id="dev-evil", round=t.round, model_version=t.model.version,
                               strategy="fedavg", update_id=uuid.uuid4().hex, num_examples=n, tensors=tensors,
                               codec="float32")
                evil.publish(topics.update("dev-evil", t.round), encode_envelope(env), qos=1)

            send({k: np.full_like(v, 1e30) for k, v in g.items()}, 500)            # huge: rejected at ingest
            send({k: (v - 5.0).astype(np.float32) for k, v in g.items()}, 2**62)  # a 2^62 count, far off
        done = aggregator.done.wait(120)
        assert done, "the fleet did not finish its rounds"

        def scored() -> bool:
            rounds = aggregator.view.snapshot()["rounds"]
            return len(rounds) == ROUNDS and all(r["devices_reporting_acc"] == HONEST for r in rounds)
        for _ in range(600):
            if scored():
                break
            stop.wait(0.05)
        assert scored(), "the honest devices did not all report the final model's accuracy"
        final = aggregator.server.params
        assert all(np.isfinite(v).all() and float(np.abs(v).max()) < 100 for v in final.values())
        rounds = aggregator.view.snapshot()["rounds"]
        assert [r["reported"] for r in rounds] == [HONEST + 1] * ROUNDS  # the count update counted, bounded
        assert all(r["rejected"] >= 1 for r in rounds)  # the huge one refused every round
        attacked = rounds[-1]["global_acc"]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        evil.close()

    # The same honest devices without any attacker, in the in-memory fleet: the attacked fleet stays close.
    honest = federate(embedded, PartitionConfig("natural", seed=0))
    clean = run_simulation(_first(honest, HONEST), TrainingConfig(strategy="fedavg", rounds=ROUNDS, seed=0),
                           robust=RobustConfig(rule="median", clip="clip"))
    clean_acc = float(np.mean(list(clean["rounds"][-1]["client_acc"].values())))
    assert attacked >= clean_acc - 0.05, (attacked, clean_acc)


def _first(fed: Any, n: int) -> Any:
    from dataclasses import replace
    return replace(fed, client_ids=fed.client_ids[:n], clients=fed.clients[:n])


def test_without_bounds_the_same_attack_does_harm(embedded: Any) -> None:
    # The damage the robust configuration prevents is real: the in-memory fleet, one device claiming 2^62
    # examples, the mean without any bound (what edge-fl did before) against the same fleet with the median.
    data = federate(embedded, PartitionConfig("natural", seed=0))
    cfg = TrainingConfig(strategy="fedavg", rounds=5, seed=0)
    bad = frozenset(data.client_ids[:1])

    def honest(result: dict[str, Any]) -> float:
        return float(np.mean([a for c, a in result["rounds"][-1]["client_acc"].items() if c not in bad]))
    unbounded = RobustConfig(max_abs=3e38, max_examples=2**63 - 1, count_factor=0)
    harmed = honest(run_simulation(data, cfg, robust=unbounded, attack=Attack(bad, "count")))
    guarded = honest(run_simulation(data, cfg, robust=RobustConfig(rule="median", clip="clip"),
                                    attack=Attack(bad, "count")))
    # The defaults: the liar counts for max_examples in the first round, then for count_factor x the median count.
    defaults = honest(run_simulation(data, cfg, attack=Attack(bad, "count")))
    clean = honest(run_simulation(data, cfg))
    assert harmed < clean - 0.03 and guarded > clean - 0.02 and defaults > clean - 0.02, (harmed, guarded, defaults,
                                                                                        clean)


@pytest.mark.parametrize("strategy", ["fedavg", "ditto"])
def test_the_default_bounds_change_nothing_for_an_honest_fleet(embedded: Any, strategy: str) -> None:
    # The default [aggregator] table caps weights at 10,000 examples and rejects |values| > 1e4: an honest fleet
    # never meets either, so its results are bit for bit those of the unbounded mean (the golden file's).
    data = federate(embedded, PartitionConfig("natural", seed=0))
    cfg = TrainingConfig(strategy=strategy, rounds=3, seed=0)
    default = run_simulation(data, cfg)
    unbounded = run_simulation(data, cfg, robust=RobustConfig(max_abs=3e38, max_examples=2**63 - 1, count_factor=0))
    # Bytes aside: the task announces the bounds, so its payload (and the digits of what it says) differ.
    def learning(result: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if not k.endswith("_bytes")} for r in result["rounds"]]

    assert learning(default) == learning(unbounded)


def test_without_bounds_a_poisoned_aggregate_is_never_published_and_the_simulation_finishes(embedded: Any) -> None:
    # Without bounds at ingest a 1e30 update poisons the aggregate. The aggregator's own last line (it never
    # publishes a model beyond the bound every device enforces) keeps the last good model: each round fails, the
    # devices keep evaluating version 0, and the simulation, which also reads devices' refusal reports, finishes.
    data = federate(embedded, PartitionConfig("natural", seed=0))
    cfg = TrainingConfig(strategy="fedavg", rounds=3, seed=0)
    bad = frozenset(data.client_ids[:1])
    result = run_simulation(data, cfg, robust=RobustConfig(max_abs=3e38, max_examples=2**63 - 1, count_factor=0),
                            attack=Attack(bad, "huge"))
    per_round = [r["client_acc"] for r in result["rounds"]]
    assert len(per_round) == 3 and per_round[0] == per_round[1] == per_round[2]
    assert all(0.0 <= a <= 1.0 for a in per_round[-1].values())
