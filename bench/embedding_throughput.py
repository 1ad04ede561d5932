"""Backbone embedding throughput: FrozenBackbone.embed per window, by batch size, threads and kernels.

Every combination of batch size (default 1 and 64), interpreter threads (1 and 2) and kernels (LiteRT's
default with the XNNPACK delegate, and `reference_kernels=True`, the builtin kernels without it) embeds the
same real windows through the public `FrozenBackbone.embed` (numpy standardization and int8 quantization
included). A second column times only `Interpreter.invoke()` on a preset input, to show what the numpy
wrapper costs. tflite-runtime is measured too when it can be imported. TensorFlow's own interpreter is
not measured (only the device runtimes matter here). Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import benchlib

NAME = "embedding_throughput"
RUNTIMES = ("ai-edge-litert", "tflite-runtime")
MODULES = {"ai-edge-litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter"}


@dataclass(frozen=True)
class Variant:
    runtime: str
    kernels: str  # "xnnpack" (default delegate) or "reference"
    threads: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.kernels} t{self.threads} b{self.batch}"


def load_windows(n: int) -> Any:
    """Real windows (training windows of the client subjects), so the data path is the device's."""
    import numpy as np

    from edge_agent.data.partition import CLIENT_SUBJECTS
    from edge_agent.data.watch import load_watch_dataset
    from edge_agent.data.windows import split_and_window

    train, _ = split_and_window(load_watch_dataset())
    x = train.x[np.isin(train.subject, CLIENT_SUBJECTS)]
    if len(x) < n:
        raise SystemExit(f"only {len(x)} windows available, asked for {n}")
    return np.ascontiguousarray(x[:n])


def available_runtimes() -> dict[str, str | None]:
    """Runtime -> None if importable, else why not (recorded, so a missing runtime is never silent)."""
    status: dict[str, str | None] = {}
    for name in RUNTIMES:
        try:
            importlib.import_module(MODULES[name])
            status[name] = None
        except Exception as exc:  # ImportError, or numpy ABI errors of tflite-runtime under numpy 2
            status[name] = f"{type(exc).__name__}: {exc}"
    return status


def time_repeats(run_once: Callable[[], None], repeats: int) -> list[float]:
    run_once()  # warm-up: tensor allocation, delegate preparation, caches
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once()
        out.append(time.perf_counter() - t0)
    return out


def bench_embed(v: Variant, windows: Any, repeats: int) -> tuple[list[float], Any]:
    """Seconds per pass over all windows through FrozenBackbone.embed, called with `batch` windows at a time."""
    from edge_agent.backbone import FrozenBackbone

    bb = FrozenBackbone(runtime=v.runtime, num_threads=v.threads, batch_size=v.batch,
                        reference_kernels=v.kernels == "reference")
    chunks = [windows[lo: lo + v.batch] for lo in range(0, len(windows), v.batch)]

    def run() -> None:
        for c in chunks:
            bb.embed(c)

    return time_repeats(run, repeats), bb.embed(windows)


def bench_invoke(v: Variant, model_path: str, n_windows: int, repeats: int) -> list[float]:
    """Seconds for the same number of windows, timing only invoke() on a fixed int8 input of `batch` rows."""
    import numpy as np

    module = importlib.import_module(MODULES[v.runtime])
    options: dict[str, Any] = {"num_threads": v.threads}
    if v.kernels == "reference":
        options["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interp = module.Interpreter(model_path=model_path, **options)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], [v.batch, *inp["shape"][1:]])
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], np.zeros([v.batch, *inp["shape"][1:]], inp["dtype"]))
    calls = -(-n_windows // v.batch)

    def run() -> None:
        for _ in range(calls):
            interp.invoke()

    return time_repeats(run, repeats)


def agreement(a: Any, b: Any, step: float) -> dict[str, float]:
    """How far two embeddings of the same windows are apart, in int8 quantization steps."""
    import numpy as np

    diff = np.abs(a - b) / step
    return {"fraction_differing": float(np.mean(diff > 0.5)), "max_steps": float(np.round(diff.max()))}


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str | None]]:
    from edge_agent.backbone import DEFAULT_MODEL

    windows = load_windows(args.windows)
    status = available_runtimes()
    runtimes = [r for r in RUNTIMES if status[r] is None]
    variants = [Variant(r, k, t, b) for r, k, t, b in itertools.product(
        runtimes, ("xnnpack", "reference"), args.threads, args.batches)]
    step = embedding_step(runtimes[0])
    rows: dict[str, Any] = {}
    baseline = None
    for v in variants:
        embed_s, emb = bench_embed(v, windows, args.repeats)
        invoke_s = bench_invoke(v, str(DEFAULT_MODEL), len(windows), args.repeats)
        baseline = emb if baseline is None else baseline
        per_window = [1e6 * t / len(windows) for t in embed_s]
        rows[v.label] = {
            "variant": asdict(v),
            "embed_us_per_window": benchlib.summarize(per_window),
            "invoke_only_us_per_window": benchlib.summarize([1e6 * t / len(windows) for t in invoke_s]),
            "windows_per_s": len(windows) / (sum(embed_s) / len(embed_s)) if embed_s else None,
            "vs_first_variant": agreement(emb, baseline, step),
        }
        print(f"  {v.label:38s} {rows[v.label]['embed_us_per_window']['median']:8.1f} us/window", file=sys.stderr)
    return rows, status


def embedding_step(runtime: str) -> float:
    """The embedding output's quantization scale, i.e. one int8 step in embedding units."""
    from edge_agent.backbone import FrozenBackbone

    bb = FrozenBackbone(runtime=runtime)
    interp = importlib.import_module(MODULES[runtime]).Interpreter(model_path=str(bb.path))
    return float(interp.get_output_details()[bb.feature.index]["quantization"][0])


def render(rows: dict[str, Any], status: dict[str, str | None], args: argparse.Namespace, env: dict[str, Any]) -> str:
    def med(label: str, key: str = "embed_us_per_window") -> float:
        return float(rows[label][key]["median"])

    table_rows = []
    for label, r in rows.items():
        v = Variant(**r["variant"])
        ref = Variant(v.runtime, "reference", v.threads, v.batch).label
        b1 = Variant(v.runtime, v.kernels, v.threads, 1).label
        e = r["embed_us_per_window"]
        table_rows.append([
            v.runtime, v.kernels, v.threads, v.batch,
            f"{e['median']:.1f} ({e['min']:.1f}-{e['max']:.1f})",
            f"{1e6 / e['median']:,.0f}",
            f"{med(label, 'invoke_only_us_per_window'):.1f}",
            f"{med(ref) / e['median']:.2f}x" if ref in rows else "-",
            f"{med(b1) / e['median']:.2f}x" if b1 in rows else "-",
            f"{r['vs_first_variant']['fraction_differing']:.3f} (max {r['vs_first_variant']['max_steps']:.0f})",
        ])
    table = benchlib.md_table(
        ["runtime", "kernels", "threads", "batch", "embed us/window median (min-max)", "windows/s", "invoke only us/window",
         "speedup vs reference kernels", "speedup vs batch 1", "values differing from row 1 (max int8 steps)"], table_rows)
    skipped = [f"- `{r}` not measured: {why}" for r, why in status.items() if why]
    first = next(iter(rows))
    fastest = min(rows, key=lambda k: rows[k]["embed_us_per_window"]["median"])
    return (
        f"# Backbone embedding throughput\n\n"
        f"Headline: fastest `{fastest}` **{med(fastest):.1f} us/window** ({1e6 / med(fastest):,.0f} windows/s); "
        f"one window at a time (`{first}`) {med(first):.1f} us/window.\n\n"
        f"`FrozenBackbone.embed` on {args.windows} real 2 s windows (100 x 6), called with `batch` windows per call "
        f"(the backbone's batch_size = batch); median of {args.repeats} passes after one warm-up pass. 'invoke only' "
        f"times `Interpreter.invoke()` alone for the same number of windows; the difference is the numpy "
        f"standardize/quantize/dequantize wrapper and Python call overhead. Last column: agreement of the embeddings "
        f"with the first row (XNNPACK and reference kernels are known to differ by one int8 step on some values).\n\n"
        f"{table}\n\n" + ("\n".join(skipped) + "\n\n" if skipped else "") + benchlib.env_summary_md(env) + "\n"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--windows", type=int, default=1024, help="windows embedded per timed pass")
    p.add_argument("--repeats", type=int, default=9, help="timed passes per variant")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64],
                   help="comma-separated batch sizes")
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                   help="comma-separated interpreter thread counts")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchlib.warn_openblas_env()
    env = benchlib.environment()
    rows, status = run(args)
    markdown = render(rows, status, args, env)
    doc = {"benchmark": NAME, "description": __doc__, "environment": env, "config": vars(args),
           "runtimes": {r: ("measured" if why is None else f"skipped: {why}") for r, why in status.items()},
           "not_measured": "TensorFlow's tf.lite interpreter and the float Keras backbone (device runtimes only)",
           "results": rows}
    paths = benchlib.write_results(NAME, doc, markdown)
    print(markdown)
    print(f"results: {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
