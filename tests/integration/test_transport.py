"""MqttLink against a real Mosquitto: acknowledgements, limits, wills, reconnects, sessions."""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from edge_agent.broker import LocalBroker
from edge_agent.transport import (
    ConnectionEvent,
    Message,
    NotConnected,
    PayloadTooLarge,
    PublishTimeout,
    publish_packet_size,
)
from tests.integration.conftest import LinkFactory, Stopwatch, assert_inbox_empty, next_event, next_item, next_message

LIMIT = 262144  # max_packet_size in broker_config/mosquitto-dev.conf


def test_qos1_publish_is_acknowledged_and_delivered(make_link: LinkFactory) -> None:
    sub = make_link("aggregator")
    sub.subscribe("edgefl/f1/update/#")
    pub = make_link("device")

    code = pub.publish("edgefl/f1/update/dev-1/3", b"\x01\x02update", expiry_s=60,
                       user_properties=[("kind", "update"), ("round", "3")])
    assert code == 0  # someone subscribed: plain success
    assert pub.publish("edgefl/f1/nobody/listens", b"x") == 0x10  # "No matching subscribers"

    assert next_message(sub) == Message("edgefl/f1/update/dev-1/3", b"\x01\x02update", 1, False,
                                        (("kind", "update"), ("round", "3")))
    pub.publish_nowait("edgefl/f1/update/dev-1/telemetry", b"t")  # QoS 0, no ack awaited
    assert next_message(sub).qos == 0


def test_retained_message_reaches_a_late_subscriber(make_link: LinkFactory) -> None:
    agg = make_link("aggregator")
    agg.publish("edgefl/f1/round/current", b"round 4", retain=True)
    late = make_link("device")
    late.subscribe("edgefl/f1/round/#")
    message = next_message(late)
    assert (message.topic, message.payload, message.retain) == (
        "edgefl/f1/round/current", b"round 4", True)


def test_oversized_payload_is_refused_before_sending(make_link: LinkFactory) -> None:
    sub = make_link("aggregator")
    sub.subscribe("edgefl/f1/update/#")
    pub = make_link("device")

    with pytest.raises(PayloadTooLarge, match=r"'edgefl/f1/update/dev-1/1' is 300000 bytes.*"
                                              r"limit of 261120 bytes"):
        pub.publish("edgefl/f1/update/dev-1/1", b"x" * 300_000)
    with pytest.raises(PayloadTooLarge):
        pub.publish_nowait("edgefl/f1/update/dev-1/1", b"x" * 300_000)
    pub.publish("edgefl/f1/update/dev-1/2", b"sentinel")

    # The sentinel is the first thing the subscriber sees, and the publisher never lost its
    # connection (Mosquitto would have disconnected it for an oversized packet).
    assert next_message(sub).payload == b"sentinel"
    assert pub.connected
    assert_inbox_empty(pub)


def test_broker_packet_limit_is_enforced_exactly(make_link: LinkFactory) -> None:
    """With our own limit lifted, the CONNACK Maximum-Packet-Size still guards the broker."""
    sub = make_link("aggregator")
    sub.subscribe("big/#")
    pub = make_link("device", max_payload_bytes=10 * LIMIT)
    topic = "big/chunk"
    fits = max(n for n in range(LIMIT - 64, LIMIT)
               if publish_packet_size(topic, n, 1, b"\x00") <= LIMIT)

    assert pub.publish(topic, b"z" * fits) == 0  # a packet of exactly the limit passes
    assert len(next_message(sub).payload) == fits
    with pytest.raises(PayloadTooLarge, match="broker's Maximum-Packet-Size of 262144"):
        pub.publish(topic, b"z" * (fits + 1))
    assert pub.connected


WILL_CLIENT = textwrap.dedent("""
    import os, signal, sys
    from edge_agent.transport import MqttLink
    host, port, user, password = sys.argv[1:5]
    link = MqttLink("dev-will", host, int(port), username=user, password=password,
                    will=("edgefl/f1/presence/dev-will", b"offline", True), keepalive_s=2)
    link.connect(timeout=5)
    link.publish("edgefl/f1/presence/dev-will", b"online", retain=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no DISCONNECT, no cleanup: a crash
""")


def test_will_is_published_when_a_client_process_dies(broker: LocalBroker,
                                                      make_link: LinkFactory) -> None:
    watcher = make_link("aggregator")
    watcher.subscribe("edgefl/f1/presence/#")
    proc = subprocess.run(
        [sys.executable, "-c", WILL_CLIENT, broker.host, str(broker.port), "device",
         broker.users["device"]], capture_output=True, text=True, timeout=30)
    assert proc.returncode == -9, proc.stderr
    clock = Stopwatch()
    assert next_message(watcher).payload == b"online"
    will = next_message(watcher, timeout=10)
    assert (will.topic, will.payload) == ("edgefl/f1/presence/dev-will", b"offline")
    # The kernel closes a killed process's socket, so Mosquitto sends the will at once; the
    # keepalive (2 s, x1.5) only matters when the network, not the process, disappears.
    assert clock() < 2.0
    # Retained: a dashboard that subscribes later still sees the device as offline.
    late = make_link("aggregator")
    late.subscribe("edgefl/f1/presence/dev-will")
    assert next_message(late).payload == b"offline"


def test_broker_crash_and_comeback(broker: LocalBroker, make_link: LinkFactory) -> None:
    link = make_link("device", client_id="dev-crash")
    link.subscribe("edgefl/f1/round/#")

    broker.kill()  # SIGKILL: the broker saves nothing, so the session is lost too
    clock = Stopwatch()
    event = next_event(link)
    assert event == ConnectionEvent(False, "connection lost")
    assert clock() < 2.0
    assert not link.connected
    clock = Stopwatch()
    with pytest.raises(NotConnected):
        link.publish("edgefl/f1/update/dev-crash/1", b"u", timeout=2)
    assert clock() < 0.5  # fails at once, does not wait for a timeout

    broker.start()  # same port and work directory
    event = next_event(link, timeout=10)  # paho's reconnect loop, no help from us
    assert event.connected and "new session" in event.reason
    # The broker forgot the subscription; the link restored it before announcing itself.
    agg = make_link("aggregator")
    assert agg.publish("edgefl/f1/round/current", b"round 5") == 0
    assert next_message(link).payload == b"round 5"
    assert link.publish("edgefl/f1/update/dev-crash/1", b"u") < 0x80


def test_unanswered_publish_times_out_and_inflight_publish_fails_on_loss(
        broker: LocalBroker, make_link: LinkFactory) -> None:
    link = make_link("device")
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)  # alive but silent: the PUBLISH is sent, no PUBACK
    try:
        clock = Stopwatch()
        with pytest.raises(PublishTimeout, match="no PUBACK .* within 0.3 s"):
            link.publish("edgefl/f1/update/x/1", b"u", timeout=0.3)
        assert clock() < 1.0
        # Now lose the connection while a publish waits for its PUBACK (fault injected after
        # the publish has certainly been sent): it fails at once, not after its 10 s timeout.
        crash = threading.Timer(0.5, broker.kill)
        crash.start()
        clock = Stopwatch()
        with pytest.raises(NotConnected, match="lost"):
            link.publish("edgefl/f1/update/x/2", b"u", timeout=10)
        assert clock() < 3.0
        crash.join()
    finally:
        if broker.pid is not None:
            os.kill(broker.pid, signal.SIGCONT)
    assert next_event(link) == ConnectionEvent(False, "connection lost")


def test_clean_restart_resumes_session_and_subscription(broker: LocalBroker,
                                                        make_link: LinkFactory) -> None:
    agg = make_link("aggregator")
    agg.publish("edgefl/f1/round/current", b"round 5", retain=True)
    link = make_link("device", client_id="dev-restart")
    link.subscribe("edgefl/f1/round/#")
    assert next_message(link).payload == b"round 5"
    broker.restart()  # SIGTERM: sessions and retained messages are persisted
    assert next_event(link) == ConnectionEvent(False, "connection lost")
    event = next_event(link, timeout=10)
    assert event.connected and "session resumed" in event.reason
    assert next_event(agg) == ConnectionEvent(False, "connection lost")
    assert next_event(agg, timeout=10).connected
    agg.publish("edgefl/f1/round/current", b"round 6")
    # Restoring the subscriptions of a resumed session did not replay the retained "round 5".
    assert next_message(link).payload == b"round 6"
    assert_inbox_empty(link)


def test_socket_traffic_counts_what_crossed_the_connections_and_keeps_it_across_a_reconnection(
        broker: LocalBroker, make_link: LinkFactory) -> None:
    sub = make_link("aggregator")
    sub.subscribe("edgefl/f1/update/#")
    pub = make_link("device")
    sent0, _ = pub.socket_traffic() or (0, 0)
    _, received0 = sub.socket_traffic() or (0, 0)
    pub.publish("edgefl/f1/update/dev-1/1", b"u" * 10_000)
    assert next_message(sub).payload == b"u" * 10_000
    sent1, _ = pub.socket_traffic() or (0, 0)
    _, received1 = sub.socket_traffic() or (0, 0)
    # The payload plus its PUBLISH header (topic, packet id, properties): a few dozen bytes.
    assert 10_000 < sent1 - sent0 < 10_100, sent1 - sent0
    assert 10_000 < received1 - received0 < 10_100, received1 - received0
    broker.restart()
    assert next_event(pub) == ConnectionEvent(False, "connection lost")
    assert next_event(pub, timeout=10).connected
    after = pub.socket_traffic()
    assert after is not None and after[0] >= sent1  # the old connection's bytes are kept, the new one's added


def test_persistent_session_receives_what_was_published_while_away(
        make_link: LinkFactory) -> None:
    first = make_link("device", client_id="dev-away", clean_start=False)
    first.subscribe("edgefl/f1/task/dev-away")
    first.close()  # clean DISCONNECT: no will, but the session stays for session_expiry_s

    agg = make_link("aggregator")
    for i in range(3):
        # The broker queues them for the absent session (reason 0: it has a subscriber).
        assert agg.publish("edgefl/f1/task/dev-away", f"task {i}".encode()) == 0

    again = make_link("device", client_id="dev-away", clean_start=False, connect=False)
    again.connect(timeout=5)  # no subscribe() call: the session brings the subscription
    items = [next_item(again) for _ in range(4)]
    assert isinstance(items[0], ConnectionEvent) and "session resumed" in items[0].reason
    assert [m.payload for m in items[1:] if isinstance(m, Message)] == [
        b"task 0", b"task 1", b"task 2"]


def test_clean_start_discards_the_previous_session(make_link: LinkFactory) -> None:
    first = make_link("device", client_id="dev-fresh")
    first.subscribe("edgefl/f1/task/dev-fresh")
    first.close()
    agg = make_link("aggregator")
    agg.publish("edgefl/f1/task/dev-fresh", b"stale")
    fresh = make_link("device", client_id="dev-fresh", clean_start=True)
    fresh.subscribe("edgefl/f1/model/#")
    agg.publish("edgefl/f1/model/current", b"sentinel")
    assert next_message(fresh).payload == b"sentinel"  # not "stale"


def test_manual_ack_redelivers_what_was_not_acknowledged(make_link: LinkFactory) -> None:
    agg = make_link("aggregator", client_id="agg-ack", manual_ack=True, receive_maximum=5)
    agg.subscribe("edgefl/f1/update/#")
    dev = make_link("device")
    for i in range(8):
        dev.publish(f"edgefl/f1/update/dev-1/{i}", b"u%d" % i)

    held = [next_message(agg) for _ in range(5)]
    assert [m.payload for m in held] == [b"u0", b"u1", b"u2", b"u3", b"u4"]
    # Receive-Maximum 5: the broker sends no more until we acknowledge (bounded negative check).
    with pytest.raises(queue.Empty):
        agg.inbox.get(timeout=0.3)
    agg.ack(held[0])
    agg.ack(held[0])  # idempotent
    assert next_message(agg).payload == b"u5"

    agg.close()  # u1..u5 were never acknowledged; u6, u7 are queued in the session
    again = make_link("aggregator", client_id="agg-ack", manual_ack=True, connect=False)
    again.connect(timeout=5)
    assert next_event(again).connected
    payloads = [next_message(again).payload for _ in range(7)]
    assert payloads == [b"u1", b"u2", b"u3", b"u4", b"u5", b"u6", b"u7"]  # not u0
    for m in held:
        again.ack(m)  # messages of another link or connection: ignored, no error


def test_a_link_without_tls_says_so_loudly(make_link: LinkFactory, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.transport"):
        make_link("device", client_id="dev-plain")
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NOT encrypted" in warnings[0] and "[broker.tls]" in warnings[0]


def test_closing_survives_paho_losing_its_own_wakeup_socket(make_link: LinkFactory,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # paho's disconnect() can race its network thread on the self-pipe and raise EBADF (paho.mqtt.python#673);
    # seen once as `edge-fl: error: [Errno 9]` when a stop signal ended the demo. The race cannot be caused on
    # demand, so the fault is injected: close() must still stop the network thread, and say nothing.
    link = make_link("device")
    real_disconnect = link._client.disconnect

    def racing_disconnect(*args: object, **kwargs: object) -> object:
        real_disconnect()
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(link._client, "disconnect", racing_disconnect)
    link.close()
    assert link._client._thread is None  # loop_stop() ran: no network thread left behind


def test_a_qos0_flood_is_dropped_past_the_backlog_and_qos1_still_arrives(make_link: LinkFactory,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    # QoS 0 is outside Receive-Maximum's window: without a bound, a device flooding telemetry grows the
    # aggregator's inbox without limit. Nothing consumes the inbox until the flood is over, so everything past
    # the backlog is dropped; the QoS 1 message that follows it on the same connection is not.
    caplog.set_level(logging.WARNING, logger="edge_agent.transport")
    sub = make_link("aggregator", max_qos0_backlog=5)
    sub.subscribe("edgefl/f1/telemetry/+", qos=1)
    pub = make_link("device")
    for i in range(50):
        pub.publish_nowait("edgefl/f1/telemetry/dev-1", b"t%d" % i, qos=0)
    pub.publish("edgefl/f1/telemetry/dev-1", b"the last", qos=1)
    deadline = time.monotonic() + 10
    while sub.qos0_dropped < 45 and time.monotonic() < deadline:  # the flood has reached the subscriber
        time.sleep(0.01)
    got = [next_message(sub).payload for _ in range(6)]
    assert got == [b"t0", b"t1", b"t2", b"t3", b"t4", b"the last"]
    assert sub.qos0_dropped == 45
    assert_inbox_empty(sub)
    assert any("QoS 0 message(s) dropped" in r.getMessage() for r in caplog.records)


def test_a_full_inbox_holds_the_broker_back_and_loses_nothing(make_link: LinkFactory) -> None:
    # Receive-Maximum should keep a broker from sending more unacknowledged messages than a client asked for;
    # Mosquitto 2.0.11 sends its queue past it once acknowledgements flow. max_inbox stops reading the
    # connection instead: the rest waits in the broker (and TCP), and every message still arrives once.
    sub = make_link("aggregator", manual_ack=True, receive_maximum=256, max_inbox=40)
    sub.subscribe("edgefl/f1/update/+/+", qos=1)
    pub = make_link("device")
    for i in range(400):
        pub.publish_nowait(f"edgefl/f1/update/dev-{i}/1", b"u%d" % i, qos=1)
    deadline = time.monotonic() + 10
    while sub.inbox.qsize() < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # a moment in which an unbounded link would take in the whole queue
    assert sub.inbox.qsize() == 40
    seen: set[bytes] = set()
    peak = 0
    while len(seen) < 400:
        msg = next_message(sub)
        peak = max(peak, sub.inbox.qsize())
        sub.ack(msg)  # acknowledgements flow: the case in which the broker oversteps Receive-Maximum
        seen.add(msg.payload)
    assert seen == {b"u%d" % i for i in range(400)} and peak <= 40
    assert sub.held_back_s > 0.5  # the network thread waited for room, then went on
    assert_inbox_empty(sub)
