"""Device footprint: peak RSS and cold start of the REAL `edge-fl agent` process, for each data source.

Per run the benchmark starts a private Mosquitto (`edge_agent.broker.LocalBroker`, users aggregator/device),
the real aggregator (`edge-fl aggregator --config X --exit-when-done`, one expected client, --rounds rounds,
the default strategy) and ONE real agent: the installed entry point `.venv/bin/edge-fl agent --config Y`, as a
device's service manager starts it. The agent's data source is one of the kinds `[data] source` accepts:
- `watch-dataset`: the demo's data, this subject's windows of the bundled recordings (a demo convenience:
  the recordings are one pickle that must be read whole);
- `serial`: an attached microcontroller, here `firmware_bridge`'s emulated MCU on a pty (run in this
  benchmark's process, streaming subject --subject's windows 20x faster than real time), whose windows the
  agent embeds with the backbone and stores, and to which it pushes each new personalized head;
- `embeddings` (a diagnostic, not a `[data] source`): the real AgentService with a FixedSource of this
  subject's embeddings from an .npz, started by a launcher that imports what `edge-fl agent` imports: the
  agent without a TFLite interpreter in its process.

The run ends when the agent has reported its evaluation of the last global version (telemetry), i.e. after
--rounds rounds of training, uploads and evaluations. Then, BEFORE SIGTERM, the benchmark reads the agent's
/proc/<pid>/status (VmHWM = peak RSS of the process, VmRSS) and /proc/<pid>/smaps (resident memory per
mapping: which shared objects, the heap, anonymous mappings). The parent samples VmRSS every 20 ms to show
where in time the peak is (start-up or rounds). Cold start = from just before spawning the agent until its
retained presence `online` reaches the broker (connected, subscribed, data source ready). The backbone
runner probe (a child process, once per model, runtime and machine) is cached across the runs of one
benchmark, so only the first run of a row pays for it; the median does not.

Environments: `.venv` (numpy 2 + ai-edge-litert, what `pip install edge-fl` gives on x86_64/aarch64) and,
with --tflite-runtime, `.venv-device-tflite` (numpy<2 + tflite-runtime, no LiteRT), created on first use.
For comparison the old stand-in (bench/device_worker.py: numpy + backbone + head training on a
pre-extracted .npz, no MQTT, no agent service, no SQLite) runs in `.venv`.

Not a test: goals are reported against, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchlib

NAME = "device_footprint"
GOAL_PEAK_RSS_MB = 50.0
GOAL_COLD_START_S = 2.0
SOURCES = ("serial", "watch-dataset", "embeddings")
DEVICE_SOURCES = ("serial",)  # what a device has; watch-dataset is the demo's; embeddings is a diagnostic
# The `embeddings` row: the real AgentService (real MQTT, store, strategies) with a FixedSource of this subject's
# standardized embeddings read from an .npz: what an agent costs without a TFLite interpreter in its process.
# No `[data] source` gives this today (the agent's sources embed windows themselves), so it is started by this
# launcher instead of `edge-fl agent`; it builds the same command-line parser first, to import what the CLI does.
EMBEDDINGS_LAUNCHER = """\
import signal, sys, threading
import numpy as np
from edge_agent.cli import build_parser
from edge_agent.agent.service import AgentService
from edge_agent.agent.sources import FixedSource
from edge_agent.config import AgentConfig, load_config
from edge_agent.learning.strategies import ClientData
build_parser()
cfg = load_config(sys.argv[1], AgentConfig)
with np.load(sys.argv[2], allow_pickle=False) as f:
    data = ClientData(*(f[k] for k in ("x_train", "y_train", "x_test", "y_test")))
stop = threading.Event()
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
AgentService(cfg, FixedSource(data, "embeddings from " + sys.argv[2])).run(stop)
"""
DEFAULT_VENV = benchlib.REPO_ROOT / ".venv"
# A device environment with tflite-runtime and NO LiteRT (the backbone picks LiteRT whenever it is importable,
# and the `tflite` extra does not remove it on x86_64/aarch64): made by --tflite-runtime on first use.
TFLITE_VENV = benchlib.REPO_ROOT / ".venv-device-tflite"
WORKER = benchlib.BENCH_DIR / "device_worker.py"
SAMPLE_S = 0.02


# ---------------------------------------------------------------- /proc readings of the agent

def proc_status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                out[key] = int(rest.split()[0])
    return out


def mapping_group(path: str) -> str:
    """A readable name for what a mapping holds (grouped so that the table stays short)."""
    if not path:
        return "anonymous (Python objects, numpy arrays, thread stacks)"
    if path.startswith("["):
        return path
    name = os.path.basename(path)
    for key, label in (("numpy.libs", "numpy's OpenBLAS + gfortran (numpy.libs)"),
                       ("/numpy/", "numpy extension modules"),
                       ("ai_edge_litert", "LiteRT (ai_edge_litert)"), ("tflite_runtime", "tflite-runtime"),
                       ("/cryptography/", "cryptography (Ed25519 signatures)"),
                       ("_cffi_backend", "cryptography (Ed25519 signatures)"),
                       ("libpython", "libpython"), ("libcrypto", "OpenSSL libcrypto"), ("libssl", "OpenSSL libssl"),
                       ("sqlite", "SQLite (libsqlite3, _sqlite3)"), ("libstdc++", "libstdc++"),
                       ("lib-dynload", "CPython extension modules (lib-dynload)"),
                       ("/bin/python", "python executable")):
        if key in path:
            return label
    if name.startswith(("libc.so", "libm.so", "ld-linux", "libz.", "liblzma", "libbz2", "libffi", "libgcc",
                        "libexpat")):
        return "libc, libm, zlib, lzma and other system libraries"
    return name


def smaps_by_group(pid: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Resident MiB per mapping group, and the ten largest single mappings, from /proc/<pid>/smaps."""
    groups: dict[str, float] = {}
    single: list[tuple[str, float]] = []
    current = ""
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split(maxsplit=5)
                name = parts[5].strip() if len(parts) > 5 else ""
                current = mapping_group(name)
                label = f"{os.path.basename(name) or 'anonymous'} {parts[1]} {first}"
            elif first == "Rss:":
                mb = int(line.split()[1]) / 1024.0
                groups[current] = groups.get(current, 0.0) + mb
                single.append((label, round(mb, 2)))
    top = sorted(single, key=lambda kv: -kv[1])[:10]
    return dict(sorted(((k, round(v, 2)) for k, v in groups.items() if v >= 0.05), key=lambda kv: -kv[1])), top


class RssSampler:
    """VmRSS of a process every SAMPLE_S seconds, stamped with CLOCK_MONOTONIC."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                st = proc_status_kb(self.pid)
            except OSError:
                return
            self.samples.append((benchlib.monotonic(), st.get("VmRSS", 0) / 1024.0))

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.samples


# ---------------------------------------------------------------- one run of one source

def write_toml(path: Path, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> Path:
    from edge_agent.demo import _toml

    path.write_text(_toml(sections, top))
    return path


def wait_for(link: Any, pred: Any, timeout: float, what: str, procs: dict[str, subprocess.Popen[bytes]],
             logs: Path) -> tuple[Any, float]:
    from edge_agent.transport import Message

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for name, p in procs.items():
            if p.poll() is not None:
                tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with code {p.returncode} while waiting for {what}:\n{tail}")
        try:
            msg = link.inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        now = benchlib.monotonic()
        if isinstance(msg, Message) and msg.payload and pred(msg):
            return msg, now
    raise TimeoutError(f"{what}: nothing within {timeout:g} s; agent log:\n"
                       + (logs / "agent.log").read_text(errors="replace")[-3000:])


def spawn(exe: Path, logs: Path, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(logs / f"{name}.log", "ab") as logf:
        return subprocess.Popen([str(exe), *args], stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=logs)


def run_agent_once(source: str, venv: Path, args: argparse.Namespace, root: Path, run_no: int) -> dict[str, Any]:
    from edge_agent.broker import LocalBroker
    from edge_agent.demo import write_aggregator_config
    from edge_agent.learning.training import TrainingConfig
    from edge_agent.protocol import Topics
    from edge_agent.transport import MqttLink

    work = root / f"{source}-{venv.name}-{run_no}"
    work.mkdir()
    fleet_name, device = f"fp{run_no}", f"device-{run_no}"
    topics = Topics(fleet_name)
    users = {"aggregator": secrets.token_hex(12), "device": secrets.token_hex(12)}
    broker = LocalBroker(work / "broker", users=users).start()
    exe = venv / "bin" / "edge-fl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(root / "cache")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    emu = monitor = None
    try:
        data: dict[str, Any] = {"source": source}
        if source in ("watch-dataset", "embeddings"):
            data = {"source": "watch-dataset", "subject": args.subject, "seed": args.seed}
        else:
            from firmware_bridge.emulator import EmulatedMcu

            emu = EmulatedMcu.on_pty(subject=args.subject, speedup=20)
            data.update(port=emu.port_url, min_windows=args.min_windows)
        sections: dict[str, dict[str, Any]] = {
            "broker": {"host": broker.host, "port": broker.port, "username": "device", "password": users["device"]},
            "data": data}
        if args.backbone_runtime != "auto":
            sections["backbone"] = {"runtime": args.backbone_runtime}
        agent_cfg = write_toml(work / "agent.toml", {"device_id": device, "state_dir": str(work / "state"),
                                                     "fleet": fleet_name}, sections)
        agg_cfg = write_aggregator_config(work, broker.host, broker.port, "aggregator", users["aggregator"],
                                          fleet=fleet_name, clients=1,
                                          train=TrainingConfig(rounds=args.rounds, seed=args.seed), deadline_s=120)
        monitor = MqttLink(f"fp-monitor-{run_no}", broker.host, broker.port, username="aggregator",
                           password=users["aggregator"], clean_start=True)
        monitor.connect(timeout=10)
        for topic in (topics.presence(device), topics.telemetry(device), topics.update(device, 1)):
            monitor.subscribe(topic, qos=1)
        # The aggregator runs from the main environment whatever the agent's: only the agent is measured.
        procs["aggregator"] = spawn(DEFAULT_VENV / "bin" / "edge-fl", work, "aggregator", "aggregator",
                                    "--config", str(agg_cfg), "--exit-when-done", env=env)
        t_spawn = benchlib.monotonic()
        if source == "embeddings":
            agent = procs["agent"] = spawn(venv / "bin" / "python", work, "agent", "-c", EMBEDDINGS_LAUNCHER,
                                           str(agent_cfg), str(embeddings_file(root, args)), env=env)
        else:
            agent = procs["agent"] = spawn(exe, work, "agent", "agent", "--config", str(agent_cfg), env=env)
        sampler = RssSampler(agent.pid)
        _, t_online = wait_for(monitor, lambda m: m.topic == topics.presence(device) and m.payload == b"online",
                               120, "the agent's presence", procs, work)
        hwm_online = proc_status_kb(agent.pid)["VmHWM"] / 1024.0
        _, t_update = wait_for(monitor, lambda m: m.topic == topics.update(device, 1), 120, "the first update",
                               procs, work)
        _, t_done = wait_for(monitor, lambda m: m.topic == topics.telemetry(device)
                             and json.loads(m.payload)["version"] >= args.rounds,
                             60 + 10 * args.rounds, f"telemetry of version {args.rounds}", procs, work)
        status = proc_status_kb(agent.pid)  # before SIGTERM: the process as it ran its rounds
        groups, largest = smaps_by_group(agent.pid)
        samples = sampler.stop()
        agent.send_signal(signal.SIGTERM)
        _, wstatus, usage = os.wait4(agent.pid, 0)
        agent.returncode = os.waitstatus_to_exitcode(wstatus)
        peak_t = max(samples, key=lambda s: s[1])[0] if samples else t_spawn
        log = (work / "agent.log").read_text(errors="replace")
        return {
            "source": source, "env": venv.name, "run": run_no, "rounds": args.rounds,
            "peak_rss_mb": round(status["VmHWM"] / 1024.0, 2), "rss_at_end_mb": round(status["VmRSS"] / 1024.0, 2),
            "peak_rss_when_online_mb": round(hwm_online, 2),
            # getrusage's ru_maxrss of the child is NOT its own peak: Linux carries the high-water mark across
            # fork+exec, so it is at least this benchmark's own RSS at spawn time. Kept to show that; VmHWM is the peak.
            "ru_maxrss_mb_includes_parent": round(usage.ru_maxrss / 1024.0, 2),
            "cold_start_online_s": t_online - t_spawn, "first_update_s": t_update - t_spawn,
            "until_last_telemetry_s": t_done - t_spawn, "peak_sampled_at_s": peak_t - t_spawn,
            "rss_timeline": [(round(t - t_spawn, 3), round(r, 2)) for t, r in samples[::5]],
            "smaps_mb": groups, "largest_mappings_mb": largest, "exit_code": agent.returncode,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "agent_log_tail": log.splitlines()[-5:],
        }
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if monitor is not None:
            monitor.close()
        if emu is not None:
            emu.stop()
        broker.stop()


def embeddings_file(root: Path, args: argparse.Namespace) -> Path:
    """This subject's ClientData as the watch-dataset source computes it, saved once per benchmark."""
    path = root / f"subject-{args.subject}-embeddings.npz"
    if not path.exists():
        import numpy as np

        from edge_agent.agent.sources import subject_recordings, watch_client_data
        from edge_agent.backbone import DEFAULT_MODEL, FrozenBackbone
        from edge_agent.data.partition import PartitionConfig
        from edge_agent.data.watch import load_watch_dataset

        data = watch_client_data(subject_recordings(load_watch_dataset(), args.subject), FrozenBackbone(DEFAULT_MODEL),
                                 args.subject, PartitionConfig(seed=args.seed))
        np.savez(path, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test)
    return path


# ---------------------------------------------------------------- the stand-in, for comparison

def prepare_worker_inputs(tmp: Path, subject: int, seed: int) -> None:
    import numpy as np

    from edge_agent.backbone import DEFAULT_MODEL, FrozenBackbone
    from edge_agent.data.federated import embed_dataset
    from edge_agent.data.watch import load_watch_dataset
    from edge_agent.learning.head import HeadConfig, init_params
    from edge_agent.state_io import save_head_state

    dataset = load_watch_dataset()
    backbone = FrozenBackbone(DEFAULT_MODEL)
    embedded = embed_dataset(dataset, backbone)
    train, test = embedded.train, embedded.test
    tr, te = train.subject == subject, test.subject == subject
    np.savez(tmp / "user.npz", x_train=train.x[tr], y_train=train.y[tr], x_test=test.x[te], y_test=test.y[te])
    np.save(tmp / "window.npy", test.x[te][:1])
    params = init_params(HeadConfig(backbone.embedding_dim, dataset.num_classes), np.random.default_rng(seed))
    save_head_state(tmp / "head.npz", {**params, "embedding.mean": embedded.standardizer.mean,
                                       "embedding.std": embedded.standardizer.std}, {"note": "benchmark"})


def run_worker_once(venv: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from edge_agent.backbone import DEFAULT_MODEL

    cmd = [str(venv / "bin" / "python"), str(WORKER), str(DEFAULT_MODEL), str(tmp / "head.npz"),
           str(tmp / "window.npy"), "npz", str(tmp / "user.npz"), "20", str(args.seed)]
    res = benchlib.run_json_subprocess(cmd, env=benchlib.worker_env())
    return {"peak_rss_mb": res["peak_rss_mb"],
            "cold_start_s": res["stamps"]["first_prediction"] - res["parent_view"]["spawn_monotonic"]}


# ---------------------------------------------------------------- output

def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("peak_rss_mb", "peak_rss_when_online_mb", "rss_at_end_mb", "cold_start_online_s", "first_update_s",
            "until_last_telemetry_s", "peak_sampled_at_s", "cpu_s")
    groups = sorted({g for r in runs for g in r["smaps_mb"]})
    smaps = {g: statistics.median(r["smaps_mb"].get(g, 0.0) for r in runs) for g in groups}
    return {**{k: benchlib.summarize([r[k] for r in runs]) for k in keys},
            "smaps_mb": dict(sorted(smaps.items(), key=lambda kv: -kv[1])), "runs": runs}


def render(results: dict[str, dict[str, Any]], worker: dict[str, Any] | None, args: argparse.Namespace,
           env: dict[str, Any]) -> str:
    def mm(s: dict[str, Any], fmt: str = "{:.1f}") -> str:
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

    rows = []
    for key, s in results.items():
        source = key.split(" / ")[1]
        rows.append([("**" + key + "** (device)") if source in DEVICE_SOURCES else key,
                     mm(s["peak_rss_mb"]), f"{s['peak_rss_when_online_mb']['median']:.1f}",
                     f"{s['rss_at_end_mb']['median']:.1f}", mm(s["cold_start_online_s"], "{:.2f}"),
                     f"{s['first_update_s']['median']:.2f}", f"{s['until_last_telemetry_s']['median']:.1f}",
                     f"{s['peak_sampled_at_s']['median']:.2f}",
                     "met" if s["peak_rss_mb"]["max"] <= GOAL_PEAK_RSS_MB else "NOT met"])
    table = benchlib.md_table(
        ["env / data source", "peak RSS MiB median (min-max)", "peak when online", "RSS at end",
         "cold start to online s", "first update s", f"{args.rounds} rounds done s", "peak sampled at s",
         f"<= {GOAL_PEAK_RSS_MB:.0f} MiB"], rows)
    groups = sorted({g for s in results.values() for g in s["smaps_mb"]},
                    key=lambda g: -max(s["smaps_mb"].get(g, 0.0) for s in results.values()))
    smaps_table = benchlib.md_table(
        ["resident memory by mapping (MiB, median)", *results],
        [[g, *(f"{s['smaps_mb'].get(g, 0.0):.1f}" for s in results.values())] for g in groups[:14]]
        + [["total (VmRSS at end)", *(f"{s['rss_at_end_mb']['median']:.1f}" for s in results.values())]])
    ratios = []
    keys = list(results)
    dev = next((k for k in keys if k.split(" / ")[1] in DEVICE_SOURCES), None)
    if dev is not None:
        for k in keys:
            if k != dev:
                ratios.append(f"`{k}` / `{dev}` peak RSS: "
                              f"{results[k]['peak_rss_mb']['median'] / results[dev]['peak_rss_mb']['median']:.2f}x")
        if worker:
            ratios.append(f"real agent `{dev}` / stand-in worker (no MQTT, no service, no SQLite) peak RSS: "
                          f"{results[dev]['peak_rss_mb']['median'] / worker['peak_rss_mb']['median']:.2f}x "
                          f"({results[dev]['peak_rss_mb']['median']:.1f} / {worker['peak_rss_mb']['median']:.1f} MiB)")
    return (
        f"# Device footprint: the real `edge-fl agent` process\n\n"
        f"One real agent (`<venv>/bin/edge-fl agent --config ...`), the real aggregator and a private "
        f"Mosquitto; {args.rounds} rounds of the default strategy; {args.repeats} fresh runs per row. Peak RSS = "
        f"the agent's VmHWM read from /proc before SIGTERM (MiB), after it reported its evaluation of the last "
        f"global version; 'peak when online' = VmHWM when its presence reached the broker (start-up done). "
        f"Cold start = from spawning the agent to its presence `online` at the broker. `serial` = an emulated "
        f"MCU on a pty streaming subject {args.subject}'s windows (what a device has); `watch-dataset` = the "
        f"demo's bundled recordings, subject {args.subject}; `embeddings` = the same agent service with this "
        f"subject's embeddings handed over (no interpreter in the process; not a configurable source). "
        f"The serial source embeds each window once, on arrival, and keeps only its int8 codes (at most "
        f"`[data] max_windows`). "
        f"`.venv` = numpy 2 + ai-edge-litert; `.venv-device-tflite` = numpy<2 + tflite-runtime, no LiteRT. "
        f"\n\n{table}\n\n"
        + ("".join(f"- {r}\n" for r in ratios) + "\n" if ratios else "")
        + (f"Stand-in `bench/device_worker.py` (numpy + backbone + 20 epochs on a pre-extracted .npz, no MQTT, no "
           f"agent service, no SQLite): peak {mm(worker['peak_rss_mb'])} MiB, cold start to first prediction "
           f"{worker['cold_start_s']['median']:.2f} s.\n\n" if worker else "")
        + f"Where the resident memory is at the end (from /proc/<pid>/smaps; shared libraries count fully):\n\n"
        f"{smaps_table}\n\n" + benchlib.env_summary_md(env) + "\n"
    )


def tflite_requirements() -> list[str]:
    """What a tflite-runtime device installs: edge-fl's dependencies (pyproject.toml) without LiteRT, plus the
    `tflite` extra (tflite-runtime, numpy<2). Read from pyproject.toml, so that a new dependency is measured."""
    import tomllib

    project = tomllib.loads((benchlib.REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = [d for d in project["dependencies"] if not d.replace("_", "-").startswith("ai-edge-litert")]
    return [*deps, *project["optional-dependencies"]["tflite"]]


def ensure_tflite_venv(path: Path) -> Path:
    """A venv holding only what a tflite-runtime device installs, plus this checkout (editable, no deps)."""
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    requirements = tflite_requirements()
    if not (path / "bin" / "edge-fl").exists():
        print(f"creating {path}: {', '.join(requirements)} and edge-fl (editable, no deps)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([*pip, "--no-deps", "-e", str(benchlib.REPO_ROOT)], check=True)
    subprocess.run([*pip, *requirements], check=True)  # also on an existing venv: dependencies change
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--venv", action="append", type=Path, default=None,
                   help="environment(s) whose installed edge-fl runs the agent (default: .venv)")
    p.add_argument("--tflite-runtime", action="store_true",
                   help=f"also measure a device venv with tflite-runtime instead of LiteRT ({TFLITE_VENV.name}, "
                        "created on first use; tflite-runtime has wheels for Python <= 3.11)")
    p.add_argument("--source", action="append", choices=SOURCES, default=None,
                   help=f"data source kinds to measure (default: {', '.join(SOURCES)})")
    p.add_argument("--backbone-runtime", choices=("auto", "litert", "tflite-runtime"), default="auto",
                   help="the agents' [backbone] runtime (auto: LiteRT where installed, else tflite-runtime)")
    p.add_argument("--subject", type=int, default=4, help="whose windows the device holds")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds per run")
    p.add_argument("--repeats", type=int, default=3, help="fresh runs per environment and source")
    p.add_argument("--min-windows", type=int, default=40, help="serial: windows the agent waits for before training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-worker", action="store_true", help="skip the stand-in worker comparison")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="work in DIR and keep it (configs, agent and aggregator logs); default: a temporary directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    venvs = [v.absolute() for v in args.venv or [DEFAULT_VENV]]
    if args.tflite_runtime:
        venvs.append(ensure_tflite_venv(TFLITE_VENV))
    for v in venvs:
        if not (v / "bin" / "edge-fl").exists():
            print(f"device_footprint: {v}/bin/edge-fl not found; run scripts/setup or pass --venv", file=sys.stderr)
            return 1
    sources = args.source or list(SOURCES)
    benchlib.warn_openblas_env()
    env = benchlib.environment()
    raw: dict[str, list[dict[str, Any]]] = {f"{v.name} / {s}": [] for v in venvs for s in sources}
    worker: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="edgefl-footprint-") as tmp_dir:
        root = Path(tmp_dir) if args.keep is None else args.keep
        root.mkdir(parents=True, exist_ok=True)
        n = 0
        for r in range(args.repeats):
            for v in venvs:  # interleaved, so a noisy moment does not hit only one row
                for s in sources:
                    n += 1
                    res = run_agent_once(s, v, args, root, n)
                    raw[f"{v.name} / {s}"].append(res)
                    print(f"  run {r + 1}/{args.repeats} {v.name:12s} {s:14s} peak {res['peak_rss_mb']:6.1f} MiB "
                          f"(online {res['peak_rss_when_online_mb']:.1f}) cold start "
                          f"{res['cold_start_online_s']:.2f} s", file=sys.stderr)
        if not args.no_worker:
            (root / "worker").mkdir()
            prepare_worker_inputs(root / "worker", args.subject, args.seed)
            wruns = [run_worker_once(venvs[0], root / "worker", args) for _ in range(args.repeats)]
            worker = {k: benchlib.summarize([w[k] for w in wruns]) for k in ("peak_rss_mb", "cold_start_s")}
    results = {k: summarize_runs(v) for k, v in raw.items()}
    markdown = render(results, worker, args, env)
    doc = {"benchmark": NAME, "description": __doc__, "environment": env,
           "config": {**vars(args), "venv": [str(v) for v in venvs]},
           "interpreters": {v.name: benchlib.interpreter_packages(v / "bin" / "python") for v in venvs},
           "goals": {"peak_rss_mb_at_most": GOAL_PEAK_RSS_MB}, "results": results, "stand_in_worker": worker}
    paths = benchlib.write_results(NAME, doc, markdown)
    print(markdown)
    print(f"results: {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
