"""What transport security and signatures cost: connect time, bytes per update on the wire, CPU per update, and
the real aggregator's ingest rate plain + unsigned against mutual TLS + signed.

Everything runs against private Mosquitto processes (`edge_agent.broker.LocalBroker`) with the real client code
(`edge_agent.transport.MqttLink`) and certificates from a throwaway fleet CA (`edge_agent.demo_pki`, as `edge-fl
demo` makes them). Three broker setups:

- plain: broker_config/mosquitto-dev.conf, password login over plain TCP (the development setup);
- TLS:   mosquitto-prod.conf with require_certificate / use_identity_as_username / use_username_as_clientid
         turned off: the client checks the broker's certificate and logs in with a password;
- mTLS:  mosquitto-prod.conf + acl.example as shipped: the client presents its own certificate.

1. Connect time: wall time of `MqttLink.connect()` (TCP, TLS handshake, MQTT CONNECT/CONNACK) and this process's
   CPU time for it (`time.process_time`, all threads), median over --connects fresh connections per setup.
2. Bytes per update on the wire: the publisher connects through a counting TCP relay in this process; it
   publishes --publishes real update envelopes (fedavg upload of the default head, int8; QoS 1, each waiting
   for its PUBACK) and the relay counts the bytes each way. Per update = MQTT PUBLISH (topic, properties,
   envelope, signature trailer) + PUBACK, plus TLS record framing and MAC under TLS; TCP/IP headers not counted.
3. CPU per update: the agent's signing and the aggregator's verification, from bench/signing_cost.py's `micro`.
4. Ingest: bench/aggregator_throughput.py's `run_size` (the real aggregator process, N simulated devices
   publishing real envelopes through the broker) in four setups, plain/unsigned, plain/signed, mTLS/unsigned
   and mTLS/signed, interleaved, --repeats times each. Reported: the median over repeats of each run's median
   updates/s, and of the aggregator's CPU per update (steadier on a shared machine than the rate). The issue's
   bar: mTLS + signed ingest within 20 % of plain + unsigned, ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import benchlib

NAME = "security_cost"
SETUPS = ("plain", "TLS", "mTLS")


# ---------------------------------------------------------------- brokers

class Brokers:
    """The three broker setups, each a LocalBroker, and how a client logs in to each."""

    def __init__(self, root: Path) -> None:
        from edge_agent.broker import DEV_CONFIG, LocalBroker
        from edge_agent.demo_pki import make_demo_pki

        self.pki = make_demo_pki(root / "pki", ["d0"])
        self.password = secrets.token_hex(12)
        tls_conf = root / "tls-password.conf"
        off = {"require_certificate", "use_identity_as_username", "use_username_as_clientid"}
        tls_conf.write_text("".join(f"{line.split()[0]} false\n" if line.split()[:1] and line.split()[0] in off
                                    else line + "\n" for line in self.pki.broker_config.read_text().splitlines()))
        self.brokers = {
            "plain": LocalBroker(root / "plain", users={"device": self.password}, config=DEV_CONFIG),
            "TLS": LocalBroker(root / "tls", users={"device": self.password}, config=tls_conf),
            "mTLS": LocalBroker(root / "mtls", users={}, config=self.pki.broker_config),
        }

    def __enter__(self) -> Brokers:
        for b in self.brokers.values():
            b.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for b in self.brokers.values():
            b.stop()

    def link(self, setup: str, client_id: str, port: int | None = None) -> Any:
        from edge_agent.messaging import TlsOptions
        from edge_agent.transport import MqttLink

        b = self.brokers[setup]
        login: dict[str, Any] = {
            "plain": {"username": "device", "password": self.password},
            "TLS": {"username": "device", "password": self.password, "tls": TlsOptions(str(self.pki.ca_file))},
            "mTLS": {"tls": self.pki.tls("d0")},
        }[setup]
        return MqttLink(client_id, b.host, port or b.port, clean_start=True, **login)


def connect_times(brokers: Brokers, reps: int) -> dict[str, Any]:
    out = {}
    for setup in SETUPS:
        wall, cpu = [], []
        for i in range(reps + 1):  # the first is a warm-up (imports, the broker's first TLS context use)
            link = brokers.link(setup, "d0" if setup == "mTLS" else f"conn-{i}")
            c0, t0 = time.process_time(), time.perf_counter()
            link.connect(timeout=10)
            t1, c1 = time.perf_counter(), time.process_time()
            link.close()
            if i:
                wall.append(1e3 * (t1 - t0))
                cpu.append(1e3 * (c1 - c0))
        out[setup] = {"wall_ms": benchlib.summarize(wall), "client_cpu_ms": benchlib.summarize(cpu)}
        print(f"  connect {setup:5s}: {out[setup]['wall_ms']['median']:.1f} ms wall, "
              f"{out[setup]['client_cpu_ms']['median']:.1f} ms CPU (median of {reps})", file=sys.stderr)
    return out


# ---------------------------------------------------------------- bytes on the wire

class CountingRelay:
    """A TCP relay on a loopback port that counts the bytes it forwards each way (one connection at a time)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.up = 0  # client -> broker
        self.down = 0  # broker -> client
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        self.server.close()


def update_envelopes(count: int, signed: bool) -> list[bytes]:
    """`count` real update envelopes of device d0 (fedavg upload, default head, int8), signed or not."""
    import numpy as np

    from edge_agent.codec.envelope import Envelope, Kind, encode_envelope
    from edge_agent.codec.signing import Purpose, context, signer
    from edge_agent.keys import new_private_key
    from edge_agent.learning.head import HeadConfig
    from edge_agent.learning.rng import server_init
    from edge_agent.learning.strategies import make_strategy
    from edge_agent.learning.training import TrainingConfig

    train = TrainingConfig(strategy="fedavg")
    strategy = make_strategy("fedavg", HeadConfig(64, 7, train.adapter_dim), train.strategy_config())
    server = strategy.init_server(server_init(0))
    rng = np.random.default_rng(0)
    sign = signer(new_private_key(), context(Purpose.UPDATE, "bench")) if signed else None
    return [encode_envelope(Envelope(
        kind=Kind.UPDATE, device_id="d0", round=1, model_version=0, strategy="fedavg", update_id=uuid.uuid4().hex,
        num_examples=100, tensors={k: rng.normal(0, 0.1, s).astype(np.float32)
                                   for k, s in strategy.upload_shapes(server).items()}, codec="int8"), sign=sign)
        for _ in range(count)]


def wire_bytes(brokers: Brokers, count: int) -> list[dict[str, Any]]:
    rows = []
    for setup, signed in (("plain", False), ("plain", True), ("TLS", True), ("mTLS", False), ("mTLS", True)):
        envelopes = update_envelopes(count, signed)
        b = brokers.brokers[setup]
        relay = CountingRelay((b.host, b.port))
        link = brokers.link(setup, "d0" if setup == "mTLS" else "bytes", port=relay.port)
        try:
            link.connect(timeout=10)
            up0, down0 = relay.counts()
            for env in envelopes:
                # The user's own update topic: the ACL lets nothing else through (mTLS: CN d0, else "device").
                link.publish(f"edgefl/bench/update/{'d0' if setup == 'mTLS' else 'device'}/1", env, qos=1,
                             timeout=10)
            up1, down1 = relay.counts()
        finally:
            link.close()
            relay.close()
        rows.append({"setup": setup, "signed": signed, "envelope_bytes": len(envelopes[0]),
                     "up_bytes_per_update": (up1 - up0) / count, "down_bytes_per_update": (down1 - down0) / count,
                     "updates": count})
        print(f"  wire {setup:5s} {'signed' if signed else 'unsigned':8s}: envelope {len(envelopes[0])} B, "
              f"up {(up1 - up0) / count:.1f} B, down {(down1 - down0) / count:.1f} B per update", file=sys.stderr)
    return rows


# ---------------------------------------------------------------- ingest through the real aggregator

INGEST_SETUPS = (("plain", False), ("plain", True), ("mTLS", False), ("mTLS", True))


def ingest(sizes: list[int], rounds: int, repeats: int, root: Path) -> list[dict[str, Any]]:
    import aggregator_throughput as tp

    out = []
    for n in sizes:
        runs: dict[str, list[dict[str, float]]] = {}
        for rep in range(repeats):
            for setup, signed in INGEST_SETUPS:
                key = f"{setup}{'+signed' if signed else ''}"
                flags = (["--tls"] if setup == "mTLS" else []) + (["--signed"] if signed else [])
                args = tp.parse_args(["--sizes", str(n), "--rounds", str(rounds), *flags])
                work = root / f"{key}-{n}-{rep}"
                work.mkdir()
                res = tp.run_size(n, args, work)
                measured = [x for x in res["rounds"] if not x["warmup"]]
                runs.setdefault(key, []).append({
                    "updates_per_s": res["updates_per_s"]["median"],
                    "aggregator_cpu_us_per_update": statistics.median(1e6 * x["aggregator_cpu_s"] / n
                                                                      for x in measured)})
                shutil.rmtree(work, ignore_errors=True)
        row: dict[str, Any] = {"devices": n, "runs": runs}
        for key, rs in runs.items():
            row[key] = {"updates_per_s": statistics.median(r["updates_per_s"] for r in rs),
                        "aggregator_cpu_us_per_update": statistics.median(r["aggregator_cpu_us_per_update"]
                                                                          for r in rs)}
        base, full = row["plain"], row["mTLS+signed"]
        row["ratio"] = full["updates_per_s"] / base["updates_per_s"]
        row["cpu_ratio"] = base["aggregator_cpu_us_per_update"] / full["aggregator_cpu_us_per_update"]
        out.append(row)
    return out


# ---------------------------------------------------------------- output

def render(conn: dict[str, Any], wire: list[dict[str, Any]], cpu: dict[str, Any], rows: list[dict[str, Any]],
           args: argparse.Namespace, env: dict[str, Any]) -> str:
    lines = [f"# Security cost: mutual TLS and Ed25519 signatures ({env.get('cpu_model', '')})", ""]
    for r in rows:
        verdict = "meets" if r["ratio"] >= 0.8 else "MISSES"
        lines.append(f"With {r['devices']} devices the aggregator ingests {r['mTLS+signed']['updates_per_s']:.0f} "
                     f"updates/s over mutual TLS with signatures against {r['plain']['updates_per_s']:.0f} plain and "
                     f"unsigned: ratio **{r['ratio']:.2f}** ({verdict} the issue's bar of 0.8); by aggregator CPU per "
                     f"update {r['cpu_ratio']:.2f}.")
    lines += ["", f"Connect (`MqttLink.connect()`: TCP + TLS handshake + MQTT CONNECT/CONNACK; median of "
              f"{args.connects}, loopback):", "",
              benchlib.md_table(["setup", "wall ms median (min-max)", "client CPU ms median"],
                                [[s, f"{c['wall_ms']['median']:.1f} ({c['wall_ms']['min']:.1f}-"
                                     f"{c['wall_ms']['max']:.1f})", f"{c['client_cpu_ms']['median']:.1f}"]
                                 for s, c in conn.items()]),
              "", f"Bytes per update on the wire (counted by a TCP relay, {args.publishes} QoS 1 publishes; PUBLISH + "
              f"PUBACK, TLS framing included, TCP/IP headers not):", "",
              benchlib.md_table(["setup", "signed", "envelope B", "client -> broker B/update",
                                 "broker -> client B/update"],
                                [[w["setup"], "yes" if w["signed"] else "no", w["envelope_bytes"],
                                  f"{w['up_bytes_per_update']:.1f}", f"{w['down_bytes_per_update']:.1f}"]
                                 for w in wire]),
              "", f"CPU per update (bench/signing_cost.py's in-process timing, {cpu['reps']} calls): agent signs in "
              f"{cpu['agent_sign_us']:.0f} us (encode signed - unsigned), the aggregator verifies in "
              f"{cpu['aggregator_verify_us']:.0f} us (decode_envelope for scale: {cpu['decode_envelope_us']:.0f} us); "
              f"the signature adds {cpu['bytes_added']} bytes.", "",
              f"Ingest through the real aggregator process (bench/aggregator_throughput.py run_size, fedavg, "
              f"{args.rounds} measured rounds after 1 warm-up per run; median over {args.repeats} interleaved runs "
              f"of each run's median):", ""]
    for r in rows:
        table = []
        for key in ("plain", "plain+signed", "mTLS", "mTLS+signed"):
            rs = r["runs"][key]
            table.append([key, f"**{r[key]['updates_per_s']:.0f}**",
                          ", ".join(f"{x['updates_per_s']:.0f}" for x in rs),
                          f"{r[key]['aggregator_cpu_us_per_update']:.0f}",
                          f"{r[key]['updates_per_s'] / r['plain']['updates_per_s']:.2f}"])
        lines += [f"{r['devices']} devices:", "",
                  benchlib.md_table(["setup", "updates/s median", "per run", "aggregator CPU us/update",
                                     "rate vs plain"], table), ""]
    lines.append(benchlib.env_summary_md(env))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--connects", type=int, default=30, help="connections timed per setup")
    p.add_argument("--publishes", type=int, default=300, help="updates published per setup to count wire bytes")
    p.add_argument("--reps", type=int, default=2000, help="calls per in-process sign/verify timing")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000], help="simulated fleet sizes for the ingest rate")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds per ingest run")
    p.add_argument("--repeats", type=int, default=3, help="ingest runs per setup (interleaved)")
    args = p.parse_args(argv)
    # paho's own log repeats what the links report; the plain links' warning is the point of the comparison.
    logging.getLogger("edge_agent.transport.paho").setLevel(logging.CRITICAL)
    logging.getLogger("edge_agent.transport").setLevel(logging.ERROR)
    import signing_cost

    env = benchlib.environment()
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="edgefl-security-"))
    try:
        with Brokers(root / "brokers") as brokers:
            conn = connect_times(brokers, args.connects)
            wire = wire_bytes(brokers, args.publishes)
        cpu = signing_cost.micro(args.reps)
        rows = ingest(args.sizes, args.rounds, args.repeats, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    markdown = render(conn, wire, cpu, rows, args, env)
    doc = {"benchmark": NAME, "description": __doc__, "environment": env, "config": vars(args),
           "connect": conn, "wire": wire, "cpu_per_update": cpu, "ingest": rows,
           "wall_s": time.perf_counter() - t0}
    paths = benchlib.write_results(NAME, doc, markdown)
    print(markdown)
    print(f"results: {paths[0]} and {paths[1]} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
