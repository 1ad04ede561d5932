"""What augmenting a device's few labelled windows costs on the device: K labelled windows per class, C copies of
each (edge_agent/data/augment.py, default settings but for the copies), the copies embedded through the REAL
int8 backbone (FrozenBackbone, the bundled watch backbone and the HAPT one), then one round of the default
strategy's training on the originals plus the copies. Writes bench/results/augment_cost.{json,md}.

    .venv/bin/python bench/augment_cost.py          # about a minute on 2 cores

Every (backbone, K, C) runs in its own fresh subprocess, so its peak RSS (VmHWM) is its own. Times are medians
of `--repeats` runs after one untimed warm-up (which is timed on its own: the first embed at a new number of
windows re-allocates the interpreter's tensors); memory comes from one more run under tracemalloc (numpy's
buffers; the interpreter's own arena is not seen by tracemalloc, only by the RSS). Other processes share the
cores: the ratios to one round of training, taken in the same process moments apart, are the numbers to keep.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib

NAME = "augment_cost"
SHOTS = (1, 2, 5)
COPIES = (0, 2, 4, 8)
MODELS = benchlib.REPO_ROOT / "models"
BACKBONES: dict[str, str] = {  # name -> model file; the data each is built for comes from `labelled_pool`
    "watch": "backbone_int8.tflite",
    "hapt": "backbone_hapt_int8.tflite",
}
WATCH_USER = 4  # a federated client subject of the bundled recordings (edge_agent/data/partition.py)
HAPT_USER = 16  # the first federated HAPT user (edge_agent/data/importers.py HAPT_ROLES)


# ---------------------------------------------------------------- parent: data

def labelled_pool(name: str) -> tuple[Any, Any, tuple[str, ...], int, str]:
    """One federated user's windows of the backbone's dataset: (x, y, channel names, classes, who)."""
    if name == "watch":
        from edge_agent.data.watch import load_watch_dataset
        from edge_agent.data.windows import split_and_window

        dataset = load_watch_dataset()
        train, _ = split_and_window(dataset)
        mine = train.subject == WATCH_USER
        return (train.x[mine], train.y[mine], dataset.channel_names, dataset.num_classes,
                f"watch subject {WATCH_USER}, training windows")
    from edge_agent.data.hapt import HAPT_CHANNELS, HAPT_CLASSES, load_hapt, window_hapt

    user = window_hapt(load_hapt())[HAPT_USER]
    return user.x, user.y, HAPT_CHANNELS, len(HAPT_CLASSES), f"HAPT user {HAPT_USER}, all windows"


def write_labelled(path: Path, name: str, shots: int, seed: int) -> dict[str, Any]:
    """K windows of every class the user has, drawn with `seed`, as the worker's input file."""
    import numpy as np

    x, y, channels, num_classes, who = labelled_pool(name)
    rng = np.random.default_rng([seed, shots])
    pick = np.concatenate([rng.choice(np.flatnonzero(y == c), min(shots, int(np.sum(y == c))), replace=False)
                           for c in range(num_classes) if np.any(y == c)])
    np.savez(path, x=x[pick], y=y[pick], channels=np.array(channels), num_classes=np.array(num_classes))
    return {"user": who, "labelled_windows": int(pick.size), "window_shape": list(x.shape[1:])}


# ---------------------------------------------------------------- worker (one per backbone, K, C)

def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _traced_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Peak bytes numpy (and Python) allocated during fn, above what was allocated before it."""
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    result = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - before, result


def run_worker(model: str, data_file: str, copies: int, repeats: int, seed: int) -> None:
    import numpy as np

    from edge_agent.backbone import FrozenBackbone
    from edge_agent.data.augment import AugmentConfig, augment_windows, channel_groups_from_names
    from edge_agent.learning.head import HeadConfig
    from edge_agent.learning.strategies import ClientData, make_strategy
    from edge_agent.learning.training import TrainingConfig

    rss_start = benchlib.rss_mb()
    backbone = FrozenBackbone(MODELS / model)
    standardize = backbone.embedding_standardizer()
    assert standardize is not None, f"{model}: the sidecar has no embedding statistics"
    with np.load(data_file) as npz:
        x, y = npz["x"], npz["y"]
        channels, num_classes = tuple(str(c) for c in npz["channels"]), int(npz["num_classes"])
    groups = channel_groups_from_names(channels)
    config = AugmentConfig(copies=copies)
    training = TrainingConfig()
    strategy = make_strategy(training.strategy, HeadConfig(backbone.embedding_dim, num_classes, training.adapter_dim),
                             training.strategy_config())
    server = strategy.init_server(np.random.default_rng(seed))
    client = strategy.init_client(np.random.default_rng(seed))
    originals = standardize(backbone.embed(x))
    empty = np.zeros((0, backbone.embedding_dim), np.float32)

    def augment(r: int) -> tuple[Any, Any]:
        return augment_windows(x, y, config, np.random.default_rng([seed, r]), groups)

    def embed(x_aug: Any) -> Any:
        return standardize(backbone.embed(x_aug)) if len(x_aug) else empty

    def train_round(emb: Any, labels: Any, r: int) -> Any:
        data = ClientData(np.concatenate([originals, emb]), np.concatenate([y, labels]), empty, y[:0])
        return strategy.client_round(server, client, data, np.random.default_rng([seed, r, 1]))

    rss_ready = benchlib.rss_mb()
    first_augment_s, (x_aug, y_aug) = _timed(lambda: augment(0))
    first_embed_s, emb = _timed(lambda: embed(x_aug))
    train_round(emb, y_aug, 0)
    train_round(empty, y[:0], 0)
    times: dict[str, list[float]] = {"augment_s": [], "embed_s": [], "round_originals_s": [], "round_with_copies_s": []}
    for r in range(1, repeats + 1):
        stamps = [time.perf_counter()]
        x_aug, y_aug = augment(r)
        stamps.append(time.perf_counter())
        emb = embed(x_aug)
        stamps.append(time.perf_counter())
        train_round(empty, y[:0], r)
        stamps.append(time.perf_counter())
        train_round(emb, y_aug, r)
        stamps.append(time.perf_counter())
        for key, start, end in zip(times, stamps, stamps[1:], strict=False):
            times[key].append(end - start)
    peak_augment, (x_aug, y_aug) = _traced_peak(lambda: augment(repeats + 1))
    peak_embed, emb = _traced_peak(lambda: embed(x_aug))
    peak_round, _ = _traced_peak(lambda: train_round(emb, y_aug, repeats + 1))
    benchlib.emit_worker_result({
        "copies": copies, "labelled": len(y), "new_windows": len(y_aug),
        "copies_bytes": int(x_aug.nbytes), "copies_embedding_bytes": int(emb.nbytes),
        "first_augment_s": first_augment_s, "first_embed_s": first_embed_s,
        "times": {k: benchlib.summarize(v) for k, v in times.items()},
        "tracemalloc_peak_bytes": {"augment": peak_augment, "embed": peak_embed, "round_with_copies": peak_round},
        "rss_start_mb": rss_start, "rss_ready_mb": rss_ready, "rss_end_mb": benchlib.rss_mb(),
        "peak_rss_mb": benchlib.peak_rss_mb(), "backbone_batch_size": backbone.batch_size,
        "runtime": f"{backbone.runtime} {backbone.runtime_version}", "strategy": training.strategy,
        "local_epochs": training.local_epochs, "batch_size": training.batch_size,
    })


# ---------------------------------------------------------------- parent: runs and report

def _med(run: dict[str, Any], key: str) -> float:
    return float(run["times"][key]["median"])


def derived(run: dict[str, Any]) -> dict[str, float]:
    """The ratios that survive a busy machine: all four times come from one process, moments apart."""
    added = _med(run, "augment_s") + _med(run, "embed_s")
    base = _med(run, "round_originals_s")
    return {
        "augment_plus_embed_s": added,
        "augment_plus_embed_vs_round_originals": added / base,
        "round_with_copies_vs_round_originals": _med(run, "round_with_copies_s") / base,
        "peak_rss_above_ready_mb": run["peak_rss_mb"] - run["rss_ready_mb"],
    }


def render(results: dict[str, list[dict[str, Any]]], meta: dict[str, Any], env: dict[str, Any]) -> str:
    rows = []
    for name, runs in results.items():
        for run in runs:
            d = run["derived"]
            kib = {k: v / 1024 for k, v in run["tracemalloc_peak_bytes"].items()}
            rows.append([
                name, run["shots"], run["copies"], f"{run['labelled']} + {run['new_windows']}",
                f"{1e3 * _med(run, 'augment_s'):.2f}", f"{1e3 * _med(run, 'embed_s'):.2f}",
                f"{1e3 * run['first_embed_s']:.2f}",
                f"{1e3 * _med(run, 'round_originals_s'):.2f}", f"{1e3 * _med(run, 'round_with_copies_s'):.2f}",
                f"**{d['augment_plus_embed_vs_round_originals']:.2f}x**",
                f"{d['round_with_copies_vs_round_originals']:.2f}x",
                f"{kib['augment']:.0f} / {kib['embed']:.0f} / {kib['round_with_copies']:.0f}",
                f"{run['peak_rss_mb']:.1f} ({d['peak_rss_above_ready_mb']:+.1f})",
            ])
    table = benchlib.md_table(
        ["backbone", "K", "C", "windows (labelled + new)", "augment ms", "embed copies ms", "1st embed ms",
         "round, originals ms", "round, with copies ms", "augment+embed vs round", "round with copies vs without",
         "tracemalloc peak KiB: augment / embed / round", "peak RSS MiB (above ready)"], rows)
    largest = max((run for runs in results.values() for run in runs), key=lambda run: run["new_windows"])
    users = "; ".join(m["user"] for m in meta["data"].values())
    aug = meta["augment"]
    return (
        f"# Augmenting few labelled windows on the device\n\n{headline(results, largest)}\n\n"
        f"K labelled windows per class of one federated user ({users}), C copies of each "
        f"(`edge_agent/data/augment.py`, AugmentConfig defaults but for `copies`: shift <= "
        f"{aug['max_shift_fraction']:.0%} of the window, scale {aug['scale_range']}, rotation <= "
        f"{aug['max_rotation_deg']:g} deg), the copies embedded by the real int8 backbone (`FrozenBackbone`, 1 thread, "
        f"{meta['runtime']}) and standardized with the sidecar's statistics. 'round' = one round of the default "
        f"strategy on the device (`{meta['strategy']}`, {meta['local_epochs']} local epoch, batch "
        f"{meta['batch_size']}: the shared head and the personal head are both trained) on the originals alone, or on "
        f"the originals plus the copies. Times are medians of {meta['repeats']} repeats after an untimed warm-up; "
        f"'1st embed' is the warm-up's embed, which re-allocates the interpreter for a new number of windows "
        f"(padded to batch {meta['backbone_batch_size']} above it). Augmenting and embedding are needed once, when "
        f"labelled windows arrive (the copies' embeddings can be kept like the originals'); the round with copies "
        f"is paid every round. Memory: tracemalloc's peak of numpy's buffers during each step, and the worker's peak "
        f"RSS (VmHWM; in brackets: above its RSS once the backbone was loaded and the originals embedded). Every "
        f"(backbone, K, C) is a fresh subprocess.\n\n{table}\n\n{benchlib.env_summary_md(env)}\n"
    )


def headline(results: dict[str, list[dict[str, Any]]], largest: dict[str, Any]) -> str:
    d = largest["derived"]
    runs_with_copies = [run for runs in results.values() for run in runs if run["copies"]]
    per_window = statistics.median(run["derived"]["augment_plus_embed_s"] / run["new_windows"]
                                   for run in runs_with_copies)
    rounds = [run["derived"]["round_with_copies_vs_round_originals"] for run in runs_with_copies
              if run["copies"] == max(COPIES)]
    return (f"Headline: about **{1e6 * per_window:.0f} us per new window** to augment and embed (median over the "
            f"runs with copies); the largest case ({largest['backbone']}, K={largest['shots']}, "
            f"C={largest['copies']}: {largest['new_windows']} new windows) takes "
            f"**{1e3 * d['augment_plus_embed_s']:.1f} ms**, {d['augment_plus_embed_vs_round_originals']:.1f}x one "
            f"training round on the originals, once when the labelled windows arrive; with C={max(COPIES)} every "
            f"round then trains {min(rounds):.1f}-{max(rounds):.1f}x as long; "
            f"peak RSS grows by at most "
            f"{max(run['derived']['peak_rss_above_ready_mb'] for runs in results.values() for run in runs):.1f} MiB "
            f"over the loaded backbone.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbones", default=",".join(BACKBONES), help=f"comma-separated, from: {', '.join(BACKBONES)}")
    p.add_argument("--repeats", type=int, default=51, help="timed repeats per (backbone, K, C), after one warm-up")
    p.add_argument("--seed", type=int, default=0, help="which labelled windows are drawn, and the augmentation seed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data-file", help=argparse.SUPPRESS)
    p.add_argument("--copies", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.model, args.data_file, args.copies, args.repeats, args.seed)
        return 0
    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BACKBONES))
    if unknown or not names:
        raise SystemExit(f"--backbones: unknown {unknown}; choose from {', '.join(BACKBONES)}")
    from edge_agent.data.augment import AugmentConfig

    benchlib.warn_openblas_env()
    env = benchlib.environment()
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    data_meta: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgefl-augment-cost-") as tmp:
        for name in names:
            for shots in SHOTS:
                data_file = Path(tmp) / f"{name}-{shots}.npz"
                data_meta[f"{name} K={shots}"] = write_labelled(data_file, name, shots, args.seed)
                for copies in COPIES:
                    cmd = [sys.executable, __file__, "--worker", "--model", BACKBONES[name], "--data-file",
                           str(data_file), "--copies", str(copies), "--repeats", str(args.repeats),
                           "--seed", str(args.seed)]
                    run = benchlib.run_json_subprocess(cmd, env=benchlib.worker_env())
                    run.update(backbone=name, shots=shots, derived=derived(run))
                    results[name].append(run)
                    print(f"  {name} K={shots} C={copies}: augment+embed "
                          f"{1e3 * run['derived']['augment_plus_embed_s']:.2f} ms = "
                          f"{run['derived']['augment_plus_embed_vs_round_originals']:.2f}x a round; round "
                          f"{run['derived']['round_with_copies_vs_round_originals']:.2f}x; peak RSS "
                          f"{run['peak_rss_mb']:.1f} MiB", file=sys.stderr)
    first = next(iter(results.values()))[0]
    defaults = AugmentConfig()
    meta = {"shots": list(SHOTS), "copies": list(COPIES), "repeats": args.repeats, "seed": args.seed,
            "augment": {"max_shift_fraction": defaults.max_shift_fraction, "scale_range": list(defaults.scale_range),
                        "max_rotation_deg": defaults.max_rotation_deg, "scale_per_group": defaults.scale_per_group},
            "strategy": first["strategy"], "local_epochs": first["local_epochs"], "batch_size": first["batch_size"],
            "runtime": first["runtime"], "backbone_batch_size": first["backbone_batch_size"],
            "data": {n: data_meta[f"{n} K={SHOTS[-1]}"] for n in names}, "data_per_shots": data_meta}
    markdown = render(results, meta, env)
    doc = {"benchmark": NAME, "description": __doc__, "environment": env, "config": meta, "results": results,
           "median_ratio_augment_plus_embed_vs_round": statistics.median(
               run["derived"]["augment_plus_embed_vs_round_originals"] for runs in results.values() for run in runs
               if run["copies"])}
    paths = benchlib.write_results(NAME, doc, markdown)
    print(markdown)
    print(f"results: {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
