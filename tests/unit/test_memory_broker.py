"""What only the in-memory twin has: its fault controls, its fake clock and its determinism.

The behaviour it shares with Mosquitto + MqttLink is tested against both in
tests/integration/test_link_contract.py.
"""

from __future__ import annotations

import pytest

from edge_agent.memory_broker import MemoryBroker, MemoryLink, topic_matches
from edge_agent.messaging import ConnectError, ConnectionEvent, Message, MqttError, NotConnected

LOST = ConnectionEvent(False, "connection lost")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drain(link: MemoryLink) -> list[Message | ConnectionEvent]:
    items = []
    while not link.inbox.empty():
        items.append(link.inbox.get_nowait())
    return items


def payloads(link: MemoryLink) -> list[bytes]:
    return [m.payload for m in drain(link) if isinstance(m, Message)]


def connected(broker: MemoryBroker, client_id: str, **kwargs: object) -> MemoryLink:
    link = broker.link_factory(client_id, "memory", 1883, **kwargs)  # type: ignore[arg-type]
    link.connect()
    assert drain(link) == [ConnectionEvent(True, "connected to memory:1883, new session")]
    return link


@pytest.mark.parametrize("topic_filter, topic, expected", [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
    ("a/#", "a/b/c", True), ("#", "a/b", True), ("+/+", "a/b", True), ("+", "a/b", False),
    ("a/+/c", "a//c", True), ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("$SYS/#", "$SYS/x", True),
])
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_a_crash_comes_back_with_the_last_save() -> None:
    broker = MemoryBroker()
    agg = connected(broker, "agg")
    dev = connected(broker, "dev")
    dev.subscribe("task/dev")
    agg.publish("model", b"v1", retain=True)
    dev.close()
    agg.publish("task/dev", b"queued before the save")
    broker.save()
    agg.publish("model", b"v2", retain=True)
    agg.publish("task/dev", b"queued after the save")

    broker.restart(lose_queued=True)
    assert drain(agg) == [LOST]
    with pytest.raises(NotConnected, match=r"not connected to memory:1883 \(connection lost\)"):
        agg.publish("x", b"x")
    agg.reconnect()
    assert drain(agg) == [ConnectionEvent(True, "connected to memory:1883, session resumed")]
    assert broker.retained_messages()["model"].payload == b"v1"
    again = broker.link_factory("dev", "memory", 1883)
    again.connect()
    assert payloads(again) == [b"queued before the save"]


def test_a_stopped_broker_refuses_connections_until_started() -> None:
    broker = MemoryBroker()
    link = connected(broker, "dev")
    broker.stop()
    assert drain(link) == [LOST] and not broker.running
    with pytest.raises(ConnectError, match="no MQTT broker answered at memory:1883 within 3 s"):
        link.reconnect(timeout=3)
    broker.start()
    link.reconnect()
    assert link.connected and drain(link) == [ConnectionEvent(True, "connected to memory:1883, session resumed")]


def test_credentials_are_checked_when_users_are_given() -> None:
    broker = MemoryBroker(users={"device": "secret"})
    with pytest.raises(ConnectError, match=r"refused client 'dev' \(user 'device'\): Not authorized \(0x87\) "
                                           r"\(check the username and password"):
        broker.link_factory("dev", "memory", 1883, username="device", password="wrong").connect()
    with pytest.raises(ConnectError, match=r"\(no username\): Not authorized"):
        broker.link_factory("dev", "memory", 1883).connect()
    broker.link_factory("dev", "memory", 1883, username="device", password="secret").connect()


def test_sessions_and_messages_expire_on_the_broker_clock() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    agg = connected(broker, "agg")
    dev = connected(broker, "dev", session_expiry_s=60)
    dev.subscribe("task/#")
    dev.close()
    agg.publish("task/1", b"expires", expiry_s=5)
    agg.publish("task/2", b"stays")
    agg.publish("model", b"short-lived", retain=True, expiry_s=5)
    clock.now += 10
    again = broker.link_factory("dev", "memory", 1883, session_expiry_s=60)
    again.connect()
    assert payloads(again) == [b"stays"]
    assert "model" not in broker.retained_messages()
    again.close()
    clock.now += 61
    assert agg.publish("task/3", b"x") == 0x10  # the session expired with its subscription
    assert broker.sessions() == ["agg"]


def test_a_taken_over_link_takes_the_id_back_when_reconnected() -> None:
    broker = MemoryBroker()
    first = connected(broker, "dup")
    second = broker.link_factory("dup", "memory", 1883)
    second.connect()
    assert drain(second) == [ConnectionEvent(True, "connected to memory:1883, session resumed")]
    assert drain(first) == [LOST]
    first.reconnect()  # what paho would do after its backoff
    assert drain(second) == [LOST]
    assert drain(first) == [ConnectionEvent(True, "connected to memory:1883, session resumed")]
    assert broker.connected_clients() == ["dup"]
    first.close()
    with pytest.raises(MqttError, match="closed"):
        first.reconnect()


def test_queue_limits_drop_messages_for_an_absent_session() -> None:
    broker = MemoryBroker(max_queued_messages=2)
    agg = connected(broker, "agg")
    dev = connected(broker, "dev")
    dev.subscribe("t")
    dev.drop()
    for i in range(3):
        assert agg.publish("t", b"%d" % i) == 0
    assert broker.pending("dev") == 2
    dev.reconnect()
    assert payloads(dev) == [b"0", b"1"]


def test_delivery_is_synchronous_and_in_subscription_order() -> None:
    broker = MemoryBroker()
    order: list[str] = []

    class Recorder(MemoryLink):
        def _on_message(self, message: Message, token: int | None) -> None:
            order.append(self.client_id)
            super()._on_message(message, token)

    links = [Recorder(broker, f"sub-{i}") for i in (2, 0, 1)]
    for link in links:
        link.connect()
        link.subscribe("t/#")
    pub = connected(broker, "pub")
    assert pub.publish("t/x", b"x") == 0
    assert order == ["sub-2", "sub-0", "sub-1"]  # all delivered before publish returned
