"""What each update codec costs on the device path: bytes per update, encode and decode time, and its error.

For the shared tensors of the default head (fedavg / ditto: adapter 64x32 + 32, classifier 32x7 + 7) and random
update deltas, every codec of `edge_agent.codec.compression`: the payload bytes of one update (tensor bytes only,
without the envelope's header) and their ratio against float32; CPU time per update (time.process_time, this
thread) of `encode_tensor` over the four tensors, of `decode_tensor` (the aggregator's side), and of
`ErrorFeedback.compress` (what the agent runs: add the residual, encode, decode, keep the new residual); and the
relative L2 error of one decoded update, ||x - x^|| / ||x||. Medians over --repeats blocks of --reps updates.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import benchlib

NAME = "codec_speed"
HEAD = {"adapter.w": (64, 32), "adapter.b": (32,), "classifier.w": (32, 7), "classifier.b": (7,)}
SPECS = ("float32", "float16", "int8", "int8+sr", "int4", "int4+sr", "sign1", "sign1+sr", "sign1+rot",
         "sign1+rot+sr", "topk:0.1", "topk:0.05", "topk:0.01", "subsample:0.1", "subsample:0.05", "subsample:0.01")


def cpu_us(fn: Callable[[], object], reps: int, repeats: int) -> dict[str, Any]:
    """CPU microseconds per call: `repeats` blocks of `reps` calls after one warm-up call."""
    fn()
    blocks = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        blocks.append(1e6 * (time.process_time() - t0) / reps)
    return benchlib.summarize(blocks)


def measure(text: str, reps: int, repeats: int) -> dict[str, Any]:
    import numpy as np

    from edge_agent.codec.compression import CodecSpec, ErrorFeedback, decode_tensor, encode_tensor, payload_bytes

    spec = CodecSpec.parse(text)
    rng = np.random.default_rng(0)
    delta = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in HEAD.items()}
    seeds = {k: f"fleet/device/1/{k}".encode() for k in HEAD}
    encoded = {k: encode_tensor(v, spec, seeds[k]) for k, v in delta.items()}
    decoded = {k: decode_tensor(encoded[k], HEAD[k], spec, seeds[k]) for k in HEAD}
    error = math.sqrt(sum(float(np.sum((delta[k].astype(np.float64) - decoded[k]) ** 2)) for k in HEAD))
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
    feedback = ErrorFeedback()
    nbytes = sum(len(b) for b in encoded.values())
    return {
        "codec": text, "bytes": nbytes, "payload_bytes": payload_bytes(HEAD, spec),
        "relative_l2_error": error / norm,
        "encode_us": cpu_us(lambda: [encode_tensor(v, spec, seeds[k]) for k, v in delta.items()], reps, repeats),
        "decode_us": cpu_us(lambda: [decode_tensor(encoded[k], HEAD[k], spec, seeds[k]) for k in HEAD],
                            reps, repeats),
        "error_feedback_us": cpu_us(lambda: feedback.compress(delta, spec, seeds), reps, repeats),
    }


def render(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    base = next(r["bytes"] for r in rows if r["codec"] == "float32")
    table = benchlib.md_table(
        ["codec", "bytes / update", "x fewer than float32", "encode us", "decode us", "agent (error feedback) us",
         "relative L2 error"],
        [[r["codec"], r["bytes"], round(base / r["bytes"], 1), round(r["encode_us"]["median"], 1),
          round(r["decode_us"]["median"], 1), round(r["error_feedback_us"]["median"], 1),
          round(r["relative_l2_error"], 3)] for r in rows])
    return "\n".join([
        f"# Update codecs: bytes and CPU per update ({env.get('cpu_model', '')})", "",
        "Default head's shared tensors (adapter 64x32 + 32, classifier 32x7 + 7), random deltas; tensor bytes only "
        "(the envelope's header comes on top). CPU time per whole update, median of blocks.", "",
        table, "", benchlib.env_summary_md(env)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200, help="updates per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per codec and operation")
    p.add_argument("--codecs", nargs="+", default=list(SPECS), help="codec specs to measure")
    args = p.parse_args(argv)
    benchlib.warn_openblas_env()
    env = benchlib.environment()
    rows = [measure(text, args.reps, args.repeats) for text in args.codecs]
    if "float32" not in args.codecs:
        rows.insert(0, measure("float32", args.reps, args.repeats))
    markdown = render(rows, env)
    paths = benchlib.write_results(NAME, {"benchmark": NAME, "description": __doc__, "environment": env,
                                          "head": {k: list(v) for k, v in HEAD.items()}, "rows": rows}, markdown)
    print(markdown)
    print("\n".join(str(path) for path in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
