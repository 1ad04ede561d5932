"""Device footprint: peak RSS and cold start of a fresh process that does what a device does.

Each run is a new Python process (bench/device_worker.py) that imports edge_agent, loads the int8 backbone
with FrozenBackbone, loads its saved head state, predicts one fresh window (= end of cold start), then
loads the user's windows, embeds them all, trains the head (FitConfig defaults, --epochs epochs) and
predicts the user's test windows with the int8 head.

Two ways to get the user's windows:
- `npz` (the DEVICE figure): the parent pre-extracts subject --subject's windows to a small .npz, as a
  device would have only its own recordings;
- `dataset`: the worker loads the whole 18 MB pickled dataset and windows it, which no device does; shown
  only to make the dataset's share of the memory visible.
The device numbers come from the device environment (.venv, no TensorFlow); other environments are shown
for comparison. Not a test: goals are reported against, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import benchlib

NAME = "device_footprint"
GOAL_PEAK_RSS_MB = 50.0
GOAL_COLD_START_S = 0.5
WORKER = benchlib.BENCH_DIR / "device_worker.py"
DEFAULT_PYTHONS = (benchlib.REPO_ROOT / ".venv" / "bin" / "python", benchlib.REPO_ROOT / ".venv-bench" / "bin" / "python")
MODES = ("npz", "dataset")


def prepare_inputs(tmp: Path, subject: int, seed: int) -> dict[str, Any]:
    """The files a device would already have: its windows, one fresh sensor window, its saved head state."""
    import numpy as np

    from edge_agent.backbone import DEFAULT_MODEL, EmbeddingCache, FrozenBackbone
    from edge_agent.data.watch import load_watch_dataset
    from edge_agent.learning.head import HeadConfig, init_params
    from edge_agent.data.federated import default_cache_dir, embed_dataset
    from edge_agent.state_io import save_head_state

    dataset = load_watch_dataset()
    backbone = FrozenBackbone(DEFAULT_MODEL)
    # The standardization statistics come from the backbone subjects, as in the simulation; the device gets
    # them with its head. embed_dataset computes them (and caches the embeddings by model sha256).
    embedded = embed_dataset(dataset, backbone, cache=EmbeddingCache(default_cache_dir()))
    train, test = embedded.train, embedded.test
    tr, te = train.subject == subject, test.subject == subject
    if not tr.any():
        raise SystemExit(f"subject {subject} has no windows")
    np.savez(tmp / "user.npz", x_train=train.x[tr], y_train=train.y[tr], x_test=test.x[te], y_test=test.y[te])
    np.save(tmp / "window.npy", test.x[te][:1])
    params = init_params(HeadConfig(backbone.embedding_dim, dataset.num_classes), np.random.default_rng(seed))
    save_head_state(tmp / "head.npz", {**params, "embedding.mean": embedded.standardizer.mean,
                                       "embedding.std": embedded.standardizer.std}, {"note": "benchmark"})
    return {
        "model": str(DEFAULT_MODEL), "subject": subject,
        "n_train": int(tr.sum()), "n_test": int(te.sum()),
        "user_npz_bytes": (tmp / "user.npz").stat().st_size,
        "dataset_note": "the dataset file is ~18 MB pickled; only the `dataset` mode loads it",
    }


def run_once(python: Path, tmp: Path, mode: str, subject: int, epochs: int, seed: int) -> dict[str, Any]:
    source = str(tmp / "user.npz") if mode == "npz" else str(subject)
    cmd = [str(python), str(WORKER), str(benchlib.REPO_ROOT / "models" / "backbone_int8.tflite"),
           str(tmp / "head.npz"), str(tmp / "window.npy"), mode, source, str(epochs), str(seed)]
    res = benchlib.run_json_subprocess(cmd, env=benchlib.worker_env())
    st, spawn = res["stamps"], res["parent_view"]["spawn_monotonic"]
    res["times_s"] = {
        # From the parent's stamp just before spawning: includes interpreter start-up and site imports.
        "cold_start_from_spawn": st["first_prediction"] - spawn,
        "cold_start_in_process": st["first_prediction"] - st["top"],
        "interpreter_startup": st["top"] - spawn,
        "import_numpy": st["numpy_imported"] - st["top"],
        "import_edge_agent": st["imported"] - st["numpy_imported"],
        "load_backbone": st["backbone_loaded"] - st["imported"],
        "head_state_and_first_prediction": st["first_prediction"] - st["backbone_loaded"],
        "load_user_data": st["data_loaded"] - st["first_prediction"],
        "embed_all": st["embedded"] - st["data_loaded"],
        "train": st["trained"] - st["embedded"],
        "predict_test_int8": st["predicted"] - st["trained"],
        "whole_process_wall": res["parent_view"]["wall_s"],
    }
    return res


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = runs[0]["times_s"].keys()
    return {
        "times_s": {k: benchlib.summarize([r["times_s"][k] for r in runs]) for k in keys},
        "peak_rss_mb": benchlib.summarize([r["peak_rss_mb"] for r in runs]),
        "rss_mb": {k: statistics.median(r["rss_mb"][k] for r in runs) for k in runs[0]["rss_mb"]},
        "test_acc_int8": benchlib.summarize([r["test_acc_int8"] for r in runs]),
        "heavy_modules_loaded": {m: any(r["heavy_modules_loaded"][m] for r in runs) for m in runs[0]["heavy_modules_loaded"]},
        "third_party_top_level_modules": runs[0]["third_party_top_level_modules"],
        "first_run_cold_start_s": runs[0]["times_s"]["cold_start_from_spawn"],
        "runs": runs,
    }


def env_label(python: Path) -> str:
    return python.parent.parent.name  # .venv, .venv-bench, ...


def render(results: dict[str, dict[str, Any]], inputs: dict[str, Any], args: argparse.Namespace,
           env: dict[str, Any], device_key: str | None) -> str:
    rows = []
    for key, s in results.items():
        t = s["times_s"]
        heavy = [m for m, loaded in s["heavy_modules_loaded"].items() if loaded]
        cs = t["cold_start_from_spawn"]
        rows.append([
            ("**" + key + "** (device)") if key == device_key else key,
            f"{s['peak_rss_mb']['median']:.1f} ({s['peak_rss_mb']['min']:.1f}-{s['peak_rss_mb']['max']:.1f})",
            f"{s['rss_mb']['first_prediction']:.1f}",
            f"{cs['median']:.3f} ({cs['min']:.3f}-{cs['max']:.3f})",
            f"{t['cold_start_in_process']['median']:.3f}",
            f"{t['import_numpy']['median']:.3f} / {t['import_edge_agent']['median']:.3f} / {t['load_backbone']['median']:.3f}",
            f"{1e3 * t['embed_all']['median']:.0f}",
            f"{1e3 * t['train']['median']:.0f}",
            f"{t['whole_process_wall']['median']:.2f}",
            f"{s['test_acc_int8']['median']:.3f}",
            ", ".join(heavy) if heavy else "none",
        ])
    table = benchlib.md_table(
        ["env / user data", "peak RSS MB median (min-max)", "RSS at 1st prediction MB", "cold start s (min-max)",
         "in-process s", "import numpy / edge_agent / load model s", f"embed {inputs['n_train'] + inputs['n_test']} windows ms",
         f"train {args.epochs} ep ms", "process wall s", "test acc int8", "TF/torch/... loaded"], rows)
    phases = ("top", "numpy_imported", "imported", "backbone_loaded", "first_prediction", "data_loaded", "embedded", "trained")
    rss_table = benchlib.md_table(
        ["env / user data", "bare Python", "+ numpy", "+ edge_agent", "+ backbone (imports LiteRT)", "1st prediction",
         "user data loaded", "all embedded", "trained", "peak"],
        [[key, *(f"{s['rss_mb'][ph]:.1f}" for ph in phases), f"{s['peak_rss_mb']['median']:.1f}"] for key, s in results.items()])
    head = ""
    if device_key:
        d = results[device_key]
        peak, cs = d["peak_rss_mb"]["median"], d["times_s"]["cold_start_from_spawn"]["median"]
        head = (f"Headline (device = `{device_key}`): peak RSS **{peak:.1f} MB** (goal < {GOAL_PEAK_RSS_MB:.0f}: "
                f"{'met' if peak < GOAL_PEAK_RSS_MB else 'NOT met'}), cold start **{cs:.3f} s** (goal < "
                f"{GOAL_COLD_START_S}: {'met' if cs < GOAL_COLD_START_S else 'NOT met'}), embed "
                f"{inputs['n_train'] + inputs['n_test']} windows {1e3 * d['times_s']['embed_all']['median']:.0f} ms, "
                f"train {args.epochs} epochs on {inputs['n_train']} windows {1e3 * d['times_s']['train']['median']:.0f} ms.\n\n")
    return (
        f"# Device footprint\n\n{head}"
        f"Subject {inputs['subject']}: {inputs['n_train']} training + {inputs['n_test']} test windows. {args.repeats} fresh "
        f"processes per row. Cold start = from the parent's stamp just before spawning the process (so Python "
        f"start-up is included) through imports, backbone load, head-state load and the first int8 prediction on one "
        f"window; 'in-process' starts at the worker's first line. Peak RSS = the worker's VmHWM at the end (MiB). "
        f"`npz` rows read the user's windows from a {inputs['user_npz_bytes'] / 1e6:.1f} MB pre-extracted file (what a "
        f"device has: the device figure); `dataset` rows load and window the whole ~18 MB dataset instead (no device "
        f"does this). Training uses FitConfig defaults with epochs={args.epochs}.\n\n{table}\n\n"
        f"RSS (MiB, median) after each phase; FrozenBackbone imports the LiteRT module when it loads the model:\n\n"
        f"{rss_table}\n\n"
        + benchlib.env_summary_md(env) + "\n"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--python", action="append", type=Path, default=None,
                   help="interpreter(s) to measure; default: .venv (device) and .venv-bench, those that exist")
    p.add_argument("--subject", type=int, default=4, help="the user whose windows the device holds")
    p.add_argument("--epochs", type=int, default=20, help="head training epochs")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per environment and mode")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pythons = args.python or [p for p in DEFAULT_PYTHONS if p.exists()]
    if not pythons:
        raise SystemExit("no interpreter found: run scripts/setup (device env .venv) or pass --python")
    benchlib.warn_openblas_env()
    env = benchlib.environment()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefl-device-") as tmp_dir:
        tmp = Path(tmp_dir)
        inputs = prepare_inputs(tmp, args.subject, args.seed)
        raw: dict[str, list[dict[str, Any]]] = {f"{env_label(py)} / {m}": [] for py in pythons for m in MODES}
        for r in range(args.repeats):
            for py in pythons:  # interleaved, so a noisy moment does not hit only one row
                for mode in MODES:
                    res = run_once(py, tmp, mode, args.subject, args.epochs, args.seed)
                    raw[f"{env_label(py)} / {mode}"].append(res)
                    print(f"  run {r + 1}/{args.repeats} {env_label(py):12s} {mode:8s} peak {res['peak_rss_mb']:6.1f} MB"
                          f"  cold start {res['times_s']['cold_start_from_spawn']:.3f} s", file=sys.stderr)
        results = {k: summarize_runs(v) for k, v in raw.items()}
    device_key = next((k for k in results if k.startswith(".venv /") and k.endswith("npz")), None)
    markdown = render(results, inputs, args, env, device_key)
    doc = {"benchmark": NAME, "description": __doc__, "environment": env,
           "config": {**vars(args), "python": [str(p) for p in pythons]}, "inputs": inputs,
           "interpreters": {env_label(p): benchlib.interpreter_packages(p) for p in pythons},
           "goals": {"peak_rss_mb_below": GOAL_PEAK_RSS_MB, "cold_start_s_below": GOAL_COLD_START_S},
           "device_row": device_key, "results": results}
    paths = benchlib.write_results(NAME, doc, markdown)
    print(markdown)
    print(f"results: {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
