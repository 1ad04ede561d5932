"""`edge-fl demo`: a whole fleet on one machine, through a real broker.

A private Mosquitto from broker_config/ (or `--broker host:port`), the aggregator, and one agent
process per federated subject on the real recordings. The demo process itself only watches: it
subscribes to telemetry and status, prints a table per round, and writes a results document shaped
like `edge-fl simulate`'s. Every process it started is stopped on the way out, whatever happens.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data.partition import CLIENT_SUBJECTS, PartitionConfig
from .learning.metrics import summarize
from .learning.training import TrainingConfig
from .protocol import Topics

log = logging.getLogger("edge_fl.demo")


@dataclass(frozen=True)
class DemoConfig:
    train: TrainingConfig = field(default_factory=TrainingConfig)  # every option `edge-fl simulate` takes
    partition: PartitionConfig = field(default_factory=PartitionConfig)  # what each agent holds
    broker: str | None = None  # host:port of an existing broker; default: a private one
    username: str | None = None
    password: str | None = None
    timeout_s: float = 170.0
    deadline_s: float = 60.0
    workdir: Path | None = None
    fleet: str = "demo"


def _toml_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def _toml(sections: dict[str, dict[str, Any]], top: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items() if v is not None]
    for name, body in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_aggregator_config(workdir: Path, host: str, port: int, username: str | None, password: str | None, *,
                            fleet: str, clients: int, train: TrainingConfig, deadline_s: float, min_clients: int = 1,
                            max_update_bytes: int | None = None) -> Path:
    path = workdir / "aggregator.toml"
    path.write_text(_toml(
        {"broker": {"host": host, "port": port, "username": username, "password": password},
         "fleet": {"expected_clients": clients, "min_clients": min_clients, "deadline_s": deadline_s,
                   "max_update_bytes": max_update_bytes},
         "train": asdict(train)},
        {"state": str(workdir / "aggregator.db"), "fleet_name": fleet}))
    return path


def write_agent_config(workdir: Path, host: str, port: int, username: str | None, password: str | None, *,
                       fleet: str, subject: int, rng_stream: int, partition: PartitionConfig,
                       max_payload_bytes: int | None = None) -> Path:
    device = f"subject-{subject:02d}"
    path = workdir / f"{device}.toml"
    path.write_text(_toml(
        {"broker": {"host": host, "port": port, "username": username, "password": password,
                    "max_payload_bytes": max_payload_bytes},
         "data": {"subject": subject, "regime": partition.regime, "seed": partition.seed,
                  "shots": partition.shots, "classes_per_client": partition.classes_per_client,
                  "alpha": partition.alpha}},
        {"device_id": device, "state_dir": str(workdir / device), "fleet": fleet, "rng_stream": rng_stream}))
    return path


class Fleet:
    """Processes started with `python -m edge_agent.cli ...`; `stop()` ends all of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.args: dict[str, tuple[str, ...]] = {}

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        logf = open(self.workdir / f"{name}.log", "ab")
        self.args[name] = args
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", *args], stdout=logf,
                                            stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        logf.close()
        return self.procs[name]

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start `name` again with the arguments it had (and no crash point)."""
        old = self.procs[name]
        if old.poll() is None:
            old.kill()
            old.wait()
        return self.spawn(name, *self.args[name])

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None and p.returncode != 0:
                raise RuntimeError(f"{name} exited with code {p.returncode}; its log:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 5.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_demo(cfg: DemoConfig, out: Path | None, *, printer: Any = print) -> dict[str, Any]:
    from .broker import LocalBroker
    from .transport import Message, MqttLink

    owned = cfg.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="edge-fl-demo-")) if cfg.workdir is None else Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    broker = None
    if cfg.broker:
        host, _, port_s = cfg.broker.rpartition(":")
        host, port = host or "127.0.0.1", int(port_s)
        users = {n: cfg.password or "" for n in ("aggregator", "device", "monitor")}
        user_names = {n: cfg.username for n in users}
    else:
        users = {n: secrets.token_hex(12) for n in ("aggregator", "device", "monitor")}
        broker = LocalBroker(workdir / "broker", users=users).start()
        host, port = broker.host, broker.port
        user_names = {n: n for n in users}
        printer(f"broker: private Mosquitto on {host}:{port} (config from broker_config/mosquitto-dev.conf)")
    topics = Topics(cfg.fleet)
    clients = [f"subject-{s:02d}" for s in CLIENT_SUBJECTS]
    fleet = Fleet(workdir)
    monitor = None
    try:
        monitor = MqttLink(f"edge-fl-demo-monitor-{os.getpid()}", host, port, username=user_names["monitor"],
                           password=users["monitor"], clean_start=True)
        monitor.connect(timeout=10)
        monitor.subscribe(topics.telemetry_filter, qos=1)
        monitor.subscribe(topics.status, qos=1)
        agg = write_aggregator_config(workdir, host, port, user_names["aggregator"], users["aggregator"],
                                      fleet=cfg.fleet, clients=len(clients), train=cfg.train,
                                      deadline_s=cfg.deadline_s)
        fleet.spawn("aggregator", "aggregator", "--config", str(agg), "--exit-when-done")
        for i, (cid, subject) in enumerate(zip(clients, CLIENT_SUBJECTS, strict=True)):
            path = write_agent_config(workdir, host, port, user_names["device"], users["device"], fleet=cfg.fleet,
                                      subject=subject, rng_stream=i, partition=cfg.partition)
            fleet.spawn(cid, "agent", "--config", str(path))
        t = cfg.train
        printer(f"started the aggregator and {len(clients)} agents ({t.strategy}, {cfg.partition.regime}, "
                f"{t.rounds} rounds, seed {t.seed}" + (f", fraction {t.fraction}" if t.fraction < 1 else "")
                + f"); logs in {workdir}")
        header = (f"{'round':>5} {'global':>7} {'personal':>9} {'p10':>6} {'reporting':>10} "
                  f"{'bytes in':>9} {'bytes out':>10}")
        printer(header)
        printer("-" * len(header))
        telemetry: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
        status: dict[int, dict[str, Any]] = {}
        rows: list[dict[str, Any]] = []
        printed = 0
        deadline = time.monotonic() + cfg.timeout_s
        while printed < cfg.train.rounds:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the demo did not finish {cfg.train.rounds} rounds within {cfg.timeout_s:.0f} s "
                                   f"(round {printed} done); aggregator log:\n{fleet.tail('aggregator')}")
            fleet.check()
            try:
                msg = monitor.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if not isinstance(msg, Message) or not msg.payload:
                continue
            doc = json.loads(msg.payload)
            if msg.topic == topics.status:
                status[int(doc["model_version"])] = doc
            else:
                telemetry[int(doc["version"])][doc["device"]] = doc
            while printed + 1 in status and len(telemetry[printed + 1]) == len(clients):
                v = printed + 1
                reports, st = telemetry[v], status[v]
                accs = {d: r["personal_acc"] for d, r in sorted(reports.items())}
                glob = [r["global_acc"] for r in reports.values() if r["global_acc"] is not None]
                row = {"round": v, "client_acc": accs, **summarize(list(accs.values())),
                       "global_acc": float(np.mean(glob)) if glob else None,
                       "clients_reporting": st["reporting"], "uplink_bytes": st["bytes_in"],
                       "downlink_bytes": st["bytes_out"], "rejected": st["rejected"]}
                rows.append(row)
                g = "-" if row["global_acc"] is None else f"{100 * row['global_acc']:.1f}"
                printer(f"{v:>5} {g:>7} {100 * row['mean_acc']:>9.1f} {100 * row['p10_acc']:>6.1f} "
                        f"{st['reporting']:>4}/{st['selected']:<5} {st['bytes_in']:>9} {st['bytes_out']:>10}")
                printed = v
        last = rows[-1]
        result = {
            "config": {**asdict(cfg), "workdir": str(workdir)},
            "rounds": rows,
            "summary": {"mean_acc": last["mean_acc"], "p10_acc": last["p10_acc"], "worst_acc": last["worst_acc"],
                        "global_acc": last["global_acc"],
                        "uplink_bytes_per_client_round": sum(r["uplink_bytes"] for r in rows) / sum(
                            max(1, r["clients_reporting"]) for r in rows)},
        }
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1, default=float))
        return result
    finally:
        fleet.stop()
        if monitor is not None:
            monitor.close()
        if broker is not None:
            broker.stop()
        if owned and not os.environ.get("EDGEFL_KEEP_DEMO"):
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
