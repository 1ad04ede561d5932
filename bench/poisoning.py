"""Poisoning: one and two malicious devices against each aggregation rule, on the watch dataset through the real
services (edge_agent/sim.py: the real AggregatorService and AgentServices on the in-memory broker).

For every rule and attack, the honest devices' final mean accuracy (fedavg: every device runs the global head,
so what the aggregator lets through is what they get) against the clean run (default rule, no attacker) of the
SAME honest devices and seed: the gap is paired per seed, so removing a device from the average is not counted as
damage or as help. The whole aggregator takes part, as in production: a device whose updates keep being rejected is
selected less (aggregator/rounds.py reliability). Writes bench/results/poisoning.{json,md}.

    .venv/bin/python bench/poisoning.py             # 5 seeds, 15 rounds: about 7 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.backbone import EmbeddingCache, FrozenBackbone
from edge_agent.data.federated import default_cache_dir, embed_dataset, federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.data.watch import load_watch_dataset
from edge_agent.learning.robust import RobustConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.sim import ATTACKS, Attack, run_simulation

RESULTS = Path(__file__).resolve().parent / "results"
UNBOUNDED = RobustConfig(max_abs=3e38, max_examples=2**63 - 1)  # what edge-fl did before issue 11
RULES: dict[str, RobustConfig] = {
    "mean, no bounds": UNBOUNDED,
    "mean (defaults: count cap, max_abs)": RobustConfig(),
    "mean + norm clipping": RobustConfig(clip="clip", max_examples=1000),
    "trimmed mean + clipping": RobustConfig(rule="trimmed-mean", trim_fraction=0.34, clip="clip"),
    "median + clipping": RobustConfig(rule="median", clip="clip"),
}
ROBUST = ("trimmed mean + clipping", "median + clipping")
GOAL_POINTS = 2.0


def honest_mean(result: dict[str, Any], bad: frozenset[str]) -> float:
    accs = result["rounds"][-1]["client_acc"]
    return float(np.mean([a for cid, a in accs.items() if cid not in bad]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--strategy", default="fedavg")
    args = ap.parse_args()
    embedded = embed_dataset(load_watch_dataset(), FrozenBackbone(), cache=EmbeddingCache(default_cache_dir()))
    t_start = time.perf_counter()
    # acc[rule][scenario] -> per-seed honest mean accuracy; gap[rule][scenario] -> per-seed points below the clean
    # run's mean over the same honest devices; scenario "clean" or "<attack> x<n>"
    acc: dict[str, dict[str, list[float]]] = {r: {} for r in RULES}
    gap: dict[str, dict[str, list[float]]] = {r: {} for r in RULES}
    clean: list[float] = []
    for seed in args.seeds:
        data = federate(embedded, PartitionConfig("natural", seed=seed))
        config = TrainingConfig(strategy=args.strategy, rounds=args.rounds, seed=seed)
        clean_run = run_simulation(data, config)
        clean.append(honest_mean(clean_run, frozenset()))
        for name, rule in RULES.items():
            scenarios: list[tuple[str, Attack | None]] = [("clean", None)]
            for n_bad in (1, 2):
                bad = frozenset(data.client_ids[:n_bad])
                scenarios += [(f"{kind} x{n_bad}", Attack(bad, kind, seed)) for kind in ATTACKS]
            for label, attack in scenarios:
                honest_out = attack.devices if attack else frozenset()
                result = run_simulation(data, config, robust=rule, attack=attack)
                value = honest_mean(result, honest_out)
                acc[name].setdefault(label, []).append(value)
                gap[name].setdefault(label, []).append(100 * (honest_mean(clean_run, honest_out) - value))
            print(f"  seed {seed} {name:36s} done ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr)
    clean_mean = float(np.mean(clean))
    scenarios_all = list(next(iter(acc.values())))
    table = {r: {s: float(np.mean(v)) for s, v in d.items()} for r, d in acc.items()}
    gaps = {r: {s: float(np.mean(v)) for s, v in d.items()} for r, d in gap.items()}
    worst_gap = max(gaps[r][s] for r in ROBUST for s in scenarios_all)
    doc = {"config": {"seeds": args.seeds, "rounds": args.rounds, "strategy": args.strategy, "regime": "natural",
                      "devices": 6, "rules": {r: vars(c) for r, c in RULES.items()}},
           "clean_honest_mean_acc": clean_mean, "honest_mean_acc": table, "gap_points": gaps, "per_seed": acc,
           "per_seed_gap_points": gap, "goal_points": GOAL_POINTS, "worst_robust_gap_points": worst_gap,
           "goal_met": worst_gap <= GOAL_POINTS,
           "machine": platform.platform(), "seconds": time.perf_counter() - t_start}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "poisoning.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "poisoning.md").write_text(markdown(doc, scenarios_all))
    print(markdown(doc, scenarios_all))
    return 0


def markdown(doc: dict[str, Any], scenarios: list[str]) -> str:
    clean = doc["clean_honest_mean_acc"]
    c = doc["config"]
    lines = [f"Honest devices' final mean accuracy (%), {c['strategy']}, {c['regime']} regime, {c['devices']} devices, "
             f"{c['rounds']} rounds, mean of {len(c['seeds'])} seeds; clean run (default rule, no attacker): "
             f"**{100 * clean:.1f} %**. Attackers are 1 or 2 of the 6 devices (`bench/poisoning.py`). Each cell: "
             "the honest devices' accuracy, then in brackets its difference in points from the clean run of the same "
             "devices (paired per seed; negative = damage).", "",
             "| attack | " + " | ".join(doc["honest_mean_acc"]) + " |",
             "|---|" + "---:|" * len(doc["honest_mean_acc"])]
    for s in scenarios:
        cells = []
        for r in doc["honest_mean_acc"]:
            v = 100 * doc["honest_mean_acc"][r][s]
            g = doc["gap_points"][r][s]
            text = f"{v:.1f} ({-g:+.1f})"
            cells.append(f"**{text}**" if g > doc["goal_points"] else text)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", f"Bold: more than {doc['goal_points']:.0f} points below the clean run of the same devices. Worst "
              f"case of the robust rules (trimmed mean, median, with clipping): {doc['worst_robust_gap_points']:.1f} "
              f"points below (goal: at most {doc['goal_points']:.0f}; {'met' if doc['goal_met'] else 'NOT met'}).",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
