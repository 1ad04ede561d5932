"""`edge-fl demo`: a whole fleet on one machine, through a real broker.

A private Mosquitto from broker_config/ (or `--broker host:port`), the aggregator, and `--agents N` agent
processes on the real recordings: by default one per federated subject; more agents than subjects take the
subjects' recordings in turn (`subject-04-2` is the second agent on subject 4's data, with its own device id and
random stream). With `--data DIR`, a per-user dataset directory instead: one agent per federated user of its card,
device id = user id (`<user>-2` and so on beyond), each reading its user's windows from DIR (demo_data.py). The
demo process itself only watches: it subscribes to telemetry and status (with --data also to the global model,
to score its new-user head on the held-out users), prints a table per round, and writes a results document
shaped like `edge-fl simulate`'s.

No process outlives the demo, whatever ends it:
- Success, an error, SIGINT (Ctrl-C), SIGTERM or SIGHUP: a signal is turned into `Interrupted` in the main
  thread at its next safe point (at most half a second later; `_StopSignals`), so the `finally` that stops the
  fleet and the broker runs; while it runs, further signals are held, so a second Ctrl-C cannot cut the clean-up
  short. The exit code is then 128 + the signal number.
- The demo killed outright (SIGKILL, the OOM killer): every child's stdin is a pipe whose only write end the demo
  holds. The kernel closes it when the demo dies, however it dies; the child (started as `python -m
  edge_agent.demo ...`, see `run_supervised`) reads end-of-file and stops itself, SIGTERM then SIGKILL. Chosen over
  prctl(PR_SET_PDEATHSIG): that fires when the *thread* that forked exits, not the process, needs code between
  fork and exec (unsafe while paho's network thread runs) and exists on Linux only; a pipe works on any POSIX
  system, Termux included. The private broker has `setpriv --pdeathsig` (edge_agent/broker.py).
Children run in their own session, so a terminal's Ctrl-C or hang-up reaches only the demo, which stops them.

Secure by default: with its private broker the demo runs the production setup (SECURITY.md), mutual TLS against
broker_config/mosquitto-prod.conf and acl.example, one certificate per process, and Ed25519 signatures required
on every update, task and model. The throwaway fleet CA and keys (edge_agent/demo_pki.py) live in `pki/` of the
work directory (mode 0700), kept or removed with the logs. It costs well under a second and gives the same
accuracies as `--plain`. `--plain` (and `--broker`, whose users have passwords) is the development setup:
password logins over plain MQTT, no signatures; the demo says so loudly.

Secrets never reach the configs, the logs, the results or the screen: private keys stay in files of `pki/`
(mode 0600); passwords go to files in a separate private directory (mode 0700) that the configs name as
`password_file`; it is deleted as soon as every process has logged in (the first round closed) and in any case on
the way out.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from .data.partition import PartitionConfig
from .demo_data import DemoData
from .faults import ENV as CRASH_ENV
from .learning.metrics import summarize
from .learning.training import TrainingConfig
from .messaging import TlsOptions
from .protocol import Topics

log = logging.getLogger("edge_fl.demo")

#: Signals that stop the demo cleanly (SIGKILL cannot be caught: the children's stdin pipe covers it).
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: How long a child whose demo is gone waits for its own clean shutdown before it kills itself.
ORPHAN_GRACE_S = 10.0


@dataclass(frozen=True)
class DemoConfig:
    train: TrainingConfig = field(default_factory=TrainingConfig)  # every option `edge-fl simulate` takes
    partition: PartitionConfig = field(default_factory=PartitionConfig)  # what each agent holds
    broker: str | None = None  # host:port of an existing broker; default: a private one
    username: str | None = None
    password: str | None = None  # never written anywhere but a private password file
    timeout_s: float = 170.0
    deadline_s: float = 60.0
    workdir: Path | None = None  # default: a temporary directory, removed after a successful run
    fleet: str = "demo"
    agents: int | None = None  # default: one per federated subject (or user of `data`)
    keep_logs: bool = False  # keep the temporary work directory after a successful run too
    plain: bool = False  # passwords over plain MQTT and no signatures (always so with `broker`): development only
    data: Path | None = None  # a per-user dataset directory (docs/data-format.md); default: the bundled recordings
    backbone: Path | None = None  # with `data` (windows): the agents' backbone; default: the bundled one
    split: str = "auto"  # with `data`: the time split, as `edge-fl simulate --split`
    # Every agent's [data] augment_copies and per_user_standardization; None: the key left out of its config (the
    # agent's default). The results say what the agents do with them in `data_options`.
    augment_copies: int | None = None
    per_user_standardization: bool | None = None


#: DemoConfig's fields that only mean something with `data` (left out of the results of a run without it).
DATA_FIELDS = ("data", "backbone", "split")
#: DemoConfig's [data] keys of every agent: in the results as `data_options`, what the agents resolve them to.
DEVICE_OPTION_FIELDS = ("augment_copies", "per_user_standardization")


#: What `--plain` prints (to stdout, with the table, where nobody can miss it).
PLAIN_WARNING = ("WARNING: plain demo: password logins over UNENCRYPTED MQTT and NO signatures; anyone who can reach "
                 "the broker can read and forge updates, tasks and models. Development on loopback only; without "
                 "--plain and --broker the demo runs mutual TLS with signatures (SECURITY.md)")


class Interrupted(BaseException):
    """A stop signal arrived (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by signal N"


class _StopSignals:
    """STOP_SIGNALS stop the fleet while it runs, and are held while it is stopped.

    The handler only records the signal; `check()`, called where the demo waits (every half second in the
    round loop, and between start-up steps), raises `Interrupted`. Raising from the handler itself would land
    anywhere in the main thread, including between a lock's acquire and the `try` that releases it (inside
    queue.Queue.get or subprocess.Popen.poll, which the round loop calls all the time): the lock stays held and
    the clean-up that needs it waits forever. A SIGTERM test caught the demo hanging that way.

    Python runs signal handlers in the main thread only; called from another thread, this does nothing.
    """

    def __init__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self.previous: dict[int, Any] = {}
        self.held: list[int] = []
        self.pending: int | None = None

    def _request(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is None:  # one is enough: later ones are held like those during the clean-up
            self.pending = signum
        else:
            self.held.append(signum)

    def check(self) -> None:
        """Raise `Interrupted` if a stop signal has arrived: the caller is at a point where that is safe."""
        if self.pending is not None:
            self.holding()
            raise Interrupted(self.pending)

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self.held.append(signum)

    def _install(self, handler: Callable[[int, FrameType | None], None]) -> None:
        if not self.active:
            return
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, handler)
            self.previous.setdefault(sig, signal.SIG_DFL if previous is None else previous)

    def raising(self) -> None:
        self._install(self._request)

    def holding(self) -> None:
        self._install(self._hold)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


def _toml_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def _toml(sections: dict[str, dict[str, Any]], top: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items() if v is not None]
    for name, body in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items() if v is not None]
    return "\n".join(lines) + "\n"


def _path_or_none(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _tls_section(tls: TlsOptions | None) -> dict[str, dict[str, Any]]:
    return {} if tls is None else {"broker.tls": {"ca_file": tls.ca_file, "cert_file": tls.cert_file,
                                                  "key_file": tls.key_file}}


def write_aggregator_config(workdir: Path, host: str, port: int, username: str | None, password: str | None, *,
                            fleet: str, clients: int, train: TrainingConfig, deadline_s: float, min_clients: int = 1,
                            max_update_bytes: int | None = None, password_file: Path | None = None,
                            tls: TlsOptions | None = None, signing: dict[str, str] | None = None,
                            embedding_dim: int | None = None, num_classes: int | None = None) -> Path:
    """The aggregator's TOML. Give `password_file` (and no `password`) to keep the secret out of the file;
    `tls` for [broker.tls], `signing` for [signing] (key, registry); `embedding_dim` and `num_classes` size the
    head (default: the aggregator's, the bundled backbone's 64 features and the bundled recordings' 7 classes)."""
    path = workdir / "aggregator.toml"
    path.write_text(_toml(
        {"broker": {"host": host, "port": port, "username": username, "password": password,
                    "password_file": _path_or_none(password_file)},
         **_tls_section(tls),
         "fleet": {"expected_clients": clients, "min_clients": min_clients, "deadline_s": deadline_s,
                   "max_update_bytes": max_update_bytes},
         "train": asdict(train),
         **({"signing": signing} if signing else {})},
        {"state": str(workdir / "aggregator.db"), "fleet_name": fleet, "embedding_dim": embedding_dim,
         "num_classes": num_classes}))
    return path


def write_agent_config(workdir: Path, host: str, port: int, username: str | None, password: str | None, *,
                       fleet: str, rng_stream: int, partition: PartitionConfig, subject: int | None = None,
                       data: Mapping[str, Any] | None = None, backbone: str | None = None,
                       max_payload_bytes: int | None = None, device_id: str | None = None,
                       password_file: Path | None = None, tls: TlsOptions | None = None,
                       signing: dict[str, Any] | None = None) -> Path:
    """An agent's TOML on `subject`'s recordings (device id `subject-NN` unless given), or on what the [data] keys
    `data` name (then give `device_id`), with `backbone` as [backbone] model if given; `tls` for [broker.tls],
    `signing` for [signing] (key, fleet_keys)."""
    if subject is None and (data is None or device_id is None):
        raise ValueError("write_agent_config: give the subject, or the [data] keys that name the agent's data and "
                         "its device id")
    data = {"subject": subject} if data is None else data
    device = device_id or f"subject-{subject:02d}"
    path = workdir / f"{device}.toml"
    path.write_text(_toml(
        {"broker": {"host": host, "port": port, "username": username, "password": password,
                    "password_file": _path_or_none(password_file), "max_payload_bytes": max_payload_bytes},
         **_tls_section(tls),
         **({"backbone": {"model": backbone}} if backbone else {}),
         "data": {**data, "regime": partition.regime, "seed": partition.seed,
                  "shots": partition.shots, "classes_per_client": partition.classes_per_client,
                  "alpha": partition.alpha},
         **({"signing": signing} if signing else {})},
        {"device_id": device, "state_dir": str(workdir / device), "fleet": fleet, "rng_stream": rng_stream}))
    return path


def _write_secret(directory: Path, name: str, secret: str) -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


class Fleet:
    """Processes started with `python -m edge_agent.demo ...` (the `edge-fl` command line, supervised):
    `stop()` ends all of them, and each ends by itself if the process that started it dies."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.args: dict[str, tuple[str, ...]] = {}
        self.envs: dict[str, dict[str, str]] = {}

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.args[name] = args
        self.envs[name] = dict(env or {})
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.workdir / f"{name}.log", "ab") as logf:  # the child has its own descriptor
            # stdin=PIPE: the lifeline run_supervised watches; we never write to it.
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "edge_agent.demo", *args],
                                                stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                                                env=full_env, start_new_session=True)
        return self.procs[name]

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start `name` again with the arguments and environment it had (and no crash point)."""
        old = self.procs[name]
        if old.poll() is None:
            old.kill()
            old.wait()
        _close_lifeline(old)
        env = {k: v for k, v in self.envs[name].items() if k != CRASH_ENV}
        return self.spawn(name, *self.args[name], env=env)

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None and p.returncode != 0:
                raise RuntimeError(f"{name} exited with code {p.returncode}; its log:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

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
            _close_lifeline(p)


class SocketTally:
    """What the devices' TCP connections carried each round, from the cumulative counts their telemetry reports
    (`socket_bytes_sent` / `_received`, Linux TCP_INFO): the bytes a device pays for, MQTT and TLS included."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, int]] = {}

    def round(self, reports: dict[str, dict[str, Any]]) -> tuple[int | None, int | None]:
        """(received, sent) by all devices since their previous report; None when a device does not report it."""
        down = up = 0
        for device, report in reports.items():
            if "socket_bytes_received" not in report:
                return None, None
            now = (int(report["socket_bytes_sent"]), int(report["socket_bytes_received"]))
            before = self.last.get(device, (0, 0))
            self.last[device] = now
            up, down = up + now[0] - before[0], down + now[1] - before[1]
        return down, up

    @staticmethod
    def summary(rows: list[dict[str, Any]], devices: int) -> dict[str, float]:
        downs = [r["device_socket_bytes_received"] for r in rows]
        ups = [r["device_socket_bytes_sent"] for r in rows]
        if not rows or None in downs or None in ups:
            return {}
        return {"device_socket_bytes_received_per_client_round": sum(downs) / (len(rows) * devices),
                "device_socket_bytes_sent_per_client_round": sum(ups) / (len(rows) * devices)}


def _close_lifeline(p: subprocess.Popen[bytes]) -> None:
    if p.stdin is not None:
        try:
            p.stdin.close()
        except OSError:
            pass


def _exit_with_parent(grace_s: float = ORPHAN_GRACE_S) -> None:
    """End this process when its stdin pipe closes, that is when the process holding the other end dies."""
    if not stat.S_ISFIFO(os.fstat(0).st_mode):
        return  # started by hand from a terminal: no lifeline to watch

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        log.warning("the demo that started this process is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)  # the service's own handler: a clean stop
        time.sleep(grace_s)  # a daemon thread: it only gets here if the clean stop hangs
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_supervised(argv: list[str]) -> int:
    """`edge-fl ARGV` as a child of the demo: it stops when the demo is gone, however the demo ended."""
    _exit_with_parent()
    from .cli import main

    return main(argv)


def fleet_data(cfg: DemoConfig, warn: Callable[[str], None]) -> DemoData:
    """What the agents train on: the bundled recordings, or `cfg.data` (read, checked and embedded here, before
    anything starts: a dataset the agents could not use is refused in one line)."""
    from .demo_data import bundled_data, user_dataset_data

    if cfg.data is None:
        if cfg.backbone is not None or cfg.split != "auto":
            raise ValueError("a backbone and a split rule go with a dataset directory (--data DIR): the bundled "
                             "recordings run the bundled backbone and their own time split")
        return bundled_data(cfg.agents)
    return user_dataset_data(cfg.data, cfg.agents, cfg.partition, backbone=cfg.backbone, split=cfg.split, warn=warn)


def device_options(cfg: DemoConfig, data: DemoData) -> dict[str, Any] | None:
    """What every agent does with its data under `cfg`'s [data] keys (unset: an agent's default, where its data
    can apply it), as the results' `data_options`; None when nothing. ValueError for augmented copies of a
    features dataset: its agents would refuse them at start."""
    from .config import DataConfig

    keys = DataConfig(augment_copies=cfg.augment_copies, per_user_standardization=cfg.per_user_standardization)
    kind = "windows" if data.report is None else data.report["kind"]  # the bundled recordings are windows
    if cfg.augment_copies and kind != "windows":
        raise ValueError(f"augment_copies = {cfg.augment_copies}: {cfg.data} is a {kind} dataset, with no raw sensor "
                         "windows to augment; leave augment_copies out")
    copies = keys.copies_to_make(can_augment=kind == "windows")
    own = keys.standardizes_per_user(has_population=True)  # every demo source has population statistics
    return {"augment_copies": copies, "per_user_standardization": own} if copies or own else None


def _describe_options(options: dict[str, Any] | None) -> str:
    """The device options' part of the start line."""
    if options is None:
        return ""
    copies = options["augment_copies"]
    return "".join([f", {copies} augmented cop{'y' if copies == 1 else 'ies'}" if copies else "",
                    ", per-user standardization" if options["per_user_standardization"] else ""])


def _describe(report: dict[str, Any], backbone: str | None) -> str:
    """The `data:` line of a run on a dataset directory, from its `data` section."""
    held = len(report["users"]["holdout"])
    return (f"data: {report['name']} in {report['path']} ({report['kind']}, {report['num_classes']} classes, "
            f"{len(report['users']['federate'])} federated users, "
            + (f"{held} held out as new users" if held else "no held-out users: no new-user accuracy")
            + f"; split {report['split']['rule']}" + (f", backbone {backbone}" if backbone else "") + ")")


def run_demo(cfg: DemoConfig, out: Path | None, *, printer: Callable[[str], None] = print,
             warn: Callable[[str], None] = log.warning) -> dict[str, Any]:
    """Run the fleet for `cfg.train.rounds` rounds and return (and write to `out`) the results.

    Raises `Interrupted` on SIGINT, SIGTERM or SIGHUP (from the main thread), after stopping everything; the
    temporary work directory is kept, and its path printed, unless the run succeeded (and `keep_logs` is off).
    `warn` gets what is legal in a dataset directory but worth saying (`edge-fl data check`'s problems).
    """
    from .broker import LocalBroker
    from .codec.envelope import decode_envelope
    from .demo_data import new_user_accuracy
    from .demo_pki import AGGREGATOR, MONITOR, DemoPki, make_demo_pki
    from .fleet import GlobalModel, decode_global
    from .transport import Message, MqttLink

    data = fleet_data(cfg, warn)
    options = device_options(cfg, data)
    # Every agent's [data] keys beside those naming its data; a None is left out of the file (the agent's default).
    option_keys = {"augment_copies": cfg.augment_copies, "per_user_standardization": cfg.per_user_standardization}
    clients = data.agents
    # With --data the results carry a new-user accuracy per round: the new-user head of each global version (read
    # from model/current, as devices read it) on the held-out users' windows; null without held-out users.
    has_new_users = data.new_user_y is not None and data.new_user_y.size > 0
    secure = not (cfg.plain or cfg.broker)
    owned = cfg.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="edge-fl-demo-")) if cfg.workdir is None else Path(cfg.workdir)
    # Paths inside a config are read relative to the config's own directory: write them absolute.
    workdir = workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    secrets_dir = Path(tempfile.mkdtemp(prefix="edge-fl-demo-secrets-"))  # mode 0700, outside the work directory
    stop_signals = _StopSignals()
    broker: LocalBroker | None = None
    fleet = Fleet(workdir)
    monitor: MqttLink | None = None
    pki: DemoPki | None = None
    finished = False
    try:
        stop_signals.raising()
        if secure:
            pki = make_demo_pki(workdir / "pki", [a.device for a in clients])
            users: dict[str, str] = {}  # no password file entries: a certificate is the only way in
            broker = LocalBroker(workdir / "broker", users=users, config=pki.broker_config)
            broker.start()
            host, port = broker.host, broker.port
            user_names: dict[str, str | None] = {}
            printer(f"broker: private Mosquitto on {host}:{port} (config from {pki.broker_config})")
            printer("security: mutual TLS, one certificate per process (throwaway fleet CA in "
                    f"{pki.directory}), Ed25519 signatures required on every update, task and model")
        elif cfg.broker:
            host, _, port_s = cfg.broker.rpartition(":")
            if not port_s.isdigit():
                raise ValueError(f"--broker {cfg.broker!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
            host, port = host or "127.0.0.1", int(port_s)
            users = {n: cfg.password or "" for n in ("aggregator", "device", "monitor")}
            user_names = {n: cfg.username for n in users}
        else:
            users = {n: secrets.token_hex(12) for n in ("aggregator", "device", "monitor")}
            broker = LocalBroker(workdir / "broker", users=users)
            broker.start()
            host, port = broker.host, broker.port
            user_names = {n: n for n in users}
            printer(f"broker: private Mosquitto on {host}:{port} (config from {broker.config})")
        stop_signals.check()
        if not secure:
            printer(PLAIN_WARNING)
        secret_files = {n: _write_secret(secrets_dir, f"{n}.pass", pw) if pw else None for n, pw in users.items()}
        topics = Topics(cfg.fleet)
        monitor = MqttLink(MONITOR if pki else f"edge-fl-demo-monitor-{os.getpid()}", host, port,
                           username=user_names.get("monitor"), password=users.get("monitor") or None,
                           clean_start=True, tls=pki.tls(MONITOR) if pki else None)
        monitor.connect(timeout=10)
        stop_signals.check()
        monitor.subscribe(topics.telemetry_filter, qos=1)
        monitor.subscribe(topics.status, qos=1)
        if has_new_users:
            monitor.subscribe(topics.model_current, qos=1)
        if data.report is not None:
            printer(_describe(data.report, data.backbone))
        agg = write_aggregator_config(workdir, host, port, user_names.get("aggregator"), None, fleet=cfg.fleet,
                                      clients=len(clients), train=cfg.train, deadline_s=cfg.deadline_s,
                                      password_file=secret_files.get("aggregator"),
                                      tls=pki.tls(AGGREGATOR) if pki else None,
                                      signing={"key": str(pki.fleet_key), "registry": str(pki.registry)}
                                      if pki else None, embedding_dim=data.embedding_dim, num_classes=data.num_classes)
        fleet.spawn("aggregator", "aggregator", "--config", str(agg), "--exit-when-done")
        for i, agent in enumerate(clients):
            device = agent.device
            path = write_agent_config(workdir, host, port, user_names.get("device"), None, fleet=cfg.fleet,
                                      data={**agent.data, **option_keys}, backbone=data.backbone, rng_stream=i,
                                      partition=cfg.partition, device_id=device,
                                      password_file=secret_files.get("device"),
                                      tls=pki.tls(device) if pki else None,
                                      signing={"key": str(pki.device_key(device)), "fleet_keys": [str(pki.fleet_pub)]}
                                      if pki else None)
            fleet.spawn(device, "agent", "--config", str(path))
            stop_signals.check()
        # Who to look for if something is left behind (the tests do).
        (workdir / "pids.json").write_text(json.dumps(
            {**({"broker": broker.pid} if broker is not None else {}), **fleet.pids()}, indent=1))
        t = cfg.train
        owners = len({a.owner for a in clients})
        printer(f"started the aggregator and {len(clients)} agents"
                + (f" on the data of {owners} {data.owners}" if owners != len(clients) else "")
                + f" ({t.strategy}, {cfg.partition.regime}, {t.rounds} rounds, seed {t.seed}"
                + (f", fraction {t.fraction}" if t.fraction < 1 else "") + _describe_options(options)
                + f"); logs in {workdir}")
        header = (f"{'round':>5} {'global':>7} {'personal':>9} {'p10':>6} {'reporting':>10} "
                  f"{'bytes in':>9} {'bytes out':>10} {'device down':>12} {'device up':>10}")
        printer(header)
        printer("-" * len(header))
        telemetry: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
        status: dict[int, dict[str, Any]] = {}
        models: dict[int, GlobalModel] = {}  # with has_new_users: the global versions not yet scored
        rows: list[dict[str, Any]] = []
        wire = SocketTally()
        printed = 0
        deadline = time.monotonic() + cfg.timeout_s
        while printed < cfg.train.rounds:
            stop_signals.check()
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
            if msg.topic == topics.model_current:
                model = decode_global(decode_envelope(msg.payload))
                models[model.version] = model
                continue
            doc = json.loads(msg.payload)
            if msg.topic == topics.status:
                status[int(doc["model_version"])] = doc
            else:
                telemetry[int(doc["version"])][doc["device"]] = doc
            while (printed + 1 in status and len(telemetry[printed + 1]) == len(clients)
                   and (not has_new_users or printed + 1 in models)):
                v = printed + 1
                reports, st = telemetry[v], status[v]
                accs = {d: r["personal_acc"] for d, r in sorted(reports.items())}
                glob = [r["global_acc"] for r in reports.values() if r["global_acc"] is not None]
                down, up = wire.round(reports)
                row = {"round": v, "client_acc": accs, **summarize(list(accs.values())),
                       "global_acc": float(np.mean(glob)) if glob else None,
                       "clients_reporting": st["reporting"], "uplink_bytes": st["bytes_in"],
                       "downlink_bytes": st["bytes_out"], "rejected": st["rejected"],
                       "device_socket_bytes_received": down, "device_socket_bytes_sent": up}
                if data.reports_new_users:
                    row["new_user_acc"] = new_user_accuracy(models.pop(v), data) if has_new_users else None
                rows.append(row)
                g = "-" if row["global_acc"] is None else f"{100 * row['global_acc']:.1f}"
                per_device = ("-", "-") if down is None or up is None else (f"{down / len(clients):,.0f}",
                                                                             f"{up / len(clients):,.0f}")
                printer(f"{v:>5} {g:>7} {100 * row['mean_acc']:>9.1f} {100 * row['p10_acc']:>6.1f} "
                        f"{st['reporting']:>4}/{st['selected']:<5} {st['bytes_in']:>9} {st['bytes_out']:>10} "
                        f"{per_device[0]:>12} {per_device[1]:>10}")
                printed = v
                # Every process has read its password and logged in (each reported this round): the files
                # are not needed any more.
                shutil.rmtree(secrets_dir, ignore_errors=True)
        last = rows[-1]
        config = {k: v for k, v in asdict(cfg).items() if k != "password" and k not in DEVICE_OPTION_FIELDS
                  and (cfg.data is not None or k not in DATA_FIELDS)}
        for key in ("data", "backbone"):
            if config.get(key) is not None:
                config[key] = str(config[key])
        result: dict[str, Any] = {
            "config": {**config, "agents": len(clients), "workdir": str(workdir),
                       "security": "mutual TLS, signed" if secure else "plain, unsigned"},
            "rounds": rows,
            "summary": {"mean_acc": last["mean_acc"], "p10_acc": last["p10_acc"], "worst_acc": last["worst_acc"],
                        "global_acc": last["global_acc"],
                        "uplink_bytes_per_client_round": sum(r["uplink_bytes"] for r in rows) / sum(
                            max(1, r["clients_reporting"]) for r in rows),
                        **wire.summary(rows, len(clients))},
        }
        if options is not None:
            result["data_options"] = options
        if data.reports_new_users:
            result["summary"]["new_user_acc"] = last["new_user_acc"]
            result["backbone"] = data.backbone_doc
            result["data"] = data.report
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1, default=float))
        finished = True
        return result
    finally:
        stop_signals.holding()  # from here on a signal cannot interrupt the clean-up
        try:
            fleet.stop()
            if monitor is not None:
                monitor.close()
            if broker is not None:
                broker.stop()
            shutil.rmtree(secrets_dir, ignore_errors=True)
            if finished and owned and not cfg.keep_logs:
                shutil.rmtree(workdir, ignore_errors=True)
            elif not finished:
                try:
                    printer(f"logs kept in {workdir}")
                except OSError:  # the terminal that hung up: nobody to tell
                    pass
        finally:
            stop_signals.restore()


if __name__ == "__main__":
    sys.exit(run_supervised(sys.argv[1:]))
