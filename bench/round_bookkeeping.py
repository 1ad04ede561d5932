"""Round bookkeeping per update (aggregator/rounds.py: judge + accept + should_close) against the number of selected
devices: the aggregator's per-update cost that must not grow with the fleet. Pure code, no broker, no disk.
Writes bench/results/round_bookkeeping.{json,md}.

    .venv/bin/python bench/round_bookkeeping.py     # a few seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from benchlib import environment, env_summary_md, md_table, summarize, write_results

from edge_agent.aggregator.rounds import RoundConfig, accept, judge, open_round, should_close

SHAPES = {"w": (2,)}


@dataclass(frozen=True)
class Update:
    device_id: str
    update_id: str
    round: int = 1
    model_version: int = 0
    strategy: str = "fedavg"
    num_examples: int = 1
    tensors: dict[str, np.ndarray] = field(default_factory=lambda: {"w": np.ones(2, np.float32)})


def per_update_us(n: int) -> float:
    """Every selected device's update judged, accepted and the close checked once more, in one round."""
    cfg = RoundConfig(min_clients=1, deadline_s=1e9)
    devices = [f"d{i:06d}" for i in range(n)]
    state = open_round(1, 0, devices, 0.0, cfg)
    updates = [Update(d, f"u{d}") for d in devices]
    t0 = time.perf_counter()
    for u in updates:
        judge(state, u, strategy="fedavg", expected=SHAPES)
        state = accept(state, u)
        should_close(state, 1.0, cfg)
    elapsed = time.perf_counter() - t0
    assert state.reported == n
    return 1e6 * elapsed / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 30_000, 100_000])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = {n: summarize([per_update_us(n) for _ in range(args.repeats)]) for n in args.sizes}
    doc = {"benchmark": "round_bookkeeping", "env": environment(), "per_update_us": {str(n): r for n, r in rows.items()}}
    table = md_table(["selected devices", "us per update (median)", "min", "max"],
                     [[f"{n:,}", f"{r['median']:.1f}", f"{r['min']:.1f}", f"{r['max']:.1f}"] for n, r in rows.items()])
    md = ("# Round bookkeeping per update (judge + accept + should_close)\n\n" + table + "\n\n"
          + env_summary_md(doc["env"]) + "\n")
    write_results("round_bookkeeping", doc, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
