"""Mutual TLS against a real Mosquitto running broker_config/mosquitto-prod.conf with broker_config/acl.example.

Certificates come from scripts/fleet-ca in a temporary directory (made once per module); one broker serves most
tests. What is checked: who gets in (no, expired, revoked or foreign certificates do not, each with an error that
says so), what an enrolled device can do to another one or to the aggregator (nothing that matters), the errors a
client sees when the broker is not what it expects, and a whole round run from the shipped example configs.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent.service import AgentService
from edge_agent.agent.sources import FixedSource
from edge_agent.aggregator.service import AggregatorService
from edge_agent.broker import LocalBroker, find_mosquitto
from edge_agent.config import AgentConfig, AggregatorConfig, check_table, read_toml
from edge_agent.data.federated import FederatedData, federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.db import MEMORY
from edge_agent.transport import ConnectError, ConnectionEvent, MqttLink, PublishError, TlsError, TlsOptions

from ..conftest import ROOT
from .conftest import Stopwatch, assert_inbox_empty, next_event, next_message
from .mqtt_fleet import RunningFleet, _serve

FLEET_CA = ROOT / "scripts" / "fleet-ca"
CONFIG_DIR = ROOT / "broker_config"
PROD = CONFIG_DIR / "mosquitto-prod.conf"
ACL = CONFIG_DIR / "acl.example"
F = "f1"  # the fleet name in topics

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None and not os.environ.get("CI"),
                                reason="openssl not installed (scripts/setup installs it)")


def fleet_ca(ca: Path, *args: str) -> None:
    done = subprocess.run([str(FLEET_CA), "--dir", str(ca), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet CA with a broker certificate for 127.0.0.1 only and the clients the tests use; and a foreign CA."""
    root = tmp_path_factory.mktemp("pki")
    ca = root / "ca"
    fleet_ca(ca, "init")
    fleet_ca(ca, "broker", "127.0.0.1")  # no "localhost" on purpose: the name-mismatch test connects by that name
    for name in ("aggregator", "operator", "dev-a", "dev-b", "dev-r", "dev-late"):
        fleet_ca(ca, "client", name)
    fleet_ca(ca, "client", "dev-old", "--start", "20200101000000Z", "--end", "20200201000000Z")
    fleet_ca(ca, "revoke", "dev-r")
    fleet_ca(root / "other", "init", "--name", "someone else's CA")
    fleet_ca(root / "other", "client", "dev-a")
    return root


def prod_config(pki: Path, dest: Path, **replace: Path) -> Path:
    """mosquitto-prod.conf with its certificate, CRL and ACL paths pointing at the test's files."""
    ca = pki / "ca"
    paths = {"cafile": ca / "ca.crt", "certfile": ca / "broker.crt", "keyfile": ca / "broker.key",
             "crlfile": ca / "crl.pem", "acl_file": ACL, **replace}
    lines = []
    for line in PROD.read_text().splitlines():
        words = line.split(maxsplit=1)
        lines.append(f"{words[0]} {paths[words[0]]}" if words and words[0] in paths else line)
    dest.write_text("\n".join(lines) + "\n")
    return dest


def start_broker(config: Path) -> LocalBroker:
    try:
        find_mosquitto()
    except Exception as err:  # BrokerError: its message says how to install mosquitto
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))
    # No users: LocalBroker's password file stays empty; the certificate is the only way in.
    return LocalBroker(config=config, users={}).start()


@pytest.fixture(scope="module")
def tls_broker(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    b = start_broker(prod_config(pki, tmp_path_factory.mktemp("prod") / "prod.conf"))
    # The test broker listens on its own loopback port, never on 8883 of every interface.
    assert f"listener {b.port} 127.0.0.1" in (b.workdir / "mosquitto.conf").read_text()
    yield b
    b.stop()


def tls_for(pki: Path, name: str, ca_dir: str = "ca", trust: str = "ca") -> TlsOptions:
    certs = pki / ca_dir / "clients"
    return TlsOptions(str(pki / trust / "ca.crt"), str(certs / f"{name}.crt"), str(certs / f"{name}.key"))


@pytest.fixture
def connect(tls_broker: LocalBroker, pki: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., MqttLink]]:
    """``connect(name, client_id=None, **kwargs)``: a connected MqttLink with ``name``'s certificate."""
    links: list[MqttLink] = []

    def factory(name: str, client_id: str | None = None, *, host: str | None = None, **kwargs: Any) -> MqttLink:
        kwargs.setdefault("tls", tls_for(pki, name))
        # Client ids are the certificates' CNs, shared by every test: never resume an earlier test's session.
        kwargs.setdefault("clean_start", True)
        kwargs.setdefault("reconnect_min_s", 0.1)
        kwargs.setdefault("reconnect_max_s", 0.5)
        link = MqttLink(client_id or name, host or tls_broker.host, tls_broker.port, **kwargs)
        links.append(link)
        link.connect(timeout=5)
        assert next_event(link).connected
        return link

    yield factory
    for link in links:
        link.close()
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        print(f"\n----- mosquitto log -----\n{tls_broker.log()[-6000:]}")


def refused(broker: LocalBroker, tls: TlsOptions | None, host: str | None = None) -> TlsError:
    """The TlsError of a connection attempt, which must fail fast (not wait for the connect timeout)."""
    link = MqttLink("x", host or broker.host, broker.port, tls=tls, reconnect_min_s=0.1)
    clock = Stopwatch()
    try:
        with pytest.raises(TlsError) as err:
            link.connect(timeout=10)
    finally:
        link.close()
    assert clock() < 3.0, "the failure must be reported at once, not after the connect timeout"
    return err.value


# --- who gets in -------------------------------------------------------------------------------------------------

def test_identity_is_the_certificate_not_what_the_client_says(connect: Callable[..., MqttLink],
                                                              tls_broker: LocalBroker) -> None:
    agg = connect("aggregator")
    agg.subscribe(f"edgefl/{F}/presence/#")
    # dev-a claims to be dev-b (client id and username): the broker uses the certificate's CN for both.
    a = connect("dev-a", client_id="dev-b", username="dev-b", password="whatever")
    assert a.publish(f"edgefl/{F}/presence/dev-a", b"online") == 0
    assert next_message(agg).topic == f"edgefl/{F}/presence/dev-a"
    with pytest.raises(PublishError) as err:
        a.publish(f"edgefl/{F}/presence/dev-b", b"online")
    assert err.value.reason_code == 0x87 and "must equal device_id" in str(err.value)
    assert "as dev-a (p5" in tls_broker.log() and "u'dev-a'" in tls_broker.log()


@pytest.mark.parametrize(("case", "kind", "alert", "says"), [
    ("no certificate", "refused-certificate", "certificate required", "needs a client certificate"),
    ("expired", "refused-certificate", "certificate expired", "renew it"),
    ("revoked", "refused-certificate", "certificate revoked", "enrolled again"),
    ("another CA", "refused-certificate", "unknown ca", "not signed by the CA it trusts"),
])
def test_the_broker_refuses_and_the_client_says_why(tls_broker: LocalBroker, pki: Path, case: str, kind: str,
                                                    alert: str, says: str) -> None:
    tls = {"no certificate": TlsOptions(str(pki / "ca" / "ca.crt")),
           "expired": tls_for(pki, "dev-old"),
           "revoked": tls_for(pki, "dev-r"),
           "another CA": tls_for(pki, "dev-a", ca_dir="other")}[case]
    err = refused(tls_broker, tls)
    assert (err.kind, err.alert) == (kind, alert)
    assert says in str(err) and f"{tls_broker.host}:{tls_broker.port}" in str(err)


def test_a_broker_we_cannot_trust_is_refused_by_the_client(tls_broker: LocalBroker, pki: Path,
                                                           tmp_path: Path) -> None:
    # Trusting another CA: the broker's certificate is unknown.
    err = refused(tls_broker, tls_for(pki, "dev-a", trust="other"))
    assert err.kind == "unknown-ca" and "ca_file must be the fleet CA" in str(err)
    # The certificate names 127.0.0.1 only; "localhost" reaches the same broker but is not its name.
    err = refused(tls_broker, tls_for(pki, "dev-a"), host="localhost")
    assert err.kind == "name-mismatch" and "'localhost'" in str(err) and "subjectAltName" in str(err)
    # An expired broker certificate (same CA): a second broker.
    ca2 = tmp_path / "ca2"
    shutil.copytree(pki / "ca", ca2)
    fleet_ca(ca2, "broker", "127.0.0.1", "--start", "20200101000000Z", "--end", "20200201000000Z")
    old = start_broker(prod_config(pki, tmp_path / "old.conf", certfile=ca2 / "broker.crt",
                                   keyfile=ca2 / "broker.key"))
    try:
        err = refused(old, tls_for(pki, "dev-a"))
        assert err.kind == "expired" and "renew it" in str(err)
    finally:
        old.stop()


def test_tls_and_plain_listeners_mixed_up(tls_broker: LocalBroker, broker: LocalBroker, pki: Path) -> None:
    # A TLS client at a plain listener (the dev broker).
    err = refused(broker, tls_for(pki, "dev-a"))
    assert err.kind == "not-tls" and "1883 is plain MQTT" in str(err)
    # A plain client at the TLS listener: the broker closes every attempt; the error points at TLS.
    link = MqttLink("plain", tls_broker.host, tls_broker.port, username="dev-a", password="x", reconnect_min_s=0.1,
                    reconnect_max_s=0.2)
    with pytest.raises(ConnectError, match=r"closed the connection before answering.*configure \[broker\.tls\]"):
        link.connect(timeout=1.5)
    link.close()


def test_local_tls_files_are_checked_when_the_link_is_made(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match=r"cannot load the CA file .*missing\.crt") as err:
        MqttLink("x", "127.0.0.1", 1, tls=TlsOptions(str(tmp_path / "missing.crt")))
    assert err.value.kind == "local"
    mixed = TlsOptions(str(pki / "ca" / "ca.crt"), str(pki / "ca" / "clients" / "dev-a.crt"),
                       str(pki / "ca" / "clients" / "dev-b.key"))
    with pytest.raises(TlsError, match="the key belongs to the certificate"):
        MqttLink("x", "127.0.0.1", 1, tls=mixed)


def test_an_encrypted_key_with_its_password_file(tls_broker: LocalBroker, pki: Path, tmp_path: Path) -> None:
    from edge_agent.enrol import make_key_and_csr

    key, csr = make_key_and_csr("dev-enc", tmp_path, password=b"s3cret")
    assert key.stat().st_mode & 0o777 == 0o600 and b"ENCRYPTED" in key.read_bytes()
    fleet_ca(pki / "ca", "sign", str(csr))
    crt = pki / "ca" / "clients" / "dev-enc.crt"
    (tmp_path / "pw").write_text("s3cret\n")
    ca = str(pki / "ca" / "ca.crt")
    link = MqttLink("dev-enc", tls_broker.host, tls_broker.port,
                    tls=TlsOptions(ca, str(crt), str(key), key_password_file=str(tmp_path / "pw")))
    link.connect(timeout=5)
    assert next_event(link).connected
    assert link.publish(f"edgefl/{F}/telemetry/dev-enc", b"{}") < 0x80
    link.close()


def test_mqtt_3_only_broker_gets_a_needs_mqtt_5_error() -> None:
    """A tiny real TCP peer that answers like a 3.1.1-only broker: CONNACK 'unacceptable protocol version'."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got_connect = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            if conn.recv(1)[:1] == b"\x10":  # CONNECT
                got_connect.set()
                conn.sendall(b"\x20\x02\x00\x01")  # MQTT 3.1.1 CONNACK, return code 1
                conn.recv(1024)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    link = MqttLink("dev-a", "127.0.0.1", port, reconnect_min_s=5)
    try:
        with pytest.raises(ConnectError, match=r"needs MQTT 5 and this broker speaks only MQTT 3\.1\.1"):
            link.connect(timeout=5)
    finally:
        link.close()
        server.close()
    assert got_connect.is_set()


# --- what an enrolled device can do to others ----------------------------------------------------------------------

def test_a_device_cannot_write_for_others_or_for_the_aggregator(connect: Callable[..., MqttLink]) -> None:
    agg = connect("aggregator")
    agg.subscribe(f"edgefl/{F}/#")
    a = connect("dev-a")
    for topic in (f"edgefl/{F}/update/dev-b/3", f"edgefl/{F}/presence/dev-b", f"edgefl/{F}/telemetry/dev-b",
                  f"edgefl/{F}/round/current", f"edgefl/{F}/model/current", f"edgefl/{F}/status",
                  f"edgefl/{F}/anything"):
        with pytest.raises(PublishError) as err:
            a.publish(topic, b"forged", retain=True)
        assert err.value.reason_code == 0x87, topic
    # The operator reads and writes nothing, not even as a device named "operator".
    op = connect("operator")
    for topic in (f"edgefl/{F}/update/operator/1", f"edgefl/{F}/presence/operator", f"edgefl/{F}/telemetry/operator",
                  f"edgefl/{F}/status"):
        with pytest.raises(PublishError):
            op.publish(topic, b"x")
    op.subscribe(f"edgefl/{F}/status")
    agg.publish(f"edgefl/{F}/status", b"sentinel")
    # None of the forgeries reached the aggregator: the first thing it sees is its own sentinel.
    assert next_message(agg).payload == b"sentinel"
    assert next_message(op).payload == b"sentinel"  # the operator still reads the status


def test_a_device_reads_neither_updates_nor_presence_of_others(connect: Callable[..., MqttLink]) -> None:
    a = connect("dev-a")
    a.subscribe(f"edgefl/{F}/#")  # Mosquitto grants it, then filters every delivery through the ACL
    b = connect("dev-b")
    agg = connect("aggregator")
    agg.subscribe(f"edgefl/{F}/update/#")
    b.publish(f"edgefl/{F}/update/dev-b/1", b"b's update")
    b.publish(f"edgefl/{F}/telemetry/dev-b", b"{}")
    assert next_message(agg).payload == b"b's update"
    agg.publish(f"edgefl/{F}/round/current", b"task")
    assert next_message(a).payload == b"task"  # the first thing a sees: nothing of b's came before it
    assert_inbox_empty(a)


WILL_CLIENT = textwrap.dedent("""
    import os, signal, sys
    from edge_agent.transport import MqttLink, TlsOptions
    host, port, ca, crt, key = sys.argv[1:6]
    link = MqttLink("dev-a", host, int(port), tls=TlsOptions(ca, crt, key),
                    will=("edgefl/f1/presence/dev-b", b"offline", True))
    link.connect(timeout=5)
    print("connected", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no DISCONNECT: the broker publishes the will, if the ACL lets it
""")


def test_a_forged_will_does_not_fake_anothers_presence(connect: Callable[..., MqttLink], tls_broker: LocalBroker,
                                                       pki: Path) -> None:
    agg = connect("aggregator")
    agg.subscribe(f"edgefl/{F}/presence/#")
    b = connect("dev-b")
    b.publish(f"edgefl/{F}/presence/dev-b", b"online", retain=True)
    assert next_message(agg).payload == b"online"
    t = tls_for(pki, "dev-a")
    proc = subprocess.run([sys.executable, "-c", WILL_CLIENT, tls_broker.host, str(tls_broker.port), t.ca_file,
                           str(t.cert_file), str(t.key_file)], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == -9 and "connected" in proc.stdout, proc.stderr
    b.publish(f"edgefl/{F}/presence/dev-b", b"still online")  # after the will would have been sent
    assert next_message(agg).payload == b"still online"
    assert_inbox_empty(agg)


def test_nobody_takes_anothers_or_the_aggregators_session(connect: Callable[..., MqttLink]) -> None:
    agg = connect("aggregator", client_id="edge-fl-aggregator-f1")
    b = connect("dev-b")
    for victim in ("dev-b", "aggregator", "edge-fl-aggregator-f1"):
        # The broker replaces the client id with the certificate's CN: this is a (re)connection of dev-a.
        connect("dev-a", client_id=victim)
    b.subscribe(f"edgefl/{F}/round/current")
    agg.publish(f"edgefl/{F}/round/current", b"task")  # both still hold their connections
    assert next_message(b).payload == b"task"
    assert agg.connected and b.connected
    assert_inbox_empty(agg)


def test_the_agent_says_clearly_when_the_broker_refuses_its_presence(connect: Callable[..., MqttLink],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    agg = connect("aggregator")
    agg.subscribe(f"edgefl/{F}/status")
    # A device whose configured id is not its certificate's CN: what a copied config does.
    a = connect("dev-a")
    with caplog.at_level(logging.ERROR, logger="edge_agent.transport"):
        a.publish_nowait(f"edgefl/{F}/presence/subject-04", b"online", qos=1, retain=True)
        a.publish(f"edgefl/{F}/telemetry/dev-a", b"{}")  # its PUBACK comes after the refused one's
    assert any("refused publish to 'edgefl/f1/presence/subject-04': Not authorized (0x87)" in r.message
               and "must equal device_id" in r.message for r in caplog.records), caplog.text


# --- revocation ----------------------------------------------------------------------------------------------------

def test_revocation_takes_effect_on_reload(pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What broker_config/README.md says: Mosquitto 2.0 re-reads crlfile on SIGHUP; open connections stay up."""
    ca = tmp_path / "ca"
    shutil.copytree(pki / "ca", ca)
    crl = tmp_path / "broker-crl.pem"
    shutil.copy(ca / "crl.pem", crl)
    b = start_broker(prod_config(pki, tmp_path / "p.conf", crlfile=crl))
    tls = tls_for(tmp_path, "dev-late", ca_dir="ca")
    try:
        kept = MqttLink("dev-late", b.host, b.port, tls=tls)
        kept.connect(timeout=5)
        assert next_event(kept).connected
        fleet_ca(ca, "revoke", "dev-late")
        shutil.copy(ca / "crl.pem", crl)
        mark = b.log().count("Reloading config.")
        assert b.pid is not None
        os.kill(b.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while b.log().count("Reloading config.") == mark:
            assert time.monotonic() < deadline, "mosquitto did not log the reload"
            time.sleep(0.02)
        err = refused(b, tls)
        assert err.alert == "certificate revoked"
        # The connection opened before the revocation is still up: restart the broker to cut it off now.
        assert kept.publish(f"edgefl/{F}/telemetry/dev-late", b"{}") < 0x80
        with caplog.at_level(logging.ERROR, logger="edge_agent.transport"):
            b.restart()
            assert next_event(kept) == ConnectionEvent(False, "connection lost")
            # paho retries; every refused attempt is a reason, logged once, not a silent stall.
            deadline = time.monotonic() + 10
            while not any("dev-late" in r.message and "certificate revoked" in r.message for r in caplog.records):
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.05)
        assert not kept.connected
        kept.close()
    finally:
        b.stop()


# --- the configs as shipped ----------------------------------------------------------------------------------------

def test_debian_conf_d_layout(pki: Path, tmp_path: Path) -> None:
    """The part above the 'standalone only' marker next to Debian's stock mosquitto.conf: loads and serves TLS."""
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    text = prod_config(pki, tmp_path / "full.conf").read_text()
    port = _free_port()
    # What the documented `sed '/^# >>> standalone only/,$d'` keeps.
    part = text.split("\n# >>> standalone only")[0].replace("listener 8883", f"listener {port} 127.0.0.1")
    directives = {line.split()[0] for line in part.splitlines() if line.strip() and not line.startswith("#")}
    assert not directives & {"persistence_location", "log_dest", "pid_file"} and "require_certificate" in directives
    (conf_d / "edgefl.conf").write_text(part)
    log = tmp_path / "mosquitto.log"
    # Debian 12's /etc/mosquitto/mosquitto.conf, with its paths moved into tmp_path.
    (tmp_path / "mosquitto.conf").write_text(
        f"pid_file {tmp_path}/mosquitto.pid\npersistence true\npersistence_location {tmp_path}/\n"
        f"log_dest file {log}\ninclude_dir {conf_d}\n"
        # As root, mosquitto would switch to the `mosquitto` user, which cannot write into tmp_path.
        f"user {pwd.getpwuid(os.getuid()).pw_name}\n")
    proc = subprocess.Popen([find_mosquitto(), "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not (log.exists() and " running" in log.read_text()):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.02)
        link = MqttLink("dev-a", "127.0.0.1", port, tls=tls_for(pki, "dev-a"))
        link.connect(timeout=5)
        assert next_event(link).connected
        link.close()
    finally:
        proc.terminate()
        proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def fed(embedded: Any) -> FederatedData:
    return federate(embedded, PartitionConfig())


def test_a_round_over_mutual_tls_from_the_example_configs(tls_broker: LocalBroker, pki: Path, fed: FederatedData,
                                                          tmp_path: Path) -> None:
    """deploy/*.example.toml as shipped, with only host, port, certificate paths and the fleet's size filled in."""
    ca = pki / "ca"

    def filled(name: str, identity: str) -> dict[str, Any]:
        data = read_toml(ROOT / "deploy" / name)
        broker = data["broker"]
        broker.update(host=tls_broker.host, port=tls_broker.port)
        broker["tls"].update(ca_file=str(ca / "ca.crt"), cert_file=str(ca / "clients" / f"{identity}.crt"),
                             key_file=str(ca / "clients" / f"{identity}.key"))
        return data

    # The examples sign too (deploy/README.md, "Keys"): the fleet's key, the devices' keys and the registry.
    from edge_agent import keys

    def key_file(name: str) -> tuple[str, bytes]:
        key = keys.new_private_key()
        keys.write_private_key(key, tmp_path / f"{name}.key")
        return str(tmp_path / f"{name}.key"), keys.public_pem(key.public_key())

    fleet_key, fleet_pub = key_file("fleet")
    (tmp_path / "fleet.pub").write_bytes(fleet_pub)
    registry = tmp_path / "devices"
    registry.mkdir()

    agg_data = filled("aggregator.example.toml", "aggregator")
    if "signing" in agg_data:
        agg_data["signing"].update(key=fleet_key, registry=str(registry))
    agg_data.update(state=str(tmp_path / "aggregator.db"), fleet_name=F, embedding_dim=fed.embedding_dim,
                    num_classes=fed.num_classes)
    agg_data["fleet"].update(expected_clients=2, min_clients=2, deadline_s=60)
    agg_data["train"].update(rounds=2)
    agg_cfg, problems, _ = check_table(agg_data, AggregatorConfig, "aggregator.example.toml")
    assert agg_cfg is not None, problems
    agents = []
    for i, device in enumerate(("dev-a", "dev-b")):
        data = filled("agent.example.toml", device)
        data.update(device_id=device, state_dir=MEMORY, fleet=F, rng_stream=i)
        if "signing" in data:
            device_key, device_pub = key_file(device)
            keys.register(registry, device, device_pub)
            data["signing"].update(key=device_key, fleet_keys=[str(tmp_path / "fleet.pub")])
        cfg, problems, _ = check_table(data, AgentConfig, "agent.example.toml")
        assert cfg is not None, problems
        agents.append(cfg)

    stop = threading.Event()
    started_agg: list[AggregatorService] = []
    started_agents: list[AgentService] = []
    builds: list[tuple[Callable[[], Any], list[Any]]] = [(lambda: AggregatorService(agg_cfg), started_agg)]
    builds += [(lambda i=i, c=c: AgentService(c, FixedSource(fed.clients[i], c.device_id)), started_agents)
               for i, c in enumerate(agents)]
    threads = []
    try:
        for build, started in builds:
            ready, before = threading.Event(), len(started)
            threads.append(threading.Thread(target=_serve, args=(build, started, ready, stop), daemon=True))
            threads[-1].start()
            ready.wait(30)
            assert len(started) > before, "a service did not start: see the log above"
        fleet = RunningFleet(started_agg[0], started_agents, tmp_path / "aggregator.db", stop, threads)
        fleet.wait_for("the last round", fleet.aggregator.done.is_set, timeout=60)
        rounds = fleet.aggregator.view.snapshot()["rounds"]
        assert len(rounds) == 2 and all(r["reported"] == 2 for r in rounds), rounds
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    log = tls_broker.log()
    assert "as aggregator (p5" in log and "as dev-a (p5" in log and "as dev-b (p5" in log


def test_tls_config_is_checked_and_name_checks_cannot_be_turned_off() -> None:
    from edge_agent.config import check_toml

    head = 'device_id = "dev-a"\nstate_dir = "/tmp/x"\n[broker]\nport = 8883\nkeepalive_s = 60\n[broker.tls]\n'
    cfg, problems, _ = check_toml(head + 'ca_file = "/c/ca.crt"\ncert_file = "/c/a.crt"\nkey_file = "/c/a.key"\n',
                                  AgentConfig, "a.toml")
    assert cfg is not None and not problems
    assert cfg.broker.keepalive_s == 60
    assert cfg.broker.tls.options() == TlsOptions("/c/ca.crt", "/c/a.crt", "/c/a.key", None, "1.2")
    _, problems, _ = check_toml(head + 'ca_file = "/c/ca.crt"\ncheck_hostname = false\nmin_version = "1.1"\n',
                                AgentConfig, "a.toml")
    assert any("check_hostname must be true" in p and "instead of turning the check off" in p for p in problems)
    assert any("min_version must be one of '1.2', '1.3'" in p for p in problems)
    _, problems, _ = check_toml(head + 'ca_file = "/c/ca.crt"\ncert_file = "/c/a.crt"\n', AgentConfig, "a.toml")
    assert problems and "cert_file and key_file go together" in problems[0]
    cfg, _, _ = check_toml('device_id = "dev-a"\nstate_dir = "/tmp/x"\n', AgentConfig, "a.toml")
    assert cfg is not None and cfg.broker.tls.options() is None  # no [broker.tls]: plain TCP (development)


def test_enrol_command_writes_a_private_key_and_a_csr_fleet_ca_signs(pki: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.cli import main

    assert main(["enrol", "dev-new", "--dir", str(tmp_path)]) == 0
    key, csr = tmp_path / "dev-new.key", tmp_path / "dev-new.csr"
    assert key.stat().st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in key.read_bytes()
    assert main(["enrol", "dev-new", "--dir", str(tmp_path)]) == 1  # never overwrites a key by accident
    assert "exists" in capsys.readouterr().err
    assert main(["enrol", "not/valid", "--dir", str(tmp_path)]) == 2
    fleet_ca(pki / "ca", "sign", str(csr))
    assert (pki / "ca" / "clients" / "dev-new.crt").exists()
    # A device cannot get itself a certificate for a reserved identity.
    from edge_agent.enrol import make_key_and_csr

    _, evil = make_key_and_csr("aggregator", tmp_path / "evil")
    done = subprocess.run([str(FLEET_CA), "--dir", str(pki / "ca"), "sign", str(evil)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "reserved identity 'aggregator'" in done.stderr
