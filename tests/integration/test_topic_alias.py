"""MQTT v5 topic aliases (MqttLink(topic_aliases=True)) against a real Mosquitto.

The device's link goes through a small TCP relay that counts the bytes it sends and can drop a connection (or
what the device sends on it), so that the bytes saved and the behaviour across reconnections are seen on the wire.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.broker import DEV_CONFIG, LocalBroker
from edge_agent.transport import ConnectionEvent, MqttLink, PublishError
from tests.integration.conftest import LinkFactory, assert_inbox_empty, next_event, next_message, running

TOPIC = "edgefl/f1/telemetry/dev-001"  # what a device publishes every round
# Short enough that every packet's remaining length fits one byte, so the byte counts below are exact.
PAYLOAD = b'{"device": "dev-001", "version": 3, "personal_acc": 0.877, "global_acc": 0.842}'


class Relay:
    """A TCP relay from a loopback port to the broker: counts the bytes clients send, drops them on request."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.sent = 0  # bytes received from clients (client -> broker)
        self.swallow = False  # True: what clients send is counted and dropped, as a dying network would
        self.swallowed = threading.Event()  # something was dropped
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client:
                    with self.lock:
                        self.sent += len(data)
                        if self.swallow:
                            self.swallowed.set()
                            continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)

    def cut(self) -> None:
        """Drop every connection (both ends see it end), and forward again from now on."""
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            _close(s)
        with self.lock:
            self.swallow = False

    def close(self) -> None:
        self.server.close()
        self.cut()


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@pytest.fixture
def relay(broker: LocalBroker) -> Iterator[Relay]:
    r = Relay(broker.host, broker.port)
    yield r
    r.close()


@pytest.fixture
def device_link(broker: LocalBroker, relay: Relay) -> Iterator[Callable[..., MqttLink]]:
    """``device_link(client_id, **kwargs)``: a connected MqttLink logged in as ``device``, through the relay."""
    links: list[MqttLink] = []

    def factory(client_id: str, **kwargs: Any) -> MqttLink:
        link = MqttLink(client_id, "127.0.0.1", relay.port, username="device", password=broker.users["device"],
                        reconnect_min_s=0.1, reconnect_max_s=0.5, **kwargs)
        links.append(link)
        link.connect(timeout=5)
        assert next_event(link).connected
        return link

    yield factory
    for link in links:
        link.close()


def _bytes_for_rounds(link: MqttLink, relay: Relay, rounds: int) -> int:
    """Bytes the link sent to publish `rounds` telemetry messages (each publish returns after its PUBACK, so its
    bytes have all passed the relay by then)."""
    before = relay.sent
    for _ in range(rounds):
        assert link.publish(TOPIC, PAYLOAD) == 0
    return relay.sent - before


def test_a_repeated_topic_travels_as_an_alias_and_arrives_under_its_full_topic(
        make_link: LinkFactory, device_link: Callable[..., MqttLink], relay: Relay) -> None:
    sub = make_link("aggregator")
    sub.subscribe("edgefl/f1/#")
    plain = device_link("dev-plain", topic_aliases=False)
    aliased = device_link("dev-alias", topic_aliases=True)

    without = _bytes_for_rounds(plain, relay, 5)
    with_aliases = _bytes_for_rounds(aliased, relay, 5)

    # 1st message: the topic; 2nd: the topic and the alias that names it (3 bytes of property);
    # 3rd to 5th: the alias alone, len(TOPIC) - 3 bytes less each than the topic.
    assert aliased.sent_with_alias == 3
    assert without - with_aliases == 3 * (len(TOPIC) - 3) - 3
    assert without == 5 * (2 + 2 + len(TOPIC) + 2 + 1 + len(PAYLOAD))  # header, length, topic, id, props
    for _ in range(10):
        message = next_message(sub)
        assert (message.topic, message.payload) == (TOPIC, PAYLOAD)

    # QoS 0 never uses an alias (it could overtake the QoS 1 message that introduces one); neither does a topic
    # published once (update topics carry their round).
    aliased.publish_nowait(TOPIC, b"qos 0")
    aliased.publish("edgefl/f1/update/dev-alias/7", b"update")
    assert [(m.topic, m.payload) for m in (next_message(sub), next_message(sub))] == [
        (TOPIC, b"qos 0"), ("edgefl/f1/update/dev-alias/7", b"update")]
    assert aliased.sent_with_alias == 3
    assert_inbox_empty(aliased)


def test_aliases_start_afresh_on_every_connection(
        make_link: LinkFactory, device_link: Callable[..., MqttLink], relay: Relay) -> None:
    sub = make_link("aggregator")
    sub.subscribe("edgefl/f1/#")
    link = device_link("dev-1", topic_aliases=True)
    for _ in range(3):
        link.publish(TOPIC, PAYLOAD)
    assert link.sent_with_alias == 1

    relay.cut()
    assert next_event(link) == ConnectionEvent(False, "connection lost")
    assert next_event(link).connected

    # The broker forgot the alias with the old connection: the first message names its topic again (with a new
    # alias: the topic is known to repeat), the next one uses that alias.
    first = _bytes_for_rounds(link, relay, 1)
    assert link.sent_with_alias == 1
    second = _bytes_for_rounds(link, relay, 1)
    assert link.sent_with_alias == 2
    assert first - second == len(TOPIC)
    for _ in range(5):
        assert (next_message(sub).topic, link.connected) == (TOPIC, True)
    assert_inbox_empty(link)  # no further disconnection: the broker never saw an alias it did not know


def test_a_message_sent_as_an_alias_and_lost_is_sent_again_with_its_topic(
        make_link: LinkFactory, device_link: Callable[..., MqttLink], relay: Relay) -> None:
    """paho sends an unacknowledged QoS 1 message again after reconnecting, as it was built: with an alias of the
    old connection, Mosquitto would DISCONNECT the device (protocol error) at every reconnection, for ever."""
    sub = make_link("aggregator")
    sub.subscribe("edgefl/f1/#")
    link = device_link("dev-1", topic_aliases=True)
    for _ in range(2):
        link.publish(TOPIC, PAYLOAD)
    assert [next_message(sub).topic for _ in range(2)] == [TOPIC, TOPIC]

    relay.swallow = True  # the network dies under the next message
    link.publish_nowait(TOPIC, b"lost once", qos=1)
    assert link.sent_with_alias == 1
    assert relay.swallowed.wait(5)  # it left the device and never reached the broker
    relay.cut()
    assert next_event(link) == ConnectionEvent(False, "connection lost")
    assert next_event(link).connected

    message = next_message(sub)
    assert (message.topic, message.payload) == (TOPIC, b"lost once")
    assert link.publish(TOPIC, b"after") == 0
    assert next_message(sub).payload == b"after"
    assert_inbox_empty(link)  # connected since: no "protocol error" disconnection


def test_no_more_aliases_than_the_broker_allows(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Mosquitto's max_topic_alias is announced in CONNACK (Topic-Alias-Maximum); an alias above it, or any alias
    when it is 0, makes the broker DISCONNECT the client."""
    for maximum, aliased in ((1, 1), (0, 0)):
        config = tmp_path / f"alias-{maximum}.conf"
        config.write_text(DEV_CONFIG.read_text() + f"\nmax_topic_alias {maximum}\n")
        with running(LocalBroker(tmp_path / f"broker-{maximum}", config=config), request) as broker:
            sub = MqttLink("sub", broker.host, broker.port, username="aggregator",
                           password=broker.users["aggregator"])
            link = MqttLink("dev-1", broker.host, broker.port, username="device", password=broker.users["device"],
                            topic_aliases=True)
            try:
                sub.connect(timeout=5)
                sub.subscribe("edgefl/f1/#")
                link.connect(timeout=5)
                topics = [TOPIC, "edgefl/f1/presence/dev-001"]
                for topic in topics * 3:  # the first topic takes the one alias there may be
                    assert link.publish(topic, PAYLOAD) == 0
                assert link.sent_with_alias == aliased
                assert next_event(sub).connected
                assert [next_message(sub).topic for _ in range(6)] == topics * 3
                assert next_event(link).connected
                assert_inbox_empty(link)
            finally:
                link.close()
                sub.close()


def test_the_acl_judges_the_topic_an_alias_stands_for(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Mosquitto resolves the alias first, then checks its ACL; a refused message still introduces its alias."""
    acl = tmp_path / "acl"
    acl.write_text("pattern write edgefl/+/telemetry/%u\nuser aggregator\ntopic readwrite edgefl/#\n")
    config = tmp_path / "acl.conf"
    config.write_text(DEV_CONFIG.read_text() + f"\nacl_file {acl}\n")
    with running(LocalBroker(tmp_path / "broker", config=config), request) as broker:
        link = MqttLink("dev-1", broker.host, broker.port, username="device", password=broker.users["device"],
                        topic_aliases=True)
        try:
            link.connect(timeout=5)
            for _ in range(3):
                with pytest.raises(PublishError, match=r"Not authorized \(0x87\)"):
                    link.publish("edgefl/f1/telemetry/someone-else", b"x")
                assert link.publish("edgefl/f1/telemetry/device", b"x") == 0x10  # allowed; nobody listens
            assert link.sent_with_alias == 2
            assert next_event(link).connected
            assert_inbox_empty(link)  # never disconnected
        finally:
            link.close()
