"""What bench/tune.py and bench/strategies.py share: the two datasets, their backbones, and one run of the
protocol (edge_agent/evaluation/protocol.py) through the real services (`run_simulation`).

Both datasets are read in the per-user format (docs/data-format.md), imported once into the cache directory:
- "watch": the bundled smartwatch recordings (10 subjects: 3 build the backbone, 6 federate, 1 is the new
  user), with the bundled backbone;
- "hapt": UCI HAPT (30 users: 15 build the backbone, 10 federate, 5 are new users), with
  models/backbone_hapt_int8.tflite, which was trained on the 15 pretrain users only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.backbone import DEFAULT_MODEL, EmbeddingCache, FrozenBackbone
from edge_agent.data.federated import default_cache_dir
from edge_agent.data.from_userdata import UserFeatures, prepare_users, user_number
from edge_agent.data.importers import import_hapt, import_watch
from edge_agent.data.partition import PartitionConfig
from edge_agent.data.userdata import UserDataset, load_user_dataset
from edge_agent.evaluation.protocol import DeviceOptions, PhaseData, Protocol, federate_phase
from edge_agent.fsutil import file_sha256
from edge_agent.learning.training import TrainingConfig
from edge_agent.sim import run_simulation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ("watch", "hapt")
BACKBONES: dict[str, Path | None] = {"watch": None, "hapt": ROOT / "models" / "backbone_hapt_int8.tflite"}
IMPORTERS: dict[str, Callable[[Path], Any]] = {"watch": import_watch, "hapt": import_hapt}
# Seeds: settings are chosen on TUNING_SEEDS (validation phase: the first two screen, the rest choose; bench/tune.py);
# the report reads TEST_SEEDS (test phase).
TUNING_SEEDS = (100, 101, 102, 103, 104)
TEST_SEEDS = tuple(range(10))
# How each dataset is cut (edge_agent/evaluation/protocol.py), so that no window the tuning reads (train or
# validation, at any seed) is ever a test window. HAPT: each user's first session trains and validates (its last
# bout of each activity), the second session tests: adaptation over time, the same test windows for every seed (a
# seed-chosen session would put windows tuning read into some seed's test set: with two sessions there is no
# third to validate on). Watch: one recording per exercise in each part at most, so test is the later 30 % of
# every recording (the same windows for every seed) and validation the later quarter of the rest.
PROTOCOLS: dict[str, Protocol] = {"watch": Protocol(test_by="segment", validation_by="segment"),
                                  "hapt": Protocol(test_by="next-session", validation_by="run")}
REGIME_SETTINGS: dict[str, PartitionConfig] = {
    "natural": PartitionConfig(regime="natural"),
    "few-shot": PartitionConfig(regime="few-shot", shots=5),
    "label-skew": PartitionConfig(regime="label-skew"),
    "dirichlet": PartitionConfig(regime="dirichlet"),
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BenchData:
    name: str
    prepared: UserFeatures
    backbone: FrozenBackbone
    embed: Callable[[np.ndarray], np.ndarray]
    protocol: Protocol


def data_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge-fl" / "datasets" / name


def dataset_names(text: str) -> list[str]:
    """--data: "watch", "hapt", "both", or a per-user dataset directory (docs/data-format.md)."""
    if text == "both":
        return list(DATASETS)
    if text in DATASETS or (Path(text) / "dataset.json").exists():
        return [text]
    raise SystemExit(f"--data {text}: neither {', '.join(DATASETS)}, both, nor a directory with a dataset.json "
                     "(write one with `edge-fl data import`)")


def label(name: str) -> str:
    """What the results call a dataset: its short name, or its directory's name."""
    return name if name in DATASETS else Path(name).resolve().name


def auto_protocol(dataset: UserDataset) -> Protocol:
    """For a dataset of one's own: the first session trains (its last bouts validate) and the next one tests where
    every federated user allows it, else the later part of every run for both."""
    from edge_agent.evaluation.protocol import user_parts

    preferred = Protocol(test_by="next-session", validation_by="run")
    try:
        for uid in dataset.card.roles.federate:
            user_parts(dataset.users[uid], dataset.card, preferred, 0, user_number(dataset.card, uid))
    except ValueError:
        return Protocol(test_by="segment", validation_by="segment")
    return preferred


def ensure_imported(name: str) -> Path:
    """The cached import of a bundled dataset, made on first use. Called by the parent before any worker
    starts: two workers importing at once would race for the same directory."""
    directory = data_dir(name)
    if not (directory / "dataset.json").exists():
        log(f"importing {name} into {directory}")
        IMPORTERS[name](directory)
    return directory


def load(name: str, backbone_path: Path | None = None) -> BenchData:
    """The dataset (imported on first use; or a dataset directory), embedded by its backbone through the
    embedding cache. `backbone_path`: the model for a dataset directory (default: the bundled one)."""
    if name in DATASETS:
        directory = ensure_imported(name)
        model = BACKBONES[name]
    else:
        directory, model = Path(name), backbone_path
    dataset = load_user_dataset(directory)
    backbone = FrozenBackbone(model) if model else FrozenBackbone()
    cache = EmbeddingCache(default_cache_dir())

    def embed(x: np.ndarray) -> np.ndarray:
        return cache.embed(backbone, x)

    # As a device of this dataset standardizes: the pretrain users' statistics, else the backbone's sidecar.
    prepared = prepare_users(dataset, embed=embed, rule="segment",
                             sidecar_standardizer=backbone.embedding_standardizer())
    protocol = PROTOCOLS[name] if name in DATASETS else auto_protocol(dataset)
    return BenchData(label(name), prepared, backbone, embed, protocol)


def run(bench: BenchData, phase: str, partition: PartitionConfig, config: TrainingConfig,
        options: DeviceOptions | None = None, protocol: Protocol | None = None) -> dict[str, Any]:
    """One simulated federation: per-user accuracy on the phase's scored windows, the new users' accuracy
    (test phase), and the uplink. In the validation phase, "new_user_proxy" is the accuracy of the head the
    strategy would give a new user (None if it gives none) on the protocol's stand-in for new users: every
    federated user's whole validation part, standardized with the population's statistics."""
    phase_data: PhaseData = federate_phase(bench.prepared, protocol or bench.protocol, phase, partition,
                                           options or DeviceOptions(), embed=bench.embed)
    doc = run_simulation(phase_data.federated, replace(config, seed=partition.seed))
    last = doc["rounds"][-1]
    return {"users": {u: float(a) for u, a in last["client_acc"].items()},
            "mean": float(last["mean_acc"]),
            "new_user": last["new_user_acc"] if phase == "test" else None,
            **({"new_user_proxy": last["new_user_acc"]} if phase == "validation" else {}),
            "uplink": doc["summary"]["uplink_bytes_per_client_round"],
            "train_windows": {u: int(i.size) for u, i in phase_data.train_index.items()}}


# --- jobs: one simulated federation each, run in worker processes, recorded as they finish --------------------
# A job is a JSON-able dict: dataset-independent fields "strategy", "settings" (TrainingConfig fields), "options"
# (DeviceOptions fields; "augment": "default" for AugmentConfig()), "regime", "seed", "phase", and optionally
# "shots" (few-shot) and "protocol" (Protocol fields, when not the dataset's own).

JOB_KEYS = ("phase", "strategy", "settings", "options", "regime", "seed", "shots", "protocol")


def job_key(job: dict[str, Any]) -> str:
    return json.dumps({k: job.get(k) for k in JOB_KEYS}, sort_keys=True)


def complete(record: dict[str, Any]) -> bool:
    """Does a recorded run carry everything a run records now? (A validation run from before the new-user head
    was scored does not: it runs again.)"""
    return record["phase"] != "validation" or "new_user_proxy" in record


def untuned_settings() -> dict[str, Any]:
    """The TrainingConfig fields a job does not name: its key leaves them out, so a record is only valid for
    the values it was run with (checked against the log's sidecar)."""
    named = {"strategy", "seed"}  # a job's own; its "settings" are compared by the key itself
    return {k: v for k, v in asdict(TrainingConfig()).items() if k not in named}


def model_path(name: str, backbone_path: Path | None) -> Path:
    """The backbone that embeds a dataset's windows: the dataset's own, the one given, else the bundled one."""
    return BACKBONES.get(name) or backbone_path or DEFAULT_MODEL


def check_log_base(log_path: Path, model: Path) -> None:
    """Refuse a log whose runs used other untuned settings than the code's (a default changed since) or another
    backbone: every record in it would be reused as if run now. The sidecar <log>.base.json records them on
    first use."""
    sidecar = log_path.with_suffix(".base.json")
    now = {**untuned_settings(), "backbone_sha256": file_sha256(model)}
    if not sidecar.exists():
        sidecar.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        return
    then = json.loads(sidecar.read_text())
    changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    if changed:
        raise SystemExit(f"{log_path}: its runs used other settings or another backbone than now ("
                         + ", ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in changed)
                         + f"); move {log_path.name} and {sidecar.name} away to run them again")


def device_options(spec: dict[str, Any]) -> DeviceOptions:
    opts: dict[str, Any] = dict(spec)
    if opts.get("augment") == "default":
        from edge_agent.data.augment import AugmentConfig

        opts["augment"] = AugmentConfig()
    return DeviceOptions(**opts)


_BENCH: BenchData | None = None


def _init_worker(name: str, backbone_path: Path | None) -> None:
    import logging

    logging.disable(logging.WARNING)  # the services' INFO lines, thousands per run
    global _BENCH
    _BENCH = load(name, backbone_path)


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    assert _BENCH is not None
    t0 = time.perf_counter()
    partition = replace(REGIME_SETTINGS[job["regime"]], seed=job["seed"])
    if job.get("shots") is not None:
        partition = replace(partition, shots=job["shots"])
    protocol = Protocol(**job["protocol"]) if job.get("protocol") else None
    config = replace(TrainingConfig(strategy=job["strategy"]), **job["settings"])
    result = run(_BENCH, job["phase"], partition, config, device_options(job["options"]), protocol)
    return {**job, **result, "seconds": time.perf_counter() - t0}


def run_jobs(name: str, jobs: list[dict[str, Any]], log_path: Path, n_jobs: int,
             backbone_path: Path | None = None) -> list[dict[str, Any]]:
    """Every job's result, running only those not yet in `log_path` (JSON lines, appended as they finish: an
    interrupted run loses nothing and a rerun continues)."""
    check_log_base(log_path, model_path(name, backbone_path))
    done: dict[str, dict[str, Any]] = {}
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            if complete(rec):
                done[job_key(rec)] = rec
    todo = [j for j in jobs if job_key(j) not in done]
    log(f"{name}: {len(jobs)} runs, {len(jobs) - len(todo)} already recorded in {log_path.name}")
    if todo:
        if name in DATASETS:
            ensure_imported(name)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(n_jobs, initializer=_init_worker, initargs=(name, backbone_path)) as pool, \
                log_path.open("a") as out:
            for i, rec in enumerate(pool.map(_run_job, todo), 1):
                out.write(json.dumps(rec) + "\n")
                out.flush()
                done[job_key(rec)] = rec
                if i % 20 == 0 or i == len(todo):
                    left = (time.perf_counter() - t0) / i * (len(todo) - i)
                    log(f"  {name}: {i}/{len(todo)} ({left / 60:.0f} min left)")
    return [done[job_key(j)] for j in jobs]
