"""Personalization-head training: our numpy `fit` vs the same head in Keras (`model.fit`) and PyTorch.

Same layers (Dense 64->32 ReLU -> Dense 32->7), same initial weights, same data, softmax cross-entropy,
Adam (lr 0.003, betas 0.9/0.999, eps 1e-8), no weight decay anywhere, batch 32, reshuffled every epoch.
The data are the standardized int8-backbone embeddings of the training windows of ALL federated client
subjects (4-9, `natural` partition) concatenated into one training set; accuracy is on their test windows.

Each framework runs in its own fresh subprocess so imports and memory do not mix; the parent records
the kernel's peak RSS of each child. Epoch times are boundary to boundary inside one training run (the
optimizer state carries over, as in real training); the first `--warmup` epochs are excluded from the
timing (Keras traces its graph there) but do count for accuracy. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib

NAME = "head_training"
EMBED_DIM, HIDDEN, NUM_CLASSES = 64, 32, 7
LR, BATCH = 0.003, 32
# Variant -> (framework label, what it is). Order = the order within one repeat; repeats interleave.
VARIANTS: dict[str, str] = {
    "numpy": "edge_agent.learning.head.fit (the project's head)",
    "keras": "Keras model.fit on numpy arrays, compile() defaults (jit_compile='auto' = off on CPU)",
    "keras-tfdata": "Keras model.fit on a shuffled, batched, prefetched tf.data.Dataset, compile() defaults",
    "keras-xla": "Keras model.fit on numpy arrays, jit_compile=True (XLA)",
    "keras-spe": "Keras model.fit on numpy arrays, steps_per_execution = batches per epoch (one graph call per epoch)",
    "torch": "PyTorch eager, manual loop over randperm index batches (no DataLoader)",
}
DEFAULT_VARIANTS = ("numpy", "keras", "keras-tfdata", "keras-xla", "keras-spe", "torch")


# ---------------------------------------------------------------- parent: data

def prepare_data(path: Path, seed: int, subject: int | None) -> dict[str, Any]:
    """Embed the dataset once (cached on disk by model sha256) and write the arrays every worker loads."""
    import numpy as np

    from edge_agent.backbone import EmbeddingCache, FrozenBackbone
    from edge_agent.data.partition import PartitionConfig
    from edge_agent.data.watch import load_watch_dataset
    from edge_agent.learning.head import HeadConfig, init_params
    from edge_agent.data.federated import default_cache_dir, embed_dataset, federate

    backbone = FrozenBackbone()
    embedded = embed_dataset(load_watch_dataset(), backbone, cache=EmbeddingCache(default_cache_dir()))
    data = federate(embedded, PartitionConfig("natural"))
    chosen = [i for i, cid in enumerate(data.client_ids) if subject is None or cid == f"subject-{subject:02d}"]
    if not chosen:
        raise SystemExit(f"no client subject {subject}; clients are {', '.join(data.client_ids)}")
    clients = [data.clients[i] for i in chosen]
    # One shared initialization, so every framework starts from exactly the same weights.
    init = init_params(HeadConfig(EMBED_DIM, NUM_CLASSES, HIDDEN), np.random.default_rng(seed))
    arrays = {
        "x_train": np.concatenate([c.x_train for c in clients]).astype(np.float32),
        "y_train": np.concatenate([c.y_train for c in clients]).astype(np.int64),
        "x_test": np.concatenate([c.x_test for c in clients]).astype(np.float32),
        "y_test": np.concatenate([c.y_test for c in clients]).astype(np.int64),
        **{f"init.{k}": v for k, v in init.items()},
    }
    np.savez(path, **arrays)
    return {
        "clients": [data.client_ids[i] for i in chosen],
        "partition": "natural",
        "n_train": int(arrays["y_train"].size),
        "n_test": int(arrays["y_test"].size),
        "batches_per_epoch": -(-int(arrays["y_train"].size) // BATCH),
        "backbone_sha256": backbone.sha256,
    }


# ---------------------------------------------------------------- workers (each in its own process)

def _epoch_times(stamps: list[float], end: float) -> list[float]:
    """Epoch k lasts from its start stamp to the next one (the last to the end of training)."""
    bounds = [*stamps, end]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def train_numpy(d: Any, epochs: int, seed: int) -> tuple[list[float], float, dict[str, float]]:
    import numpy as np

    from edge_agent.learning.head import FitConfig, OptimizerConfig, fit, logits, quantize_head

    stamps: list[float] = []

    class StampingGenerator(np.random.Generator):
        """`fit` draws exactly one permutation at the start of every epoch: stamping it times the epochs of
        ONE fit call. Calling fit once per epoch instead would reset Adam's state every epoch."""

        def permutation(self, x: Any, axis: int = 0) -> Any:
            stamps.append(benchlib.monotonic())
            return super().permutation(x, axis)

    params = {k[5:]: d[k] for k in d.files if k.startswith("init.")}
    config = FitConfig(epochs=epochs, batch_size=BATCH, weight_decay=0.0,
                       optimizer=OptimizerConfig(kind="adam", lr=LR, beta1=0.9, beta2=0.999, eps=1e-8))
    start = benchlib.monotonic()
    trained = fit(params, d["x_train"], d["y_train"], config, StampingGenerator(np.random.PCG64(seed)))
    end = benchlib.monotonic()
    acc = float(np.mean(np.argmax(logits(trained, d["x_test"]), axis=1) == d["y_test"]))
    acc_int8 = float(np.mean(quantize_head(trained).predict(d["x_test"]) == d["y_test"]))
    return _epoch_times(stamps, end), end - start, {"test_acc": acc, "test_acc_int8_head": acc_int8}


def train_keras(d: Any, epochs: int, seed: int, *, jit: bool = False, tfdata: bool = False,
                whole_epoch_steps: bool = False) -> tuple[list[float], float, dict[str, float]]:
    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((EMBED_DIM,)),
        keras.layers.Dense(HIDDEN, activation="relu"),
        keras.layers.Dense(NUM_CLASSES),
    ])
    model.set_weights([d["init.adapter.w"], d["init.adapter.b"], d["init.classifier.w"], d["init.classifier.b"]])
    compile_kw: dict[str, Any] = {"jit_compile": True} if jit else {}  # default: "auto", i.e. off on CPU
    if whole_epoch_steps:  # Keras' own knob against per-step Python overhead: loop the steps inside the graph
        compile_kw["steps_per_execution"] = -(-len(d["y_train"]) // BATCH)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LR, beta_1=0.9, beta_2=0.999, epsilon=1e-8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **compile_kw)
    stamps: list[float] = []

    class EpochStamps(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            stamps.append(benchlib.monotonic())

    x, y = d["x_train"], d["y_train"]
    start = benchlib.monotonic()
    if tfdata:
        ds = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
              .batch(BATCH).prefetch(tf.data.AUTOTUNE))
        model.fit(ds, epochs=epochs, verbose=0, callbacks=[EpochStamps()])
    else:
        model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=0, callbacks=[EpochStamps()])
    end = benchlib.monotonic()
    pred = np.argmax(model.predict(d["x_test"], batch_size=256, verbose=0), axis=1)
    extra = {"test_acc": float(np.mean(pred == d["y_test"])), "jit_compile_resolved": float(bool(model.jit_compile))}
    return _epoch_times(stamps, end), end - start, extra


def train_torch(d: Any, epochs: int, seed: int) -> tuple[list[float], float, dict[str, float]]:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    adapter, classifier = torch.nn.Linear(EMBED_DIM, HIDDEN), torch.nn.Linear(HIDDEN, NUM_CLASSES)
    model = torch.nn.Sequential(adapter, torch.nn.ReLU(), classifier)
    with torch.no_grad():  # torch stores Linear weights as (out, in): transpose ours
        adapter.weight.copy_(torch.from_numpy(d["init.adapter.w"].T))
        adapter.bias.copy_(torch.from_numpy(d["init.adapter.b"]))
        classifier.weight.copy_(torch.from_numpy(d["init.classifier.w"].T))
        classifier.bias.copy_(torch.from_numpy(d["init.classifier.b"]))
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    x, y = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
    gen = torch.Generator().manual_seed(seed)
    stamps: list[float] = []
    start = benchlib.monotonic()
    for _ in range(epochs):
        stamps.append(benchlib.monotonic())
        order = torch.randperm(len(y), generator=gen)
        for lo in range(0, len(y), BATCH):
            idx = order[lo: lo + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    end = benchlib.monotonic()
    with torch.no_grad():
        pred = model(torch.from_numpy(d["x_test"])).argmax(dim=1).numpy()
    extra = {"test_acc": float(np.mean(pred == d["y_test"])), "torch_threads": float(torch.get_num_threads())}
    return _epoch_times(stamps, end), end - start, extra


def _import_framework(variant: str) -> None:
    """Imported up front and timed on its own, so 'RSS after imports' is the framework's own cost."""
    if variant == "numpy":
        import edge_agent.learning.head  # noqa: F401
    elif variant.startswith("keras"):
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    elif variant == "torch":
        import torch  # noqa: F401


def run_worker(variant: str, data_file: str, epochs: int, seed: int) -> None:
    import numpy as np

    t0, rss_start = benchlib.monotonic(), benchlib.rss_mb()  # python + numpy + benchlib only
    _import_framework(variant)
    import_s, rss_imported = benchlib.monotonic() - t0, benchlib.rss_mb()
    trainers: dict[str, Callable[[Any, int, int], tuple[list[float], float, dict[str, float]]]] = {
        "numpy": train_numpy,
        "keras": lambda d, e, s: train_keras(d, e, s),
        "keras-tfdata": lambda d, e, s: train_keras(d, e, s, tfdata=True),
        "keras-xla": lambda d, e, s: train_keras(d, e, s, jit=True),
        "keras-spe": lambda d, e, s: train_keras(d, e, s, whole_epoch_steps=True),
        "torch": train_torch,
    }
    with np.load(data_file) as npz:
        d = _Arrays({k: npz[k] for k in npz.files})
    epoch_s, fit_s, extra = trainers[variant](d, epochs, seed)
    benchlib.emit_worker_result({
        "variant": variant, "epoch_s": epoch_s, "fit_total_s": fit_s, "import_s": import_s,
        "rss_start_mb": rss_start, "rss_after_imports_mb": rss_imported, "rss_end_mb": benchlib.rss_mb(),
        "peak_rss_mb": benchlib.peak_rss_mb(), **extra,
        "openblas_env": {v: os.environ.get(v) for v in benchlib.OPENBLAS_VARS},
    })


class _Arrays(dict[str, Any]):
    """The npz contents, with the `.files` attribute the trainers use to find the init tensors."""

    @property
    def files(self) -> list[str]:
        return list(self.keys())


# ---------------------------------------------------------------- parent: runs and report

def _median_epoch(run: dict[str, Any], warmup: int) -> float:
    return float(statistics.median(run["epoch_s"][warmup:]))


def run_all(variants: list[str], repeats: int, epochs: int, warmup: int, seed: int,
            data_file: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[float]]]:
    """All runs, plus each other variant's epoch time over the numpy runs just before and after it.

    This machine has slow phases lasting seconds (the same code runs ~2x slower for a while). A numpy run
    takes well under a second, a Keras run several, so numpy runs bracket every other run and each ratio
    is taken against its own neighbours: a slow phase then moves both sides of a ratio together.
    """
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    paired: dict[str, list[float]] = {v: [] for v in variants if v != "numpy"}
    env = benchlib.worker_env({"TF_CPP_MIN_LOG_LEVEL": "2"})

    def launch(v: str, r: int) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--worker", v, "--data-file", str(data_file),
               "--epochs", str(epochs), "--seed", str(seed + r)]
        res = benchlib.run_json_subprocess(cmd, env=env)
        runs[v].append(res)
        print(f"  repeat {r + 1}/{repeats} {v:13s} median epoch {1e3 * _median_epoch(res, warmup):8.2f} ms"
              f"  acc {res['test_acc']:.3f}  peak {res['peak_rss_mb']:.0f} MB", file=sys.stderr)
        return res

    for r in range(repeats):
        before = launch("numpy", r)
        for v in paired:
            other = launch(v, r)
            after = launch("numpy", r)
            reference = (_median_epoch(before, warmup) + _median_epoch(after, warmup)) / 2
            paired[v].append(_median_epoch(other, warmup) / reference)
            before = after
    return runs, paired


def summarize_variant(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    timed = [t for run in runs for t in run["epoch_s"][warmup:]]
    return {
        "epoch_s": benchlib.summarize(timed),
        "per_repeat_median_epoch_s": [statistics.median(run["epoch_s"][warmup:]) for run in runs],
        "warmup_epoch_s": benchlib.summarize([t for run in runs for t in run["epoch_s"][:warmup]]),
        "fit_total_s": benchlib.summarize([run["fit_total_s"] for run in runs]),
        "test_acc": benchlib.summarize([run["test_acc"] for run in runs]),
        "import_s": benchlib.summarize([run["import_s"] for run in runs]),
        "rss_start_mb": benchlib.summarize([run["rss_start_mb"] for run in runs]),
        "rss_after_imports_mb": benchlib.summarize([run["rss_after_imports_mb"] for run in runs]),
        "peak_rss_mb": benchlib.summarize([run["peak_rss_mb"] for run in runs]),
        "runs": runs,
    }


def ratios(summary: dict[str, dict[str, Any]], paired: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Other / numpy per-epoch time: median and range of the bracketed ratios, and the ratio of pooled medians."""
    base = summary["numpy"]["epoch_s"]["median"]
    return {v: {"median": statistics.median(p), "min": min(p), "max": max(p),
                "pooled_median_ratio": summary[v]["epoch_s"]["median"] / base, "paired": p}
            for v, p in paired.items()}


def render(summary: dict[str, dict[str, Any]], rat: dict[str, dict[str, Any]], meta: dict[str, Any],
           env: dict[str, Any]) -> str:
    rows = []
    for v, s in summary.items():
        r = rat.get(v)
        acc = s["test_acc"]
        acc_txt = f"{acc['median']:.3f} ({acc['min']:.3f}-{acc['max']:.3f})"
        if v == "numpy":
            int8 = [run["test_acc_int8_head"] for run in s["runs"]]
            acc_txt += f"; int8 {statistics.median(int8):.3f}"
        rows.append([
            v,
            f"{1e3 * s['epoch_s']['median']:.2f} ({1e3 * s['epoch_s']['min']:.2f}-{1e3 * s['epoch_s']['max']:.2f})",
            f"{benchlib.spread_pct(s['epoch_s']):.0f}%",
            "1 (base)" if r is None else f"**{r['median']:.1f}x** ({r['min']:.1f}-{r['max']:.1f})",
            f"{1e3 * s['warmup_epoch_s']['median']:.0f}",
            acc_txt,
            f"{s['import_s']['median']:.2f}",
            f"{s['rss_after_imports_mb']['median']:.0f}",
            f"{s['peak_rss_mb']['median']:.0f}",
        ])
    table = benchlib.md_table(
        ["variant", "ms/epoch median (min-max)", "IQR/median", "epoch time vs numpy", "1st epoch ms",
         "test acc median (min-max)", "import s", "RSS after imports MB", "peak RSS MB"], rows)
    n_timed = meta["epochs"] - meta["warmup"]
    base_rss = summary["numpy"]["rss_start_mb"]["median"]
    return (
        f"# Head training: numpy vs Keras vs PyTorch\n\n{headline(summary, rat)}\n\n"
        f"Head 64->32 ReLU->7, Adam lr {LR}, batch {BATCH}, no weight decay, identical initial weights. "
        f"Data: standardized int8-backbone embeddings, {meta['data']['n_train']} training windows of "
        f"{', '.join(meta['data']['clients'])} concatenated ({meta['data']['batches_per_epoch']} batches/epoch); "
        f"accuracy (float head; numpy also int8) on their {meta['data']['n_test']} test windows after "
        f"{meta['epochs']} epochs. Every run is a fresh subprocess; {meta['repeats']} runs per variant, each "
        f"bracketed by numpy runs just before and after it (so numpy has more runs). Epoch time = median of the "
        f"{n_timed} epochs after {meta['warmup']} warm-up epoch(s), pooled over runs. 'vs numpy' = median "
        f"(min-max) over runs of the run's median epoch time divided by the mean of its two bracketing numpy "
        f"runs' (this machine has slow phases lasting seconds; bracketing cancels most of them). Memory in MiB from the worker's /proc/self/status: "
        f"'RSS after imports' after importing only that framework (Python + numpy alone: {base_rss:.0f}), "
        f"'peak RSS' = VmHWM after training and test prediction.\n\n{table}\n\n"
        + "\n".join(f"- `{v}`: {VARIANTS[v]}" for v in summary) + "\n\n" + benchlib.env_summary_md(env) + "\n"
    )


def headline(summary: dict[str, dict[str, Any]], rat: dict[str, dict[str, Any]]) -> str:
    """One sentence with the ratios that matter, including the least flattering one for numpy."""
    parts = []
    if "keras" in rat:
        k = rat["keras"]["median"]
        parts.append(f"numpy head is **{k:.1f}x** faster per epoch than Keras `model.fit` with defaults "
                     f"(goal >= 50x: {'met' if k >= 50 else 'NOT met'})")
    keras_variants = {v: r for v, r in rat.items() if v.startswith("keras")}
    if keras_variants:
        best = min(keras_variants, key=lambda v: keras_variants[v]["median"])
        parts.append(f"{keras_variants[best]['median']:.1f}x vs the fastest Keras variant (`{best}`)")
    if "torch" in rat:
        parts.append(f"{rat['torch']['median']:.1f}x vs PyTorch eager")
    accs = ", ".join(f"{v} {s['test_acc']['median']:.3f}" for v, s in summary.items())
    return "Headline: " + "; ".join(parts) + f". Test accuracy (median): {accs}."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per run, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="leading epochs left out of the epoch timing")
    p.add_argument("--repeats", type=int, default=4, help="fresh subprocesses per variant (numpy gets more: it brackets the others)")
    p.add_argument("--seed", type=int, default=0, help="init seed; repeat r shuffles with seed+r")
    p.add_argument("--subject", type=int, default=None, help="train on this one client subject instead of all six")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--data-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.epochs <= args.warmup:
        p.error("--epochs must be larger than --warmup")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.data_file, args.epochs, args.seed)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "numpy" not in variants:
        raise SystemExit(f"--variants needs 'numpy' (the base) and only known names; unknown: {unknown}")
    benchlib.warn_openblas_env()
    env = benchlib.environment()
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-") as tmp:
        data_file = Path(tmp) / "head_data.npz"
        print("embedding the dataset (cached after the first run) ...", file=sys.stderr)
        data_meta = prepare_data(data_file, args.seed, args.subject)
        runs, paired = run_all(variants, args.repeats, args.epochs, args.warmup, args.seed, data_file)
    summary = {v: summarize_variant(runs[v], args.warmup) for v in variants}
    rat = ratios(summary, paired)
    meta = {"epochs": args.epochs, "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
            "batch_size": BATCH, "lr": LR, "data": data_meta}
    markdown = render(summary, rat, meta, env)
    doc = {"benchmark": NAME, "description": __doc__, "environment": env, "config": meta,
           "variants": VARIANTS, "speedup_vs_numpy": rat, "goal": "numpy >= 50x faster per epoch than Keras fit",
           "results": summary}
    paths = benchlib.write_results(NAME, doc, markdown)
    print(markdown)
    print(f"results: {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
