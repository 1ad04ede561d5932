"""A real aggregator and real agents in this process's threads, through a real Mosquitto (the `broker` fixture).

For the tests of what an operator sees (`edge-fl status`, the status page): the services are the real ones
with the real paho link, so what they publish and serve is what a deployed fleet publishes and serves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from edge_agent.agent.service import AgentService
from edge_agent.agent.sources import FixedSource
from edge_agent.aggregator.service import AggregatorService
from edge_agent.broker import LocalBroker
from edge_agent.config import AgentConfig, AggregatorConfig, BrokerConfig, FleetConfig
from edge_agent.data.federated import FederatedData
from edge_agent.db import MEMORY
from edge_agent.learning.training import TrainingConfig

FLEET = "ops"


class _Service(Protocol):
    def start(self, timeout: float = ...) -> None: ...
    def run(self, stop: threading.Event) -> None: ...


S = TypeVar("S", bound=_Service)


@dataclass
class RunningFleet:
    aggregator: AggregatorService
    agents: list[AgentService]
    state: Path
    stop: threading.Event
    threads: list[threading.Thread] = field(default_factory=list)

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        """Until `condition()` holds: the services run in other threads, so this looks at their state."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.stop.wait(0.05)

    def all_rounds_have_accuracy(self) -> bool:
        rounds = self.aggregator.view.snapshot()["rounds"]
        return len(rounds) == self.aggregator.round_config.rounds and all(
            r["devices_reporting_acc"] == len(self.agents) for r in rounds)


def _serve(build: Callable[[], S], started: list[S], ready: threading.Event, stop: threading.Event) -> None:
    """Build, start and run a service in this thread (its SQLite connection belongs to the thread that made it)."""
    try:
        service = build()
        service.start(timeout=10)
        started.append(service)
    finally:
        ready.set()
    service.run(stop)


@contextmanager
def running_fleet(broker: LocalBroker, fed: FederatedData, tmp_path: Path, *, rounds: int = 3, agents: int = 2,
                  http: str | None = None, train: TrainingConfig | None = None) -> Iterator[RunningFleet]:
    def broker_cfg(user: str) -> BrokerConfig:
        return BrokerConfig(host=broker.host, port=broker.port, username=user, password=broker.users[user])

    state = tmp_path / "aggregator.db"
    agg_cfg = AggregatorConfig(
        state=str(state), fleet_name=FLEET, embedding_dim=fed.embedding_dim, num_classes=fed.num_classes, http=http,
        broker=broker_cfg("aggregator"), fleet=FleetConfig(expected_clients=agents, min_clients=agents, deadline_s=60),
        train=train or TrainingConfig(strategy="fedavg", rounds=rounds, seed=0))

    def agent(i: int) -> AgentService:
        return AgentService(AgentConfig(device_id=f"dev-{i}", state_dir=MEMORY, fleet=FLEET, rng_stream=i,
                                        broker=broker_cfg("device")), FixedSource(fed.clients[i], f"dev-{i}"))

    stop = threading.Event()
    threads: list[threading.Thread] = []
    aggregators: list[AggregatorService] = []
    services: list[AgentService] = []
    builds: list[tuple[Callable[[], Any], list[Any]]] = [(lambda: AggregatorService(agg_cfg), aggregators)]
    builds += [(lambda i=i: agent(i), services) for i in range(agents)]
    try:
        for build, started in builds:
            ready, before = threading.Event(), len(started)
            threads.append(threading.Thread(target=_serve, args=(build, started, ready, stop), daemon=True))
            threads[-1].start()
            ready.wait(30)
            assert len(started) > before, "a service did not start: see the log above"
        yield RunningFleet(aggregators[0], services, state, stop, threads)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
