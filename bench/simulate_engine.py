"""`edge-fl simulate` on the real services against the loop it replaced: whole-process wall and CPU time.

Since the round engine is one (simulate runs the real AggregatorService and AgentServices on the
in-memory broker), every message is a real envelope (SHA-256, validation, int8 tensors), every round a
few SQLite transactions, and every device scores the global head too. This measures what that costs for
`edge-fl simulate --strategy all --regime natural --rounds 30`, against the commit before the engine
(default 8a7a737, the last with simulate's own loop), checked out in a temporary worktree and run with
the same interpreter. The two alternate run by run (A B A B ...), so a machine that drifts affects both;
the ratio is the figure to quote. The limit the change promised: at most 1.5x.

    .venv/bin/python bench/simulate_engine.py [--runs 5] [--before REV]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["-m", "edge_agent.cli", "simulate", "--strategy", "all", "--regime", "natural", "--rounds", "30", "-q"]


def timed(cwd: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of one `python -m edge_agent.cli simulate ...` whose package comes from `cwd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *ARGS], cwd=cwd, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--before", default="8a7a737", help="the revision with simulate's own loop")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-fl-before-") as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), args.before], cwd=ROOT, check=True)
        try:
            timed(ROOT), timed(old)  # warm-up: embedding cache, imports, page cache
            now: list[tuple[float, float]] = []
            then: list[tuple[float, float]] = []
            tables = set()
            for _ in range(args.runs):
                wall, cpu, out = timed(ROOT)
                now.append((wall, cpu))
                tables.add(out)
                wall, cpu, out = timed(old)
                then.append((wall, cpu))
                tables.add(out)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=True)
    wall_ratio = [a[0] / b[0] for a, b in zip(now, then, strict=True)]
    cpu_ratio = [a[1] / b[1] for a, b in zip(now, then, strict=True)]
    doc: dict[str, Any] = {
        "command": "edge-fl " + " ".join(ARGS[2:]), "before": args.before, "runs": args.runs,
        "engine": {"wall_s": benchlib.summarize([w for w, _ in now]), "cpu_s": benchlib.summarize([c for _, c in now])},
        "own_loop": {"wall_s": benchlib.summarize([w for w, _ in then]),
                     "cpu_s": benchlib.summarize([c for _, c in then])},
        "ratio_wall": benchlib.summarize(wall_ratio), "ratio_cpu": benchlib.summarize(cpu_ratio),
        "same_table_printed": len(tables) == 1, "environment": benchlib.environment(),
    }
    md = "\n".join([
        "# `edge-fl simulate --strategy all --regime natural --rounds 30`: real services vs its own loop",
        "",
        benchlib.md_table(["", "wall s (median)", "CPU s (median)"], [
            ["real services on the in-memory broker (now)", f"{statistics.median(w for w, _ in now):.2f}",
             f"{statistics.median(c for _, c in now):.2f}"],
            [f"simulate's own loop ({args.before})", f"{statistics.median(w for w, _ in then):.2f}",
             f"{statistics.median(c for _, c in then):.2f}"],
            ["ratio, pair by pair (median, min-max)",
             f"{statistics.median(wall_ratio):.2f}x ({min(wall_ratio):.2f}-{max(wall_ratio):.2f})",
             f"{statistics.median(cpu_ratio):.2f}x ({min(cpu_ratio):.2f}-{max(cpu_ratio):.2f})"],
        ]),
        "",
        f"Both printed the same table: {'yes' if len(tables) == 1 else 'NO'}. {args.runs} alternating runs after "
        "one warm-up each. Reproduce: `.venv/bin/python bench/simulate_engine.py`.",
        "",
        benchlib.env_summary_md(doc["environment"]),
    ])
    benchlib.write_results("simulate_engine", doc, md)
    print(md)
    return 0 if len(tables) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
