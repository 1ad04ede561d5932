"""What an operator reads in the journal and scrapes: presence lines that a flapping fleet cannot flood,
rejection reasons as a bounded label set, metrics in a private registry per service."""

from __future__ import annotations

import logging

import pytest

from edge_agent.aggregator.metrics import REJECTION_REASONS, Metrics, PrometheusMetrics, judge_reason
from edge_agent.aggregator.presence import PresenceLog
from edge_agent.aggregator.rounds import RoundConfig, judge, open_round


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_thousand_flapping_devices_cost_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.presence")
    clock = Clock()
    presence = PresenceLog(log, clock, max_lines=20, interval_s=60.0)
    online: set[str] = set()
    with caplog.at_level(logging.INFO, logger="test.presence"):
        for flap in range(2):
            for i in range(1000):
                device = f"dev-{i}"
                going_online = flap == 0
                (online.add if going_online else online.discard)(device)
                presence.changed(device, going_online, len(online))
            clock.now += 30.0
            presence.flush()
        clock.now += 30.0
        presence.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "device dev-0 joined (1 online)"
    assert lines[19] == "device dev-19 joined (20 online)"
    # Both bursts fell in the first 60 s window: 20 lines, then one summary for the rest.
    assert len(lines) == 21, lines
    assert lines[20].startswith("presence: 980 more joined and 1000 more left in the last 60 s")
    assert lines[20].endswith("; 0 online")


def test_a_quiet_fleet_gets_every_change_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    presence = PresenceLog(logging.getLogger("test.quiet"), clock, max_lines=2, interval_s=10.0)
    with caplog.at_level(logging.INFO, logger="test.quiet"):
        for i in range(5):
            presence.changed("dev", i % 2 == 0, 1 - i % 2)
            clock.now += 10.0
    assert [r.getMessage() for r in caplog.records] == [
        "device dev joined (1 online)", "device dev left (0 online)", "device dev joined (1 online)",
        "device dev left (0 online)", "device dev joined (1 online)"]


class _Update:
    def __init__(self, **kw: object) -> None:
        self.device_id, self.round, self.model_version, self.update_id = "a", 1, 0, "u"
        self.strategy, self.num_examples, self.tensors = "fedavg", 5, {}
        self.__dict__.update(kw)


@pytest.mark.parametrize(("update", "label"), [
    (_Update(round=2), "wrong_round"), (_Update(model_version=3), "wrong_model_version"),
    (_Update(device_id="z"), "not_selected"), (_Update(strategy="ditto"), "wrong_strategy"),
    (_Update(num_examples=0), "bad_num_examples"), (_Update(), "wrong_tensors")])
def test_every_refusal_of_the_round_rules_has_its_own_label(update: _Update, label: str) -> None:
    state = open_round(1, 0, ("a", "b"), 0.0, RoundConfig(min_clients=1, fraction=1.0, deadline_s=60.0, rounds=3))
    verdict = judge(state, update, strategy="fedavg", expected={"w": (2, 3)})  # type: ignore[arg-type]
    assert judge_reason(verdict.reason) == label, verdict.reason
    assert judge_reason(judge(None, update, strategy="fedavg", expected={}).reason) == "no_open_round"  # type: ignore[arg-type]
    assert label in REJECTION_REASONS


def test_metrics_live_in_a_private_registry_per_service() -> None:
    pytest.importorskip("prometheus_client")
    a, b = PrometheusMetrics(), PrometheusMetrics()  # two services in one process: no clash, no sharing
    a.update_rejected("not_selected")
    a.update_rejected("something new")
    a.round_opened(4)
    a.round_closed(False, 2.0)
    text_a, ctype = a.exposition()
    text_b, _ = b.exposition()
    assert ctype.startswith("text/plain")
    assert b'edgefl_updates_rejected_total{reason="not_selected"} 1.0' in text_a
    assert b'edgefl_updates_rejected_total{reason="other"} 1.0' in text_a
    assert b"edgefl_rounds_failed_total 1.0" in text_a and b"edgefl_current_round 4.0" in text_a
    assert b'edgefl_updates_rejected_total{reason="not_selected"} 0.0' in text_b
    assert Metrics().exposition() is None


def _drain(service: object) -> None:
    import queue

    link = service.link  # type: ignore[attr-defined]
    while True:
        try:
            service.handle(link.inbox.get_nowait())  # type: ignore[attr-defined]
        except queue.Empty:
            return


def test_agents_and_the_aggregator_log_losing_the_broker_and_coming_back(caplog: pytest.LogCaptureFixture) -> None:
    from edge_agent.agent.service import AgentService
    from edge_agent.agent.sources import DataSource
    from edge_agent.aggregator.service import AggregatorService
    from edge_agent.config import AgentConfig, AggregatorConfig, BrokerConfig
    from edge_agent.db import MEMORY
    from edge_agent.memory_broker import MemoryBroker

    class NoData(DataSource):
        description = "nothing"

        def client_data(self) -> None:
            return None

    broker = MemoryBroker()
    cfg = BrokerConfig(host="memory")
    agent = AgentService(AgentConfig(device_id="dev-a", state_dir=MEMORY, fleet="logs", broker=cfg), NoData(),
                         link_factory=broker.link_factory)
    aggregator = AggregatorService(AggregatorConfig(state=MEMORY, fleet_name="logs", broker=cfg),
                                   link_factory=broker.link_factory)
    with caplog.at_level(logging.INFO, logger="edge_fl"):
        aggregator.start()
        agent.start()
        _drain(aggregator)
        _drain(agent)
        broker.restart()
        _drain(agent)
        _drain(aggregator)
        agent.link.reconnect()  # type: ignore[attr-defined]
        aggregator.link.reconnect()  # type: ignore[attr-defined]
        _drain(agent)
        _drain(aggregator)
    text = [(r.name, r.getMessage()) for r in caplog.records]
    assert ("edge_fl.agent", "lost connection to the broker: connection lost; reconnecting with backoff") in text
    assert any(n == "edge_fl.agent" and m.startswith("back on the broker after ") for n, m in text), text
    assert any(n == "edge_fl.aggregator" and m.startswith("back on the broker after ") for n, m in text), text
    assert ("edge_fl.aggregator", "device dev-a joined (1 online)") in text
    agent.shutdown()
    aggregator.shutdown()
