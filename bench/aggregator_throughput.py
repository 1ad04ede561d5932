"""Aggregator throughput at fleet scale: the real aggregator (1, 2 or 4 worker processes) against the broker alone.

For every fleet size N (default 100, 1,000, 10,000 and 100,000 simulated devices) and every aggregator setup
(default: 1 worker on SQLite, the single aggregator; 1, 2 and 4 workers on PostgreSQL) one run does, on a fresh
private Mosquitto (`edge_agent.broker.LocalBroker`, the shipped dev config with its queue limits raised, see
below) and, for PostgreSQL, a fresh private server (`edge_agent.pgserver.LocalPostgres`, durable):

1. Publishers: --publishers light processes (no training, no model), each with --connections MQTT connections,
   publish on behalf of all N device ids ("d0".."d<N-1>", spread round-robin over processes and connections).
   Every publish is QoS 1 and at most --window per connection wait for their PUBACK at a time. The envelopes
   are real update envelopes (kind UPDATE, int8 codec, the round task's strategy and shapes plus small noise,
   a fresh update id each, signed by the device's key with --signed), built by the publishers before timing.
2. Broker-alone ceiling: the same publishers publish one round's worth of N updates while a plain subscriber
   process (paho, MQTT v5, QoS 1 subscription to every update topic, Receive-Maximum 256 as the aggregator,
   acknowledging each message as it arrives) only counts them. broker_ceiling_per_s = N / (first publish ->
   the subscriber's N-th message); median over --rounds rounds after one warm-up round. The subscriber then
   leaves (its session expires at once) before any aggregator starts.
3. Presence: a retained `online` per device, so every aggregator worker sees all N devices and selects them all
   (fraction 1.0, expected_clients = min_clients = N).
4. Aggregator: the real command, `python -m edge_agent.cli aggregator --config X`, once per worker; with
   PostgreSQL every worker has the same config except its `worker` name, and `state` is the database's URL (one
   coordinator closes rounds and publishes the status, docs/scale-out.md). The benchmark waits until every
   worker has subscribed (a share group is served round-robin over its members). One warm-up round, then --rounds
   measured rounds (--big-rounds for fleets of --big-devices and more, so a 100,000-device run ends in
   reasonable time). Per round, after the round task arrives the publishers build that round's envelopes, then
   all publish at once. The workers are configured for one round more than that, which opens and waits: so they
   are alive when the last measured round's CPU and memory are read; then they get SIGTERM (a clean stop).

A setup that fails (a worker exits, a wait times out, or every worker is silent in its log for --stall-s, i.e.
stuck) is recorded under `failed` with the reason, the workers' warnings and errors, and what it measured: the
broker-alone rate and, for the round that did not finish, how many updates the store counted and how fast, until
its last commit. The run goes on with the next setup; results are written after every setup (--merge keeps the
file's entries for setups a run does not measure, to re-run a few).

Per measured round:
- ingest_per_s = N / (first publish -> arrival of the round's retained status message, `edgefl/<fleet>/status`,
  at the benchmark's monitor connection). This covers the broker's routing and the aggregator's whole ingest
  (signature check, decode, judge, streaming aggregate, group commit, PUBACK, receipt, log line) and the close.
- round_close_s = arrival of the status message (benchmark's wall clock) - the round's last `received_at` in the
  aggregator's store (`accepted` table: the aggregator's wall clock, same host, stamped just before the group
  commit that stored the last update). So it is the aggregator's close: the last commit, the final
  aggregation, closing the round in the store (reliability of every selected device included), publishing the
  model and the status, and the status's trip through the broker. aggregator_close_s is the same end at the
  store's `closed_at` (no publishing). The status's own `duration_s` (round open -> close, so it includes the
  publishers' build time) is kept too.
- CPU seconds of every worker, the broker and the publishers during the round (/proc/<pid>/stat).
Peak memory: VmHWM of every process (every aggregator worker, the broker, each publisher, the subscriber, the
PostgreSQL server's processes), polled every 50 ms and read once more at the end of the last round;
aggregator_peak_rss_mb is the largest over the workers (the per-worker list is beside it).

Disk: "quiet" runs with nothing else writing. "busy" runs a background writer process during the whole run
(broker ceiling included) on the filesystem of the state (SQLite file or PostgreSQL cluster): it writes
--busy-block-mb MiB and fsyncs, again and again, cycling through a --busy-file-mb MiB file; its rate is
recorded. By default the 1-worker SQLite setup is also run on a busy disk at --busy-devices fleet sizes;
--busy-disk runs every setup on a busy disk instead.

Receive-Maximum probe (once, before the setups): a subscriber with manual acknowledgements asks the broker for at
most 256 unacknowledged QoS 1 messages (as the aggregator does) and acknowledges more slowly than 4 publishers
send; the most it ever held unacknowledged is recorded. It tells whether the aggregator's memory bound (the
backlog waits in the broker, not in the aggregator) holds with this broker.

Broker limits: the aggregator asks for at most 256 updates awaiting its acknowledgement (Receive-Maximum); the rest
wait in its session queue at the broker (or, where the probe above says the broker does not keep to that, in the
aggregator), so a fast fleet needs a queue of up to N messages there. The bench's
broker config is the shipped one (dev, or prod with --tls) with max_queued_messages = N + 10,000 and
max_queued_bytes raised to match (8 KiB a message), for every N alike; nothing else changes.

The targets this answers (bench/results/aggregator_throughput.md says whether they are met): ingest at or above
50 % of the broker-alone rate with one worker on a quiet disk and no collapse on a busy one; aggregator memory
flat from 1,000 to 100,000 devices; throughput that grows with workers until the broker is the ceiling.

A full run (the defaults) takes about 30 minutes on 2 cores: 4 minutes up to 10,000 devices, then 5 to 13 minutes
for each 100,000-device setup; --quick (100 and 1,000 devices, 1 and 2 workers, 2 measured rounds) about 1 minute.

bench/security_cost.py and bench/signing_cost.py reuse `run_size` (1 worker, SQLite, quiet disk) with --tls
(mutual TLS with the production config and ACL: publishers `bench-pub-<i>-<j>` and the subscriber `bench-sub`
are the only additions to the shipped ACL) and --signed (every simulated device has its own Ed25519 key,
derived from --seed and its id, enrolled in the aggregator's registry; the aggregator requires signatures).

Not a test: nothing is asserted except that every round closed with N accepted updates and none rejected.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import queue
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import benchlib

NAME = "aggregator_throughput"
STRATEGY = "fedavg"
DEVICES = (100, 1000, 10000, 100000)
WORKERS = (1, 2, 4)
STORES = ("sqlite", "postgresql")
BUSY_DEVICES = (1000, 10000)
CLK_TCK = os.sysconf("SC_CLK_TCK")
SUBSCRIBER_RECEIVE_MAXIMUM = 256  # the aggregator's receive_maximum (edge_agent/aggregator/service.py)
QUEUE_HEADROOM = 10000  # broker queue beyond N: presence, receipts, tasks
BYTES_PER_QUEUED = 8192  # the byte bound per queued message (an update is ~3.4 KB)


# ---------------------------------------------------------------- /proc readings of another process

def proc_status_mb(pid: int, field: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process in seconds (fields 14 and 15 of /proc/<pid>/stat); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def cpu_used(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float]:
    """CPU seconds each process used between two readings (processes read both times only)."""
    return {name: b - a for name, b in after.items() if b is not None and (a := before.get(name)) is not None}


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (the PostgreSQL server's backends and helpers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


class PeakWatcher:
    """Polls VmHWM (peak RSS) of named processes, and of the children of some (trees, rescanned every second).
    VmHWM only grows, so the largest reading is the peak so far; a process that exits keeps its last one."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.pids: dict[str, int] = {}
        self.trees: dict[str, int] = {}
        self.peak: dict[str, float] = {}
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ticks = 0

    def add(self, name: str, pid: int | None) -> None:
        if pid is not None:
            self.pids[name] = pid
            self.read()

    def add_tree(self, name: str, pid: int | None) -> None:
        """`pid` and its children, named `name` and `name`-<child pid>."""
        if pid is not None:
            self.trees[name] = pid
            self.add(name, pid)

    def read(self) -> None:
        if self._ticks % 20 == 0:
            for name, root in list(self.trees.items()):
                for child in child_pids(root):
                    self.pids.setdefault(f"{name}-{child}", child)
        self._ticks += 1
        for name, pid in list(self.pids.items()):
            hwm = proc_status_mb(pid, "VmHWM")
            if hwm is not None:
                self.peak[name] = max(self.peak.get(name, 0.0), hwm)

    def group(self, prefix: str) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.peak.items() if k == prefix or k.startswith(prefix + "-")}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.read()

    def __enter__(self) -> PeakWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


# ---------------------------------------------------------------- environment extras

def first_line_of(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    except Exception as exc:
        return f"unknown ({exc})"


def mosquitto_version() -> str:
    from edge_agent.broker import find_mosquitto

    return first_line_of([find_mosquitto(), "-h"])


def postgres_version() -> str:
    try:
        from edge_agent.pgserver import find_postgres_bindir

        return first_line_of([str(find_postgres_bindir() / "postgres"), "--version"])
    except Exception as exc:
        return f"unavailable ({exc})"


def filesystem_of(path: Path) -> dict[str, str]:
    """Mount point, device and type of the filesystem holding `path` (fsync cost depends on it: tmpfs is free)."""
    best = ("", "", "")
    target = str(path.resolve())
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                dev, mnt, fstype = line.split()[:3]
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                    best = (dev, mnt, fstype)
    except OSError:
        pass
    return {"path": target, "device": best[0], "mount": best[1], "type": best[2]}


# ---------------------------------------------------------------- broker configuration

def raise_queue_limits(conf: str, devices: int) -> str:
    """A broker config's text with queues for N devices' updates (see the module docstring); all else kept."""
    limits = {"max_queued_messages": devices + QUEUE_HEADROOM,
              "max_queued_bytes": (devices + QUEUE_HEADROOM) * BYTES_PER_QUEUED}
    lines = []
    for line in conf.splitlines():
        key = line.split(maxsplit=1)[:1]
        if key and key[0] in limits:
            line = f"{key[0]} {limits.pop(key[0])}"
        lines.append(line)
    lines += [f"{k} {v}" for k, v in limits.items()]  # any the config did not set
    return "\n".join(lines) + "\n"


def bench_broker_config(workdir: Path, devices: int, base: Path) -> Path:
    path = workdir / "mosquitto-bench.conf"
    path.write_text(raise_queue_limits(base.read_text(), devices))
    return path


# ---------------------------------------------------------------- simulated devices and their updates

def device_ids(n: int, start: int = 0, step: int = 1) -> list[str]:
    """Short ids ("d0".."d99999"): what the round's selection and the store hold per device stays small."""
    return [f"d{i}" for i in range(start, n, step)]


def device_key(seed: int, device: str) -> Any:
    """The simulated device's Ed25519 key, derived from (seed, id): the publishers need no key files."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"aggtp-{seed}-{device}".encode()).digest())


def enrol_devices(workdir: Path, devices: list[str], seed: int) -> str:
    """A fleet key, every device's public key in the registry; returns the aggregator's [signing] TOML."""
    from edge_agent.keys import new_private_key, public_pem, write_private_key

    keys_dir, registry = workdir / "keys", workdir / "keys" / "devices"
    registry.mkdir(parents=True)
    write_private_key(new_private_key(), keys_dir / "fleet.key")
    for dev in devices:  # what `edge-fl keys register` writes
        (registry / f"{dev}.pub").write_bytes(public_pem(device_key(seed, dev).public_key()))
    return f'\n[signing]\nkey = "{keys_dir / "fleet.key"}"\nregistry = "{registry}"\nrequired = true\n'


def build_round(task_payload: bytes, devices: list[str], seed: int, fleet: str | None) -> list[bytes]:
    """One update envelope per device for the round `task_payload` announces (or a global model: any round),
    trained from its model version: the task's tensors plus noise. Signed when `fleet` is given."""
    import numpy as np

    from edge_agent.codec.envelope import Envelope, Kind, decode_envelope, encode_envelope
    from edge_agent.codec.signing import Purpose, context, signer
    from edge_agent.fleet import decode_global
    from edge_agent.learning.strategies import ServerState

    task = decode_envelope(task_payload)
    strategy = decode_global(task).strategy()
    shapes = strategy.upload_shapes(ServerState(task.model_version, dict(task.tensors)))
    base = {k: np.asarray(task.tensors[k], np.float32) for k in shapes}
    rng = np.random.default_rng([seed, task.round, int(devices[0][1:]) if devices else 0])
    ctx = context(Purpose.UPDATE, fleet) if fleet is not None else None
    out = []
    for dev in devices:
        tensors = {k: (v + rng.normal(0.0, 0.01, v.shape)).astype(np.float32) for k, v in base.items()}
        env = Envelope(kind=Kind.UPDATE, device_id=dev, round=task.round, model_version=task.model_version,
                       strategy=strategy.name, update_id=uuid.uuid4().hex, num_examples=int(rng.integers(50, 500)),
                       tensors=tensors, codec="int8")
        out.append(encode_envelope(env, sign=None if ctx is None else signer(device_key(seed, dev), ctx)))
    return out


def template_task(cfg: Any) -> bytes:
    """A global model of the aggregator's configuration (version 0, round 0): what the broker-alone rounds build
    their updates from, before any aggregator runs. Same shapes and sizes as the real rounds' updates."""
    from edge_agent.fleet import GlobalModel, encode_global
    from edge_agent.learning import rng
    from edge_agent.learning.head import HeadConfig
    from edge_agent.learning.strategies import make_strategy

    head = HeadConfig(cfg.embedding_dim, cfg.num_classes, cfg.train.adapter_dim)
    strategy = make_strategy(cfg.train.strategy, head, cfg.train.strategy_config())
    server = strategy.init_server(rng.server_init(cfg.train.seed))
    return encode_global(GlobalModel(0, cfg.train, head, server.params))


# ---------------------------------------------------------------- child processes (multiprocessing, spawn)

@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """How a child process reaches the broker."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: dict[str, Any] | None  # TlsOptions as a dict


@dataclasses.dataclass(frozen=True)
class PublisherSpec:
    links: tuple[tuple[str, LinkSpec], ...]  # (client id, how) per connection: under TLS each its own certificate
    fleet: str
    devices: int  # N: this publisher speaks for d<index>, d<index + count>, ...
    index: int
    count: int
    seed: int
    signed: bool
    window: int
    timeout_s: float


def child_main(conn: Connection, body: Callable[[Connection], None]) -> None:
    """Run a child's loop; any failure goes back to the parent as {"error": traceback}."""
    logging.getLogger("edge_agent.transport").setLevel(logging.ERROR)
    try:
        body(conn)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send({"error": traceback.format_exc()})


def paho_client(client_id: str, link: LinkSpec) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    if link.username is not None:
        client.username_pw_set(link.username, link.password)
    if link.tls is not None:
        from edge_agent.messaging import TlsOptions
        from edge_agent.transport import tls_context

        client.tls_set_context(tls_context(TlsOptions(**link.tls)))
    return client


def connect_properties(receive_maximum: int | None = None) -> Any:
    """CONNECT properties of a bench client: its session ends with the connection."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


def paho_connect(client: Any, link: LinkSpec, timeout: float, receive_maximum: int | None = None) -> None:
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    client.on_connect = on_connect
    client.connect(link.host, link.port, keepalive=60, clean_start=True,
                   properties=connect_properties(receive_maximum))
    client.loop_start()
    if not connected.wait(timeout) or refused:
        raise ConnectionError(f"no CONNACK from {link.host}:{link.port} ({refused or 'timeout'})")


class PublishConnection:
    """One MQTT connection of a publisher process: QoS 1 publishes, at most `window` awaiting their PUBACK."""

    def __init__(self, client_id: str, link: LinkSpec, spec: PublisherSpec) -> None:
        self.client = paho_client(client_id, link)
        self.client.max_inflight_messages_set(spec.window)
        self.client.on_publish = self._on_publish
        self.window = threading.Semaphore(spec.window)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.remaining = 0
        self.last_ack = 0.0
        self.errors: list[str] = []
        self.timeout_s = spec.timeout_s
        paho_connect(self.client, link, spec.timeout_s)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.errors.append(str(reason_code))
        self.window.release()
        with self.lock:
            self.remaining -= 1
            if self.remaining == 0:
                self.last_ack = benchlib.monotonic()
                self.done.set()

    def publish_all(self, items: Sequence[tuple[str, bytes]], retain: bool) -> tuple[float, float]:
        """(first publish, last PUBACK), monotonic."""
        self.done.clear()
        with self.lock:
            self.remaining = len(items)
        first = benchlib.monotonic()
        if not items:
            return first, first
        for topic, payload in items:
            if not self.window.acquire(timeout=self.timeout_s):
                raise TimeoutError("no PUBACK within the timeout: the broker stopped acknowledging")
            info = self.client.publish(topic, payload, qos=1, retain=retain)
            if info.rc != 0:
                raise RuntimeError(f"publish failed: rc {info.rc}")
        if not self.done.wait(self.timeout_s):
            raise TimeoutError(f"{self.remaining} PUBACK(s) missing after {self.timeout_s:g} s")
        if self.errors:
            raise RuntimeError(f"the broker refused publishes: {self.errors[:3]}")
        return first, self.last_ack

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_spread(connections: list[PublishConnection], items: list[tuple[str, bytes]],
                   retain: bool) -> dict[str, Any]:
    """Publish `items` round-robin over `connections`, one thread each; first publish and last PUBACK."""
    results: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results.append(connections[i].publish_all(items[i::len(connections)], retain))
        except BaseException as exc:
            errors.append(exc)

    cpu0 = time.process_time()
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(connections))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"first": min(r[0] for r in results), "last": max(r[1] for r in results), "count": len(items),
            "cpu_s": time.process_time() - cpu0}


def publisher_main(conn: Connection, spec: PublisherSpec) -> None:
    child_main(conn, lambda c: publisher_loop(c, spec))


def publisher_loop(conn: Connection, spec: PublisherSpec) -> None:
    """Commands: presence, build {task}, go, exit. Each answered with one dict."""
    from edge_agent.protocol import Topics

    topics = Topics(spec.fleet)
    devices = device_ids(spec.devices, spec.index, spec.count)
    connections = [PublishConnection(ident, link, spec) for ident, link in spec.links]
    conn.send({"ready": True, "devices": len(devices)})
    items: list[tuple[str, bytes]] = []
    while True:
        cmd = conn.recv()
        if cmd["cmd"] == "presence":
            conn.send(publish_spread(connections, [(topics.presence(d), b"online") for d in devices], retain=True))
        elif cmd["cmd"] == "build":
            t0 = time.perf_counter()
            items = []  # the previous round's envelopes go first: peak memory is one round
            envelopes = build_round(cmd["task"], devices, spec.seed, spec.fleet if spec.signed else None)
            rnd = cmd["round"]
            items = [(topics.update(d, rnd), e) for d, e in zip(devices, envelopes, strict=True)]
            sizes = sorted(len(e) for e in envelopes)
            conn.send({"build_s": time.perf_counter() - t0, "count": len(items),
                       "bytes_median": sizes[len(sizes) // 2] if sizes else 0})
        elif cmd["cmd"] == "go":
            conn.send(publish_spread(connections, items, retain=False))
        elif cmd["cmd"] == "exit":
            for c in connections:
                c.close()
            conn.send({"bye": True})
            return


def subscriber_main(conn: Connection, link: LinkSpec, topic_filter: str, timeout_s: float) -> None:
    child_main(conn, lambda c: subscriber_loop(c, link, topic_filter, timeout_s))


def subscriber_loop(conn: Connection, link: LinkSpec, topic_filter: str, timeout_s: float) -> None:
    """Counts what arrives on `topic_filter` (QoS 1, acknowledged at once). Commands: expect {n}, wait, exit."""
    state = {"expected": 0, "count": 0, "first": 0.0, "last": 0.0}
    reached = threading.Event()
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        state["count"] += 1
        if state["count"] == 1:
            state["first"] = benchlib.monotonic()
        if state["count"] == state["expected"]:
            state["last"] = benchlib.monotonic()
            reached.set()

    client = paho_client("bench-sub", link)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    paho_connect(client, link, timeout_s, receive_maximum=SUBSCRIBER_RECEIVE_MAXIMUM)
    client.subscribe(topic_filter, qos=1)
    if not subscribed.wait(timeout_s):
        raise TimeoutError(f"no SUBACK for {topic_filter}")
    conn.send({"ready": True})
    while True:
        cmd = conn.recv()
        if cmd["cmd"] == "expect":
            reached.clear()
            state.update(expected=int(cmd["n"]), count=0, first=0.0, last=0.0)
            conn.send({"armed": True})
        elif cmd["cmd"] == "wait":
            ok = reached.wait(float(cmd["timeout"]))
            conn.send({"ok": ok, "count": state["count"], "first": state["first"], "last": state["last"]})
        elif cmd["cmd"] == "exit":
            client.disconnect()
            client.loop_stop()
            conn.send({"bye": True})
            return


def disk_writer_main(conn: Connection, path: str, block_mb: int, file_mb: int) -> None:
    child_main(conn, lambda c: disk_writer_loop(c, Path(path), block_mb, file_mb))


def disk_writer_loop(conn: Connection, path: Path, block_mb: int, file_mb: int) -> None:
    """Write a block and fsync it, again and again (cycling through one file), until told to stop."""
    block = os.urandom(block_mb << 20)
    size = max(file_mb, block_mb) << 20
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    written, fsyncs, offset, t0 = 0, 0, 0, time.perf_counter()
    conn.send({"ready": True})
    try:
        while not conn.poll(0):
            os.pwrite(fd, block, offset)
            os.fsync(fd)
            written += len(block)
            fsyncs += 1
            offset = (offset + len(block)) % size
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    conn.recv()
    elapsed = time.perf_counter() - t0
    conn.send({"written_mb": written / 2**20, "fsyncs": fsyncs, "seconds": elapsed,
               "mb_per_s": written / 2**20 / elapsed, "fsyncs_per_s": fsyncs / elapsed,
               "block_mb": block_mb, "file_mb": file_mb})


class Child:
    """A spawned child process and its end of the command pipe."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs paho threads
        self.name = name
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(theirs, *args), name=name, daemon=True)
        self.proc.start()
        theirs.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def send(self, cmd: str, **kw: Any) -> None:
        self.conn.send({"cmd": cmd, **kw})

    def recv(self, timeout: float, what: str) -> dict[str, Any]:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer to {what} within {timeout:g} s")
        try:
            reply: dict[str, Any] = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name} died (exit code {self.proc.exitcode}) during {what}") from None
        if "error" in reply:
            raise RuntimeError(f"{self.name} failed during {what}:\n{reply['error']}")
        return reply

    def stop(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """Ask it to exit; its last answer (or None), then make sure it is gone."""
        reply = None
        if self.proc.is_alive():
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                self.send("exit")
                reply = self.recv(timeout, "exit")
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        return reply


def ask_all(children: Sequence[Child], cmd: str, timeout: float, **kw: Any) -> list[dict[str, Any]]:
    """Send `cmd` to every child first (they work in parallel), then collect the answers."""
    for c in children:
        c.send(cmd, **kw)
    return [c.recv(timeout, cmd) for c in children]


# ---------------------------------------------------------------- one run: N devices, one aggregator setup

@dataclasses.dataclass(frozen=True)
class Setup:
    devices: int
    workers: int
    store: str  # "sqlite" | "postgresql"
    disk: str  # "quiet" | "busy"

    @property
    def label(self) -> str:
        return f"N={self.devices} workers={self.workers} {self.store} {self.disk}"

    @property
    def slug(self) -> str:
        return f"n{self.devices}-w{self.workers}-{self.store}-{self.disk}"


def wait_for(link: Any, topic: str, pred: Callable[[bytes], bool], timeout: float, what: str,
             check: Callable[[], None] | None = None) -> tuple[Any, float, float]:
    """The first message on `topic` whose payload satisfies pred; returns it and its monotonic and wall times."""
    from edge_agent.transport import Message

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check is not None:
            check()
        try:
            msg = link.inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        now, wall = benchlib.monotonic(), time.time()
        if isinstance(msg, Message) and msg.topic == topic and msg.payload and pred(msg.payload):
            return msg, now, wall
    raise TimeoutError(f"{what}: nothing within {timeout:g} s")


def task_of_round(r: int) -> Callable[[bytes], bool]:
    from edge_agent.codec.envelope import decode_envelope

    return lambda payload: decode_envelope(payload).round == r


def status_of_round(r: int) -> Callable[[bytes], bool]:
    return lambda payload: bool(json.loads(payload)["round"] == r)


def rounds_for(args: argparse.Namespace, n: int) -> int:
    """Measured rounds for a fleet of n: fewer for the biggest fleets."""
    return int(args.big_rounds if n >= args.big_devices else args.rounds)


def round_timeout(args: argparse.Namespace, n: int) -> float:
    """A bound on anything that scales with N: the base timeout plus N at 100 per second."""
    return float(args.timeout_s + n / 100.0)


def store_times(store: str, location: str) -> dict[int, dict[str, Any]]:
    """Per round, from the aggregator's store: the last update's received_at, closed_at, updates per worker."""
    rounds: dict[int, dict[str, Any]] = {}
    q_last = "SELECT round, MAX(received_at), COUNT(*) FROM accepted GROUP BY round"
    q_closed = "SELECT round, closed_at FROM rounds"
    q_workers = "SELECT round, worker, COUNT(*) FROM accepted GROUP BY round, worker"
    if store == "sqlite":
        db = sqlite3.connect(f"file:{location}?mode=ro", uri=True)
        try:
            last, closed = db.execute(q_last).fetchall(), db.execute(q_closed).fetchall()
            per_worker: list[Any] = []
        finally:
            db.close()
    else:
        import psycopg

        with psycopg.connect(location) as pg:
            last, closed = pg.execute(q_last).fetchall(), pg.execute(q_closed).fetchall()
            per_worker = pg.execute(q_workers).fetchall()
    for r, received, count in last:
        rounds.setdefault(int(r), {}).update(last_received_at=float(received), accepted=int(count))
    for r, closed_at in closed:
        rounds.setdefault(int(r), {})["closed_at"] = None if closed_at is None else float(closed_at)
    for r, worker, count in per_worker:
        rounds.setdefault(int(r), {}).setdefault("accepted_by_worker", {})[str(worker)] = int(count)
    return rounds


def worker_configs(base: Path, workers: int, dsn: str | None) -> list[Path]:
    """One config per worker: the base config with `worker` set and, for PostgreSQL, `state` the database URL.
    Top-level keys must come before the first table: they are put first."""
    text = base.read_text()
    paths = []
    for k in range(1, workers + 1):
        body = text
        top = []
        if dsn is not None:
            body = "\n".join(line for line in body.splitlines() if not line.startswith("state = ")) + "\n"
            top = [f"state = {json.dumps(dsn)}", f'worker = "w{k}"']
        path = base.with_name(f"aggregator-w{k}.toml")
        path.write_text("\n".join(top) + ("\n" if top else "") + body)
        paths.append(path)
    return paths


def wait_workers_up(workdir: Path, names: list[str], timeout: float, check: Callable[[], None]) -> None:
    """Until every worker's log says it subscribed ("aggregator up", logged once its subscriptions are made)."""
    end = time.monotonic() + timeout
    waiting = set(names)
    while waiting:
        check()
        for name in list(waiting):
            with contextlib.suppress(OSError), open(workdir / f"{name}.log", "rb") as fh:
                if b"aggregator up" in fh.read(1 << 16):
                    waiting.discard(name)
        if waiting and time.monotonic() > end:
            raise TimeoutError(f"aggregator worker(s) {sorted(waiting)} not up within {timeout:g} s")
        time.sleep(0.05)


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


# Warnings every bench worker logs at start (the bench's broker is plain TCP on loopback, and unsigned by default).
ROUTINE_WARNINGS = ("signatures are OFF", "is NOT encrypted")


def notable_log_lines(path: Path, limit: int = 20) -> list[str]:
    """The first `limit` WARNING/ERROR lines of a worker's log, routine start-up warnings left out."""
    out: list[str] = []
    with contextlib.suppress(OSError), open(path, errors="replace") as fh:
        for line in fh:
            if (" WARNING " in line or " ERROR " in line) and not any(w in line for w in ROUTINE_WARNINGS):
                out.append(line.rstrip()[:400])
                if len(out) >= limit:
                    break
    return out


def worker_memory(procs: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """VmRSS and VmHWM of every worker now: whether memory grows with the fleet, or from round to round."""
    return {name: {"rss": proc_status_mb(p.pid, "VmRSS"), "hwm": proc_status_mb(p.pid, "VmHWM")}
            for name, p in procs.items()}


def stop_workers(procs: dict[str, Any]) -> dict[str, int | None]:
    """SIGTERM every worker (the service's clean stop) and their exit codes."""
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    codes: dict[str, int | None] = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            codes[name] = p.wait()
    return codes


def measure_ceiling(setup: Setup, args: argparse.Namespace, publishers: list[Child], link: LinkSpec,
                    topics: Any, template: bytes, watcher: PeakWatcher, broker_pid: int) -> list[dict[str, Any]]:
    """Broker-alone rounds: the same publishers, a subscriber that only counts (module docstring, step 2)."""
    n = setup.devices
    sub = Child("subscriber", subscriber_main, link, topics.update_filter, args.timeout_s)
    watcher.add("subscriber", sub.pid)
    rows = []
    try:
        sub.recv(args.timeout_s, "connect")
        built = ask_all(publishers, "build", round_timeout(args, n), task=template, round=0)
        print(f"  {setup.label}: broker-alone rounds, updates built in {max(b['build_s'] for b in built):.1f} s",
              file=sys.stderr)
        measured = args.ceiling_rounds if args.ceiling_rounds is not None else rounds_for(args, n)
        for k in range(args.warmup + measured):
            sub.send("expect", n=n)
            sub.recv(args.timeout_s, "expect")
            broker_cpu0 = proc_cpu_s(broker_pid) or 0.0
            sent = ask_all(publishers, "go", round_timeout(args, n))
            sub.send("wait", timeout=round_timeout(args, n))
            got = sub.recv(round_timeout(args, n) + 10, "wait")
            if not got["ok"]:
                raise RuntimeError(f"broker alone: the subscriber got {got['count']} of {n} updates (dropped by "
                                   f"the broker's queue limits?)")
            first = min(s["first"] for s in sent)
            elapsed = got["last"] - first
            row = {"round": k + 1, "warmup": k < args.warmup, "seconds": elapsed, "per_s": n / elapsed,
                   "publish_s": max(s["last"] for s in sent) - first,
                   "publisher_cpu_s": sum(s["cpu_s"] for s in sent),
                   "broker_cpu_s": (proc_cpu_s(broker_pid) or 0.0) - broker_cpu0}
            rows.append(row)
            print(f"  {setup.label}: broker alone {'warm-up' if row['warmup'] else 'round'} {k + 1}: "
                  f"{row['per_s']:8.0f} updates/s ({elapsed:.2f} s; publishers' last PUBACK at "
                  f"{row['publish_s']:.2f} s)", file=sys.stderr)
    finally:
        watcher.read()
        sub.stop()
    return rows


@dataclasses.dataclass(frozen=True)
class BrokerPlan:
    """The bench broker's config and every client's way in: passwords, or with --tls a certificate each."""

    config: Path
    note: str
    users: dict[str, str]
    pki: Any  # edge_agent.demo_pki.DemoPki | None
    identities: list[list[str]]  # per publisher process, one identity per connection

    def link(self, name: str, port: int) -> LinkSpec:
        if self.pki is not None:
            return LinkSpec("127.0.0.1", port, None, None, dataclasses.asdict(self.pki.tls(name)))
        return LinkSpec("127.0.0.1", port, "device", self.users["device"], None)


def plan_broker(n: int, args: argparse.Namespace, workdir: Path) -> BrokerPlan:
    from edge_agent.broker import DEV_CONFIG

    n_pub = max(1, min(args.publishers, n))
    identities = [[f"bench-pub-{p}-{c}" for c in range(args.connections)] for p in range(n_pub)]
    limits = f"max_queued_messages {n + QUEUE_HEADROOM}, max_queued_bytes {(n + QUEUE_HEADROOM) * BYTES_PER_QUEUED}"
    if not args.tls:
        users = {"aggregator": secrets.token_hex(12), "device": secrets.token_hex(12)}
        return BrokerPlan(bench_broker_config(workdir, n, DEV_CONFIG), f"mosquitto-dev.conf with {limits}", users,
                          None, identities)
    from edge_agent.demo_pki import make_demo_pki

    every = [ident for group in identities for ident in group]
    grants = "".join(f"\nuser {ident}\ntopic write edgefl/+/update/#\ntopic write edgefl/+/presence/#\n"
                     for ident in every)
    grants += "\nuser bench-sub\ntopic read edgefl/+/update/#\n"
    pki = make_demo_pki(workdir / "pki", [], extra_clients=(*every, "bench-sub"),
                        extra_acl="\n# --- aggregator_throughput.py's publishers and subscriber ---" + grants)
    return BrokerPlan(bench_broker_config(workdir, n, pki.broker_config),
                      f"mosquitto-prod.conf + acl.example (mutual TLS) with {limits}", {}, pki, identities)


class SetupFailed(RuntimeError):
    """A setup that did not finish, with what it measured before (`partial`)."""

    def __init__(self, message: str, partial: dict[str, Any]) -> None:
        super().__init__(message)
        self.partial = partial


class FleetRun:
    """One run of the module docstring's steps 1-4 for one Setup; `run()` returns its JSON entry."""

    def __init__(self, setup: Setup, args: argparse.Namespace, root: Path) -> None:
        from edge_agent.demo import Fleet
        from edge_agent.protocol import Topics

        self.setup, self.args, self.n = setup, args, setup.devices
        self.workdir = root / setup.slug
        self.workdir.mkdir()
        self.topics = Topics(f"tp{self.n}")
        self.timeout = round_timeout(args, self.n)
        self.stack = contextlib.ExitStack()
        self.watcher = PeakWatcher()
        self.fleet = Fleet(self.workdir)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.publishers: list[Child] = []
        self.plan = plan_broker(self.n, args, self.workdir)
        self.port = 0
        self.log_sizes: dict[str, int] = {}
        self.rows: list[dict[str, Any]] = []
        self.ceiling: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}  # the round being measured: its number, the wall time of "go"
        self.last_growth = time.monotonic()  # when a worker's log last grew (stall detection)

    def say(self, text: str) -> None:
        print(f"  {self.setup.label}: {text}", file=sys.stderr)

    # --- the processes -----------------------------------------------------------------------
    def start_broker(self) -> int:
        from edge_agent.broker import LocalBroker

        broker = LocalBroker(self.workdir / "broker", users=self.plan.users, config=self.plan.config)
        broker.start()
        self.stack.callback(broker.stop)
        assert broker.pid is not None
        self.port = broker.port
        self.watcher.add("broker", broker.pid)
        return broker.pid

    def start_disk_writer(self) -> Child | None:
        if self.setup.disk != "busy":
            return None
        writer = Child("disk-writer", disk_writer_main, str(self.workdir / "busy-disk.bin"), self.args.busy_block_mb,
                       self.args.busy_file_mb)
        self.stack.callback(writer.stop)
        writer.recv(self.args.timeout_s, "start")
        return writer

    def start_publishers(self) -> None:
        count = len(self.plan.identities)
        for p, group in enumerate(self.plan.identities):
            spec = PublisherSpec(tuple((ident, self.plan.link(ident, self.port)) for ident in group),
                                 self.topics.fleet, self.n, p, count, self.args.seed, self.args.signed,
                                 self.args.window, self.timeout)
            child = Child(f"publisher-{p}", publisher_main, spec)
            self.stack.callback(child.stop)
            self.publishers.append(child)
            self.watcher.add(f"publisher-{p}", child.pid)
        for child in self.publishers:
            child.recv(self.args.timeout_s + 30, "connect")

    def aggregator_config(self, total_rounds: int) -> tuple[Path, Any]:
        from edge_agent.config import AggregatorConfig, load_toml
        from edge_agent.demo import write_aggregator_config
        from edge_agent.learning.training import TrainingConfig

        pki, n = self.plan.pki, self.n
        path = write_aggregator_config(
            self.workdir, "127.0.0.1", self.port, None if pki else "aggregator", self.plan.users.get("aggregator"),
            fleet=self.topics.fleet, clients=n,
            train=TrainingConfig(strategy=STRATEGY, rounds=total_rounds, seed=self.args.seed, fraction=1.0),
            deadline_s=self.args.deadline_s, min_clients=n, tls=pki.tls("aggregator") if pki else None)
        if self.args.signed:
            path.write_text(path.read_text() + enrol_devices(self.workdir, device_ids(n), self.args.seed))
        cfg = load_toml(path, AggregatorConfig)
        assert bool(cfg.signing.key) == self.args.signed
        assert cfg.train.fraction == 1.0 and cfg.fleet.min_clients == n == cfg.fleet.expected_clients
        return path, cfg

    def start_store(self) -> str | None:
        """A PostgreSQL server and database for a PostgreSQL setup (its URL); None for SQLite."""
        if self.setup.store != "postgresql":
            return None
        from edge_agent.pgserver import LocalPostgres

        pg = self.stack.enter_context(LocalPostgres(self.workdir / "pg", durable=True))
        self.watcher.add_tree("postgres", pg.pid)
        return pg.new_database("bench")

    def connect_monitor(self) -> Any:
        from edge_agent.transport import MqttLink

        pki = self.plan.pki
        monitor = MqttLink(f"tp-monitor-{self.n}", "127.0.0.1", self.port, clean_start=True,
                           **({"tls": pki.tls("demo-monitor")} if pki is not None
                              else {"username": "device", "password": self.plan.users["device"]}))
        monitor.connect(timeout=10)
        self.stack.callback(monitor.close)
        monitor.subscribe(self.topics.status, qos=1)
        monitor.subscribe(self.topics.round_current, qos=1)
        return monitor

    def start_workers(self, configs: list[Path]) -> None:
        for k, path in enumerate(configs, 1):
            name = f"aggregator-w{k}"
            self.procs[name] = self.fleet.spawn(name, "aggregator", "--config", str(path))
            self.watcher.add(name, self.procs[name].pid)
        self.stack.callback(self.fleet.stop)
        self.last_growth = time.monotonic()
        # A share group is served round-robin over its members: wait until every worker has subscribed, so that
        # every round (the warm-up included) is spread over all of them.
        wait_workers_up(self.workdir, list(self.procs), self.args.timeout_s, self.check)

    def check(self) -> None:
        """Fail at once when a worker died, and when every worker has been silent for --stall-s: a working
        aggregator logs every update, round and presence change, so a silent one is stuck (a round that will
        never end), and waiting for the N-scaled timeout would only waste the run's time."""
        for name, proc in self.procs.items():
            if proc.poll() is not None and proc.returncode != 0:
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.logs()}")
        sizes = {name: log_size(self.workdir / f"{name}.log") for name in self.procs}
        if sizes != self.log_sizes:
            self.log_sizes, self.last_growth = sizes, time.monotonic()
        elif time.monotonic() - self.last_growth > self.args.stall_s:
            raise RuntimeError(f"stalled: no aggregator worker wrote to its log for {self.args.stall_s:g} s\n"
                               f"{self.logs()}")

    def logs(self) -> str:
        """Every worker's warnings and errors (the first few), then its last lines: what a failure report needs."""
        out = []
        for name in self.procs:
            notable = notable_log_lines(self.workdir / f"{name}.log")
            out += [f"--- {name}: warnings and errors ({len(notable)} shown) ---", *notable,
                    f"--- {name}: last lines ---", self.fleet.tail(name, 10)]
        return "\n".join(out)

    # --- the measurements ----------------------------------------------------------------------
    def publish_presence(self) -> float:
        t0 = benchlib.monotonic()
        sent = ask_all(self.publishers, "presence", self.timeout)
        return float(max(s["last"] for s in sent) - t0)

    def one_round(self, monitor: Any, r: int, task_payload: bytes) -> dict[str, Any]:
        """Build round r's updates, publish them all at once, wait for the round's status."""
        built = ask_all(self.publishers, "build", self.timeout, task=task_payload, round=r)
        cpu0 = {name: proc_cpu_s(pid) for name, pid in self.watcher.pids.items()}
        self.current = {"round": r, "go_wall": time.time()}
        for child in self.publishers:
            child.send("go")
        status_msg, t_status, wall_status = wait_for(monitor, self.topics.status, status_of_round(r), self.timeout,
                                                     f"round {r} status", self.check)
        cpu = cpu_used(cpu0, {name: proc_cpu_s(pid) for name, pid in self.watcher.pids.items()})
        memory = worker_memory(self.procs)
        sent = [child.recv(self.timeout, "go") for child in self.publishers]
        status = json.loads(status_msg.payload)
        if status["reporting"] != self.n or not status["succeeded"] or status["rejected"]:
            raise RuntimeError(f"round {r} closed with {status}; logs:\n{self.logs()}")
        first = min(s["first"] for s in sent)
        workers_cpu = {k: v for k, v in cpu.items() if k.startswith("aggregator")}
        return {"round": r, "warmup": r <= self.args.warmup, "ingest_s": t_status - first,
                "ingest_per_s": self.n / (t_status - first), "publish_s": max(s["last"] for s in sent) - first,
                "status_wall": wall_status, "aggregator_duration_s": status["duration_s"],
                "aggregator_cpu_s": sum(workers_cpu.values()), "aggregator_cpu_s_by_worker": workers_cpu,
                "broker_cpu_s": cpu.get("broker", 0.0),
                "postgres_cpu_s": sum(v for k, v in cpu.items() if k.startswith("postgres")),
                "publisher_cpu_s": sum(s["cpu_s"] for s in sent),
                "build_s": max(b["build_s"] for b in built), "update_bytes": int(built[0]["bytes_median"]),
                "aggregator_memory_mb_at_status": memory, "status": status}

    def run_rounds(self, monitor: Any, total_rounds: int, t_spawn: float) -> dict[str, Any]:
        """Every round into self.rows; what the workers looked like when round 1 opened."""
        from edge_agent.codec.envelope import decode_envelope
        from edge_agent.fleet import decode_task

        rows, opened = self.rows, {}
        for r in range(1, total_rounds + 1):
            msg, t_task, _ = wait_for(monitor, self.topics.round_current, task_of_round(r), self.timeout,
                                      f"round {r} task", self.check)
            if r == 1:  # every device's presence is in: what the workers hold before any update
                opened = {"spawn_to_round1_open_s": t_task - t_spawn,
                          "aggregator_memory_mb_at_round1_open": worker_memory(self.procs)}
            listed = decode_task(decode_envelope(msg.payload)).selected
            if listed is not None and len(listed) != self.n:
                raise RuntimeError(f"round {r} selected {len(listed)} device(s), expected {self.n}")
            row = self.one_round(monitor, r, msg.payload)
            rows.append(row)
            self.say(f"{'warm-up' if row['warmup'] else 'round'} {r}: {row['ingest_per_s']:8.0f} updates/s "
                     f"({row['ingest_s']:.2f} s; publishers' last PUBACK at {row['publish_s']:.2f} s; aggregator "
                     f"CPU {row['aggregator_cpu_s']:.1f} s)")
        return opened

    def partial(self, state: str) -> dict[str, Any]:
        """What a failed setup measured: the broker alone, the rounds that completed, and for the round that
        did not, how many updates the store counted and how fast, until its last commit."""
        self.watcher.read()
        out: dict[str, Any] = {
            "broker_ceiling_per_s": benchlib.summarize([x["per_s"] for x in self.ceiling if not x["warmup"]]),
            "completed_rounds": [{k: v for k, v in row.items() if k != "status"} for row in self.rows],
            "aggregator_peak_rss_mb_by_worker": {k: v for k, v in self.watcher.group("aggregator").items()
                                                 if k.startswith("aggregator-w")},
            "broker_peak_rss_mb": round(self.watcher.peak.get("broker", float("nan")), 1)}
        r = self.current.get("round")
        if r is None:
            return out
        try:
            t = store_times(self.setup.store, state).get(r, {})
        except Exception as exc:
            out["failed_round"] = {"round": r, "store_unreadable": str(exc)}
            return out
        last = t.get("last_received_at")
        if last is not None:
            elapsed = last - self.current["go_wall"]
            out["failed_round"] = {"round": r, "warmup": r <= self.args.warmup, "accepted": t.get("accepted"),
                                   "until_last_commit_s": elapsed,
                                   "ingest_per_s_until_last_commit": t.get("accepted", 0) / elapsed,
                                   "closed_in_store": t.get("closed_at") is not None}
        return out

    def finish_workers(self) -> dict[str, int | None]:
        self.watcher.read()  # the workers are about to exit: their last reading
        exits = stop_workers(self.procs)
        bad = {k: v for k, v in exits.items() if v not in (0, None)}
        if bad:
            raise RuntimeError(f"aggregator worker(s) exited with {bad}:\n{self.logs()}")
        return exits

    def run(self) -> dict[str, Any]:
        t_begin = time.perf_counter()
        total_rounds = self.args.warmup + rounds_for(self.args, self.n)
        with self.stack, self.watcher:
            broker_pid = self.start_broker()
            writer = self.start_disk_writer()
            self.start_publishers()
            # One round more than measured: the workers stay up (that round opens and waits), so the last measured
            # round's CPU and memory are read from live processes; they are stopped with SIGTERM after it.
            cfg_path, cfg = self.aggregator_config(total_rounds + 1)
            if self.args.ceiling_rounds != 0:
                self.ceiling = measure_ceiling(self.setup, self.args, self.publishers,
                                               self.plan.link("bench-sub", self.port), self.topics, template_task(cfg),
                                               self.watcher, broker_pid)
            ceiling = self.ceiling
            presence_s = self.publish_presence()
            dsn = self.start_store()
            monitor = self.connect_monitor()
            t_spawn = benchlib.monotonic()
            self.start_workers(worker_configs(cfg_path, self.setup.workers, dsn))
            try:
                opened = self.run_rounds(monitor, total_rounds, t_spawn)
            except Exception as exc:
                raise SetupFailed(str(exc), self.partial(dsn if dsn is not None else str(cfg.state))) from exc
            rows = self.rows
            exits = self.finish_workers()
            times = store_times(self.setup.store, dsn if dsn is not None else str(cfg.state))
            self.watcher.read()
            disk = writer.stop() if writer is not None else None
            for child in self.publishers:
                child.stop()
        add_store_times(rows, times)
        entry = summarize_run(self.setup, rows, ceiling, self.watcher)
        entry.update({
            "update_bytes": rows[-1]["update_bytes"], "signed": bool(self.args.signed), "tls": bool(self.args.tls),
            "publishers": len(self.publishers), "connections_per_publisher": self.args.connections,
            "window": self.args.window, "broker_config": self.plan.note, "state_fs": filesystem_of(self.workdir),
            "busy_disk_writer": disk, "worker_exits": exits, "presence_publish_s": presence_s, **opened,
            "build_s_max": max(x["build_s"] for x in rows), "run_wall_s": time.perf_counter() - t_begin,
            "ceiling_rounds": ceiling, "rounds": rows,
        })
        self.say(f"ingest {entry['ingest_per_s'] or 0:.0f}/s, broker alone {entry['broker_ceiling_per_s'] or 0:.0f}/s, "
                 f"round close {entry['round_close_s'] or 0:.3f} s, aggregator peak RSS "
                 f"{entry['aggregator_peak_rss_mb']} MB ({entry['run_wall_s']:.0f} s)")
        return entry


def add_store_times(rows: list[dict[str, Any]], times: dict[int, dict[str, Any]]) -> None:
    """round_close_s and aggregator_close_s of every round (module docstring), from the store's timestamps."""
    for row in rows:
        t = times.get(row["round"], {})
        last, closed = t.get("last_received_at"), t.get("closed_at")
        row["round_close_s"] = None if last is None else row["status_wall"] - last
        row["aggregator_close_s"] = None if last is None or closed is None else closed - last
        row["accepted_by_worker"] = t.get("accepted_by_worker")


def summarize_run(setup: Setup, rows: list[dict[str, Any]], ceiling: list[dict[str, Any]],
                  watcher: PeakWatcher) -> dict[str, Any]:
    """The entry's headline figures: medians over the measured rounds, peak memory of every process."""
    n = setup.devices
    measured = [x for x in rows if not x["warmup"]]
    ingest = benchlib.summarize([x["ingest_per_s"] for x in measured])
    ceiling_s = benchlib.summarize([x["per_s"] for x in ceiling if not x["warmup"]])
    close = benchlib.summarize([x["round_close_s"] for x in measured if x["round_close_s"] is not None])
    workers_rss = {k: v for k, v in watcher.group("aggregator").items() if k.startswith("aggregator-w")}
    return {
        "devices": n, "workers": setup.workers, "store": setup.store, "disk": setup.disk,
        "ingest_per_s": ingest.get("median"),
        "broker_ceiling_per_s": ceiling_s.get("median"),
        "ratio_to_ceiling": (ingest["median"] / ceiling_s["median"]) if ceiling_s.get("median") else None,
        "aggregator_peak_rss_mb": max(workers_rss.values()) if workers_rss else None,
        "aggregator_peak_rss_mb_by_worker": workers_rss,
        "round_close_s": close.get("median"),
        "broker_peak_rss_mb": round(watcher.peak.get("broker", float("nan")), 1),
        "publisher_peak_rss_mb": watcher.group("publisher"),
        "subscriber_peak_rss_mb": watcher.group("subscriber").get("subscriber"),
        "postgres_peak_rss_mb": watcher.group("postgres") or None,
        "ingest_per_s_summary": ingest, "broker_ceiling_per_s_summary": ceiling_s, "round_close_s_summary": close,
        "aggregator_close_s": benchlib.summarize([x["aggregator_close_s"] for x in measured
                                                  if x["aggregator_close_s"] is not None]),
        "publishers_per_s": benchlib.summarize([n / x["publish_s"] for x in measured]),
        "aggregator_cpu_us_per_update": benchlib.summarize([1e6 * x["aggregator_cpu_s"] / n for x in measured]),
        "updates_per_s": ingest,  # the name bench/security_cost.py and bench/signing_cost.py read
    }


def run_entry(setup: Setup, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Everything the module docstring lists, for one (devices, workers, store, disk); the JSON entry."""
    return FleetRun(setup, args, root).run()


def run_size(n: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One fleet size with the single aggregator (1 worker, SQLite) on a quiet disk: what bench/security_cost.py
    and bench/signing_cost.py compare (their rows read `updates_per_s`, `rounds` and `update_bytes`)."""
    return run_entry(Setup(n, 1, "sqlite", "quiet"), args, root)


# ---------------------------------------------------------------- does the broker keep to Receive-Maximum?

def probe_receive_maximum(root: Path, receive_maximum: int = SUBSCRIBER_RECEIVE_MAXIMUM, count: int = 5000,
                          ack_delay_s: float = 0.0005) -> dict[str, Any]:
    """The aggregator's memory bound rests on the broker sending at most Receive-Maximum unacknowledged QoS 1
    messages. Probe it as the aggregator meets it: a subscriber with manual acks (Receive-Maximum 256)
    acknowledging slower than `count` messages come in from 4 fast publishers; the most it ever held
    unacknowledged should be <= 256 (the rest waiting in the broker's queue)."""
    from edge_agent.broker import DEV_CONFIG, LocalBroker

    workdir = root / "probe-receive-maximum"
    workdir.mkdir()
    users = {"aggregator": secrets.token_hex(12), "device": secrets.token_hex(12)}
    held = {"received": 0, "acked": 0, "max_unacked": 0}
    inbox: queue.Queue[Any] = queue.Queue()
    with LocalBroker(workdir / "broker", users=users, config=bench_broker_config(workdir, count, DEV_CONFIG)) as b:
        sub_link = LinkSpec(b.host, b.port, "aggregator", users["aggregator"], None)
        pub_link = LinkSpec(b.host, b.port, "device", users["device"], None)
        sub = paho_client("probe-sub", sub_link)
        sub.manual_ack_set(True)  # acknowledged after "processing", as the aggregator does after its commit

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            held["received"] += 1
            held["max_unacked"] = max(held["max_unacked"], held["received"] - held["acked"])
            inbox.put(msg)

        sub.on_message = on_message
        paho_connect(sub, sub_link, 10, receive_maximum=receive_maximum)
        sub.subscribe("probe/#", qos=1)
        time.sleep(0.3)

        def acker() -> None:
            while held["acked"] < count:
                msg = inbox.get()
                time.sleep(ack_delay_s)  # a slower consumer than the publishers: the broker must queue
                sub.ack(msg.mid, msg.qos)
                held["acked"] += 1

        thread = threading.Thread(target=acker, daemon=True)
        thread.start()
        pubs = [paho_client(f"probe-pub-{k}", pub_link) for k in range(4)]
        for pub in pubs:
            paho_connect(pub, pub_link, 10)
        payload = bytes(3400)
        for i in range(count):
            pubs[i % 4].publish(f"probe/{i}", payload, qos=1)
        thread.join(60)
        for c in (*pubs, sub):
            c.disconnect()
            c.loop_stop()
    out = {"receive_maximum": receive_maximum, "published": count, **held,
           "kept_to_receive_maximum": held["max_unacked"] <= receive_maximum}
    print(f"Receive-Maximum probe: a subscriber asking for at most {receive_maximum} unacknowledged messages held up "
          f"to {held['max_unacked']} of {count}", file=sys.stderr)
    return out


# ---------------------------------------------------------------- the plan

def plan(args: argparse.Namespace) -> list[Setup]:
    """Every (devices, workers, store, disk) to run, in order: a fleet size's setups together."""
    disk = "busy" if args.busy_disk else "quiet"
    out = []
    for n in args.devices:
        for w in args.workers:
            for store in (args.stores if w == 1 else ["postgresql"]):
                out.append(Setup(n, w, store, disk))
        if not args.busy_disk and n in args.busy_devices and 1 in args.workers:
            out.append(Setup(n, 1, "sqlite", "busy"))
    return out


def postgres_available() -> str | None:
    """Why PostgreSQL setups cannot run here, or None."""
    if importlib.util.find_spec("edge_agent.pgserver") is None:
        return "edge_agent.pgserver is missing"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (the `postgres` extra)"
    try:
        from edge_agent.pgserver import find_postgres_bindir

        find_postgres_bindir()
    except Exception as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- output

def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def targets(results: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each with what this run says."""
    lines = []
    one = [e for e in results if e["workers"] == 1 and e["store"] == "sqlite"]
    quiet = [e for e in one if e["disk"] == "quiet" and e["ratio_to_ceiling"] is not None]
    if quiet:
        worst = min(quiet, key=lambda e: e["ratio_to_ceiling"])
        verdict = "met" if worst["ratio_to_ceiling"] >= 0.5 else "NOT met"
        lines.append(f"- Ingest >= 50 % of the broker-alone rate, 1 worker (SQLite), quiet disk: **{verdict}**; "
                     + ", ".join(f"{e['devices']} devices {100 * e['ratio_to_ceiling']:.0f} %" for e in quiet) + ".")
    busy = [e for e in one if e["disk"] == "busy"]
    if busy:
        parts = []
        for b in busy:
            q = next((e for e in quiet if e["devices"] == b["devices"]), None)
            rel = f" ({100 * b['ingest_per_s'] / q['ingest_per_s']:.0f} % of quiet)" if q and b["ingest_per_s"] else ""
            parts.append(f"{b['devices']} devices {fmt(b['ingest_per_s'])}/s{rel}, "
                         f"{fmt(b['ratio_to_ceiling'] and 100 * b['ratio_to_ceiling'])} % of its broker-alone rate")
        lines.append("- Busy disk, 1 worker (SQLite): " + "; ".join(parts) + ".")
    for store in STORES:
        by_n = {e["devices"]: e for e in results if e["workers"] == 1 and e["store"] == store
                and e["disk"] == "quiet"}
        if 1000 in by_n and max(by_n) > 1000:
            lo, hi = by_n[1000]["aggregator_peak_rss_mb"], by_n[max(by_n)]["aggregator_peak_rss_mb"]
            if lo and hi:
                opened = [m["hwm"] for m in by_n[max(by_n)]["aggregator_memory_mb_at_round1_open"].values()]
                lines.append(f"- Aggregator memory 1,000 -> {max(by_n):,} devices (1 worker, {store}): {lo:.0f} -> "
                             f"{hi:.0f} MB peak RSS (x{hi / lo:.2f}); {max(opened):.0f} MB with every device's "
                             f"presence in, before the first update (the rest grows during rounds).")
    for n in sorted({e["devices"] for e in results}):
        pg = sorted((e for e in results if e["devices"] == n and e["store"] == "postgresql" and e["disk"] == "quiet"),
                    key=lambda e: e["workers"])
        if len(pg) > 1:
            lines.append(f"- Workers at {n:,} devices (PostgreSQL): " + ", ".join(
                f"{e['workers']}: {fmt(e['ingest_per_s'])}/s "
                f"({fmt(e['ratio_to_ceiling'] and 100 * e['ratio_to_ceiling'])} % of broker alone)" for e in pg) + ".")
    return lines


def probe_note(probe: dict[str, Any] | None) -> str:
    if not probe:
        return ""
    if probe["kept_to_receive_maximum"]:
        return (f"The broker kept to Receive-Maximum (probe: at most {probe['max_unacked']} of {probe['published']} "
                f"unacknowledged at a slow subscriber asking for {probe['receive_maximum']}).")
    return (f"**The broker did not keep to Receive-Maximum**: a subscriber asking for at most "
            f"{probe['receive_maximum']} unacknowledged QoS 1 messages and acknowledging slower than they came held "
            f"up to {probe['max_unacked']} of {probe['published']} (probe run before the setups). So an aggregator "
            f"slower than its publishers receives the round's backlog into its own memory instead of leaving it in "
            f"the broker's queue: its peak RSS grows with the backlog, i.e. with N, at about the update's size per "
            f"queued update.")


def render(results: list[dict[str, Any]], skipped: list[str], args: argparse.Namespace, env: dict[str, Any],
           extra: dict[str, Any]) -> str:
    rows = []
    for e in results:
        ing, ceil, close = e["ingest_per_s_summary"], e["broker_ceiling_per_s_summary"], e["round_close_s_summary"]
        rows.append([
            f"{e['devices']:,}", e["workers"], e["store"], e["disk"],
            f"**{fmt(ing.get('median'))}** ({fmt(ing.get('min'))}-{fmt(ing.get('max'))})",
            f"{fmt(ceil.get('median'))} ({fmt(ceil.get('min'))}-{fmt(ceil.get('max'))})",
            fmt(e["ratio_to_ceiling"], ".2f"),
            f"{fmt(close.get('median'), '.3f')} ({fmt(close.get('min'), '.3f')}-{fmt(close.get('max'), '.3f')})",
            " / ".join(f"{v:.0f}" for v in e["aggregator_peak_rss_mb_by_worker"].values()),
            fmt(e["broker_peak_rss_mb"]),
            " / ".join(f"{v:.0f}" for v in e["publisher_peak_rss_mb"].values()),
            fmt(max(e["postgres_peak_rss_mb"].values()) if e["postgres_peak_rss_mb"] else None),
            fmt(e["aggregator_cpu_us_per_update"].get("median")),
            fmt(e["publishers_per_s"].get("median")),
        ])
    table = benchlib.md_table(
        ["devices", "workers", "store", "disk", "ingest/s median (min-max)", "broker alone/s median (min-max)",
         "ratio", "round close s median (min-max)", "aggregator peak RSS MB (per worker)", "broker peak RSS MB",
         "publishers peak RSS MB", "PostgreSQL largest process RSS MB", "aggregator CPU us/update",
         "publishers' own rate/s (N / last PUBACK)"], rows)
    busy = next((e["busy_disk_writer"] for e in results if e["busy_disk_writer"]), None)
    busy_note = (f" The busy-disk writer wrote {busy['mb_per_s']:.0f} MB/s in {busy['block_mb']} MiB blocks, "
                 f"{busy['fsyncs_per_s']:.0f} fsyncs/s (one of those runs)." if busy else "")
    parts = [
        "# Aggregator throughput at fleet scale, against the broker alone", "",
        *targets(results), "", probe_note(extra.get("receive_maximum_probe")), "",
        f"Real aggregator processes (`python -m edge_agent.cli aggregator`, strategy {STRATEGY}, "
        f"every online device selected) on a private Mosquitto ({extra['mosquitto']}; the shipped config with "
        f"max_queued_messages N + {QUEUE_HEADROOM:,}); PostgreSQL setups on a private durable server "
        f"({extra['postgres']}). {args.publishers} publisher processes x {args.connections} MQTT connections "
        f"publish one real int8 update envelope per device per round (QoS 1, at most {args.window} awaiting their "
        f"PUBACK per connection), built before timing. ingest/s = N / (first publish -> the round's status "
        f"message); broker alone/s = the same publishers and N, a subscriber process that only receives (QoS 1, "
        f"Receive-Maximum {SUBSCRIBER_RECEIVE_MAXIMUM}) and counts; ratio = ingest / broker alone. Round close = "
        f"status arrival - the store's received_at of the round's last update (last commit, final aggregation, "
        f"closing the round, publishing model and status). Medians (min-max) over {args.rounds} measured rounds "
        f"({args.big_rounds} from {args.big_devices:,} devices) after {args.warmup} warm-up round(s). Peak RSS = "
        f"VmHWM (MiB). CPU per update = the workers' utime + stime / N. State on "
        f"{extra['state_fs']['type']} ({extra['state_fs']['device']}); {env.get('cpu_count', os.cpu_count())} CPUs "
        f"shared by everything (broker, workers, PostgreSQL, publishers).{busy_note}", "",
        table, "",
    ]
    if skipped:
        parts += ["Not run or failed: " + "; ".join(skipped), ""]
    parts += [benchlib.env_summary_md(env),
              f"SQLite {sqlite3.sqlite_version}, paho-mqtt {extra['paho_mqtt']}, {extra['mosquitto']}, "
              f"{extra['postgres']}. Whole run {extra['wall_s'] / 60:.0f} min."]
    return "\n".join(parts) + "\n"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n\nPer measured round")[0], formatter_class=HelpFormatter,
                                epilog="Results: bench/results/aggregator_throughput.{json,md} (with --tls or "
                                       "--signed: aggregator_throughput_tls / _signed). Progress goes to stderr.")
    p.add_argument("--devices", "--sizes", type=int, nargs="+", default=list(DEVICES), help="simulated fleet sizes")
    p.add_argument("--workers", type=int, nargs="+", default=list(WORKERS),
                   help="aggregator worker counts (more than 1: PostgreSQL store)")
    p.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES), help="stores for 1 worker")
    p.add_argument("--busy-devices", type=int, nargs="*", default=list(BUSY_DEVICES),
                   help="fleet sizes also run with 1 worker (SQLite) on a busy disk (none: skip)")
    p.add_argument("--busy-disk", action="store_true", help="run every setup on a busy disk (and none quiet)")
    p.add_argument("--busy-block-mb", type=int, default=4, help="the busy-disk writer's block, fsynced after each")
    p.add_argument("--busy-file-mb", type=int, default=256, help="the busy-disk writer's file (cycled through)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per run (also broker-alone rounds)")
    p.add_argument("--big-rounds", type=int, default=1, help="measured rounds from --big-devices devices on")
    p.add_argument("--big-devices", type=int, default=50000, help="fleets this big run --big-rounds")
    p.add_argument("--ceiling-rounds", type=int, default=None,
                   help="broker-alone rounds (default: as many as the run's measured rounds; 0: skip)")
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (also broker alone)")
    p.add_argument("--publishers", type=int, default=2, help="publisher processes")
    p.add_argument("--connections", type=int, default=4, help="MQTT connections per publisher process")
    p.add_argument("--window", type=int, default=20, help="QoS 1 publishes awaiting their PUBACK per connection")
    p.add_argument("--deadline-s", type=float, default=7200.0, help="round deadline (rounds close on all N updates)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="bound on every wait, plus N/100 s where N counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signed", action="store_true",
                   help="devices sign their updates (Ed25519) and the aggregator requires and checks signatures")
    p.add_argument("--tls", action="store_true",
                   help="the broker runs mosquitto-prod.conf + acl.example; every connection is mutual TLS")
    p.add_argument("--quick", action="store_true",
                   help="a fast check: 100 and 1,000 devices, 1 and 2 workers, 2 measured rounds, busy disk at 1,000")
    p.add_argument("--stall-s", type=float, default=180.0,
                   help="fail a setup when no aggregator worker has logged anything for this long")
    p.add_argument("--merge", action="store_true",
                   help="keep the existing results file's entries for setups this run does not measure (to re-run "
                        "some setups of a long run)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (aggregator, broker, server logs)")
    args = p.parse_args(argv)
    if args.quick:
        defaults = {"devices": list(DEVICES), "workers": list(WORKERS), "rounds": 3, "busy_devices": list(BUSY_DEVICES)}
        quick = {"devices": [100, 1000], "workers": [1, 2], "rounds": 2, "busy_devices": [1000]}
        for key, value in quick.items():
            if getattr(args, key) == defaults[key]:  # what was given explicitly wins
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    import importlib.metadata

    args = parse_args(argv)
    # paho's own log repeats what the links report (and a harmless race at close): quiet, as the CLI does.
    logging.getLogger("edge_agent.transport.paho").setLevel(logging.CRITICAL)
    # ... and the plain-TCP warning of the monitor link: the bench's private broker is on loopback.
    logging.getLogger("edge_agent.transport").setLevel(logging.ERROR)
    benchlib.warn_openblas_env()
    env = benchlib.environment()
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="edgefl-aggtp-"))
    os.chmod(root, 0o755)  # the PostgreSQL server runs as the postgres user when we are root
    setups = plan(args)
    previous = load_previous(args)
    skipped = []
    no_pg = postgres_available() if any(s.store == "postgresql" for s in setups) else None
    if no_pg is not None:
        skipped = [s.label for s in setups if s.store == "postgresql"]
        print(f"PostgreSQL setups skipped: {no_pg}", file=sys.stderr)
        skipped = [f"{label} ({no_pg})" for label in skipped]
        setups = [s for s in setups if s.store != "postgresql"]
    extra: dict[str, Any] = {"mosquitto": mosquitto_version(), "postgres": postgres_version(),
                             "paho_mqtt": importlib.metadata.version("paho-mqtt"), "sqlite": sqlite3.sqlite_version,
                             "state_fs": filesystem_of(root), "cpu_count": os.cpu_count()}
    results: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    try:
        extra["receive_maximum_probe"] = probe_receive_maximum(root)
        for i, setup in enumerate(setups, 1):
            print(f"[{i}/{len(setups)}] {setup.label} ({(time.perf_counter() - t0) / 60:.1f} min so far)",
                  file=sys.stderr)
            # Which run and which product commit measured it: a --merge'd file holds entries of several runs.
            provenance = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "git": env.get("git")}
            try:
                results.append({**run_entry(setup, args, root), **provenance})
            except Exception as exc:  # one setup failing must not lose the others: recorded, the run goes on
                print(f"  {setup.label} FAILED: {exc}", file=sys.stderr)
                failed.append({**dataclasses.asdict(setup), "error": str(exc)[:4000], **provenance,
                               **(exc.partial if isinstance(exc, SetupFailed) else {})})
            write_all(results, skipped, failed, args, env, {**extra, "wall_s": time.perf_counter() - t0}, previous)
            if not args.keep:
                shutil.rmtree(root / setup.slug, ignore_errors=True)
    finally:
        if args.keep:
            print(f"kept the work directory (logs, state databases): {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    extra["wall_s"] = time.perf_counter() - t0
    markdown, paths = write_all(results, skipped, failed, args, env, extra, previous)
    print(markdown)
    print(f"results: {paths[0]} and {paths[1]} ({extra['wall_s']:.0f} s)")
    return 1 if failed else 0


def results_name(args: argparse.Namespace) -> str:
    return NAME + ("_tls" if args.tls else "") + ("_signed" if args.signed else "")


def setup_key(entry: dict[str, Any]) -> tuple[int, bool, int, bool]:
    """Sort and identity key of an entry: devices, then quiet before busy, workers, SQLite first."""
    return int(entry["devices"]), entry["disk"] == "busy", int(entry["workers"]), entry["store"] != "sqlite"


def load_previous(args: argparse.Namespace) -> dict[str, Any] | None:
    path = benchlib.RESULTS_DIR / f"{results_name(args)}.json"
    if not args.merge or not path.exists():
        return None
    previous: dict[str, Any] = json.loads(path.read_text())
    return previous


def merged(previous: dict[str, Any] | None, key: str, mine: list[dict[str, Any]],
           done: set[tuple[int, bool, int, bool]]) -> list[dict[str, Any]]:
    """This run's entries, and the previous file's for the setups this run has not (yet) measured (`done`)."""
    kept = [e for e in (previous or {}).get(key, []) if setup_key(e) not in done]
    return sorted(kept + mine, key=setup_key)


def failure_note(f: dict[str, Any]) -> str:
    """One line for a failed setup: why, and how far its last round got."""
    note = (f"{f['devices']:,} devices, {f['workers']} worker(s), {f['store']}, {f['disk']} disk: FAILED "
            f"({f['error'].splitlines()[0][:200]})")
    ceiling = (f.get("broker_ceiling_per_s") or {}).get("median")
    if ceiling:
        note += f"; broker alone {ceiling:.0f}/s"
    r = f.get("failed_round") or {}
    if r.get("accepted"):
        note += (f"; round {r['round']}{' (warm-up)' if r.get('warmup') else ''}: {r['accepted']:,} updates counted "
                 f"in {r['until_last_commit_s']:.1f} s ({r['ingest_per_s_until_last_commit']:.0f}/s until the last "
                 f"commit), {'closed' if r.get('closed_in_store') else 'not closed'} in the store, no status message")
    rss = f.get("aggregator_peak_rss_mb_by_worker") or {}
    if rss:
        note += f"; aggregator peak RSS {' / '.join(f'{v:.0f}' for v in rss.values())} MB"
    return note


def write_all(results: list[dict[str, Any]], skipped: list[str], failed: list[dict[str, Any]],
              args: argparse.Namespace, env: dict[str, Any], extra: dict[str, Any],
              previous: dict[str, Any] | None = None) -> tuple[str, tuple[Path, Path]]:
    """The results so far (written after every setup, so a long run that fails late keeps what it measured);
    with --merge, together with the previous file's entries for the setups this run did not measure."""
    done = {setup_key(e) for e in (*results, *failed)}
    results, failed = merged(previous, "results", results, done), merged(previous, "failed", failed, done)
    earlier = [] if previous is None else [*previous.get("earlier_runs", []), {
        "date_utc": previous.get("environment", {}).get("date_utc"), "git": previous.get("environment", {}).get("git"),
        "config": previous.get("config"),
        "wall_s": previous.get("environment", {}).get("wall_s")}]
    markdown = render(results, skipped + [failure_note(f) for f in failed], args, env, extra)
    if earlier:
        markdown += (f"Entries of {len(earlier)} earlier run(s) kept for the setups this run did not measure "
                     f"(--merge; their dates and configurations are in the JSON, `earlier_runs`).\n")
    doc = {"benchmark": NAME, "description": __doc__, "environment": {**env, **extra}, "config": vars(args),
           "results": results, "skipped": skipped, "failed": failed, "earlier_runs": earlier}
    paths = benchlib.write_results(results_name(args), doc, markdown)
    return markdown, paths


if __name__ == "__main__":
    sys.exit(main())
