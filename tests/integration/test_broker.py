"""LocalBroker and the broker configs, against the real Mosquitto binary."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from edge_agent.broker import DEV_CONFIG, BrokerError, LocalBroker
from edge_agent.transport import ConnectError, MqttLink, PublishError
from tests.integration.conftest import LinkFactory, assert_inbox_empty, next_event, next_message

CONFIG_DIR = DEV_CONFIG.parent


def _directives(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_starts_on_a_free_loopback_port_and_accepts(broker: LocalBroker,
                                                   make_link: LinkFactory) -> None:
    assert broker.host == "127.0.0.1"
    assert broker.port not in (0, 1883)
    assert "Opening ipv4 listen socket on port %d." % broker.port in broker.log()
    link = make_link("aggregator")
    assert link.connected
    # The limit in mosquitto-dev.conf reaches clients through CONNACK.
    assert link.broker_max_packet_size == 262144


@pytest.mark.parametrize("username, password", [(None, None), ("device", "wrong-password"),
                                                ("nobody", "x")])
def test_refuses_anonymous_and_bad_credentials(broker: LocalBroker, username: str | None,
                                               password: str | None) -> None:
    link = MqttLink("intruder", broker.host, broker.port, username=username, password=password)
    with pytest.raises(ConnectError) as err:
        link.connect(timeout=5)
    message = str(err.value)
    # Mosquitto 2.0 answers 0x87 for all three (not 0x86 "Bad user name or password").
    assert "Not authorized (0x87)" in message
    assert f"{broker.host}:{broker.port}" in message and "username and password" in message
    assert not link.connected
    link.close()


def test_unreachable_broker_is_a_connect_error_naming_host_and_port() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = MqttLink("lonely", "127.0.0.1", port, reconnect_min_s=0.1, reconnect_max_s=0.2)
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port} within 1 s.*broker is running"):
        link.connect(timeout=1)
    link.close()


def test_restart_keeps_port_and_retained_messages(broker: LocalBroker,
                                                  make_link: LinkFactory) -> None:
    port = broker.port
    publisher = make_link("aggregator")
    publisher.publish("edgefl/f1/model/current", b"manifest v7", retain=True)
    publisher.close()

    broker.restart()  # SIGTERM: mosquitto writes its persistence database, then starts again

    assert broker.port == port
    late = make_link("device")
    late.subscribe("edgefl/f1/model/current")
    message = next_message(late)
    assert (message.payload, message.retain) == (b"manifest v7", True)


def test_stop_leaves_no_process_and_is_idempotent() -> None:
    b = LocalBroker().start()
    pid, workdir = b.pid, b.workdir
    assert pid is not None and _pid_alive(pid)
    b.stop()
    assert not _pid_alive(pid)  # terminated and reaped, not a zombie
    assert b.returncode == 0  # mosquitto exits 0 on SIGTERM: the config loaded cleanly
    assert not workdir.exists()
    assert "mosquitto version" in b.log()  # the log outlives the work directory
    b.stop()  # idempotent
    with LocalBroker() as b2:
        pid2 = b2.pid
    assert pid2 is not None and not _pid_alive(pid2)


def test_missing_binary_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BrokerError, match="mosquitto not found: run scripts/setup"):
        LocalBroker(mosquitto="/nonexistent/mosquitto").start()
    # Nothing on PATH and nothing in /usr/sbin.
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match="installs the Debian package.*--broker"):
        LocalBroker().start()


def test_fixed_port_in_use_is_reported_with_the_broker_log() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        b = LocalBroker(port=port)
        with pytest.raises(BrokerError, match="Address already in use"):
            b.start(timeout=5)
        b.stop()


def test_dev_config_suits_mosquitto_2_0_and_2_1() -> None:
    directives = {words[0]: words[1:] for words in _directives(DEV_CONFIG)}
    assert "per_listener_settings" not in directives  # deprecated in 2.1
    assert "message_size_limit" not in directives  # deprecated since 1.6 for max_packet_size
    assert directives["max_packet_size"] == ["262144"]
    assert directives["allow_anonymous"] == ["false"]
    assert directives["persistence"] == ["true"]
    assert directives["listener"][1] == "127.0.0.1"
    for key in ("max_queued_messages", "max_inflight_messages", "set_tcp_nodelay"):
        assert key in directives, key
    prod = {words[0] for words in _directives(CONFIG_DIR / "mosquitto-prod.conf")}
    assert "per_listener_settings" not in prod


def test_acl_example_confines_devices_to_their_own_topics(tmp_path: Path) -> None:
    conf = tmp_path / "acl.conf"
    conf.write_text(DEV_CONFIG.read_text() + f"\nacl_file {CONFIG_DIR / 'acl.example'}\n")
    users = {"aggregator": "agg-pw", "dev-1": "pw-1", "dev-2": "pw-2", "operator": "op-pw"}
    with LocalBroker(config=conf, users=users) as b:
        links: list[MqttLink] = []

        def link(user: str) -> MqttLink:
            lk = MqttLink(user, b.host, b.port, username=user, password=users[user])
            links.append(lk)
            lk.connect(timeout=5)
            assert next_event(lk).connected
            return lk

        try:
            agg, dev1, dev2 = link("aggregator"), link("dev-1"), link("dev-2")
            operator = link("operator")
            agg.subscribe("edgefl/#")
            operator.subscribe("edgefl/#")
            # Mosquitto grants any subscription and filters at delivery time.
            dev1.subscribe("edgefl/+/update/#")
            dev1.subscribe("edgefl/f1/model/#")

            assert dev2.publish("edgefl/f1/update/dev-2/4", b"u") < 0x80
            assert dev2.publish("edgefl/f1/presence/dev-2", b"online", retain=True) < 0x80
            dev2.publish("edgefl/f1/telemetry/dev-2", b"t")
            for topic in ("edgefl/f1/update/dev-1/4", "edgefl/f1/model/current"):
                with pytest.raises(PublishError) as err:
                    dev2.publish(topic, b"forged")
                assert (err.value.reason_code, err.value.reason) == (0x87, "Not authorized")
            agg.publish("edgefl/f1/model/current", b"manifest")

            got = [next_message(agg).topic for _ in range(4)]
            assert got == ["edgefl/f1/update/dev-2/4", "edgefl/f1/presence/dev-2",
                           "edgefl/f1/telemetry/dev-2", "edgefl/f1/model/current"]
            # dev-1 sees the model but not dev-2's update, which was published before it.
            assert next_message(dev1).topic == "edgefl/f1/model/current"
            assert_inbox_empty(dev1)
            # The operator's read-only login (edge-fl status) sees presence and the model, never an update,
            # and may publish nothing.
            assert [next_message(operator).topic for _ in range(2)] == ["edgefl/f1/presence/dev-2",
                                                                         "edgefl/f1/model/current"]
            assert_inbox_empty(operator)
            with pytest.raises(PublishError):
                operator.publish("edgefl/f1/status", b"forged")
        finally:
            for lk in links:
                lk.close()
