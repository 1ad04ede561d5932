"""Poisoning: one and two malicious devices against each aggregation rule, on the watch dataset through the real
services (edge_agent/sim.py: the real AggregatorService and AgentServices on the in-memory broker).

For every strategy, rule and attack, the honest devices' final mean accuracy against the clean run (default rule,
no attacker) of the SAME honest devices and seed: the gap is paired per seed, so removing a device from the average
is not counted as damage or as help. Two strategies: fedavg, where every device runs the global head (what the
aggregator lets through is what they get: the aggregator's own worst case), and ditto, edge-fl's default, where
each device's personal head learns beside the global one. The whole aggregator takes part, as in production: a
device whose updates keep being rejected is selected less (aggregator/rounds.py reliability).

Settings (the default count_factor) are chosen with --validation: other seeds, and each client scored on the last
quarter of its training windows (data/federated.holdout_validation), never on its test windows.

    .venv/bin/python bench/poisoning.py                # 5 seeds, 15 rounds, 2 strategies: about 12 minutes
    .venv/bin/python bench/poisoning.py --validation   # the choice of count_factor: about 3 minutes
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
from edge_agent.data.federated import default_cache_dir, embed_dataset, federate, holdout_validation
from edge_agent.data.partition import PartitionConfig
from edge_agent.data.watch import load_watch_dataset
from edge_agent.learning.robust import RobustConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.sim import ATTACKS, Attack, run_simulation

RESULTS = Path(__file__).resolve().parent / "results"
UNBOUNDED = RobustConfig(max_abs=3e38, max_examples=2**63 - 1, count_factor=0)  # what edge-fl did before issue 11
RULES: dict[str, RobustConfig] = {
    "mean, no bounds": UNBOUNDED,
    "mean (defaults: count cap, max_abs)": RobustConfig(),
    "mean + norm clipping": RobustConfig(clip="clip", max_examples=1000),
    "trimmed mean + clipping": RobustConfig(rule="trimmed-mean", trim_fraction=0.34, clip="clip"),
    "median + clipping": RobustConfig(rule="median", clip="clip"),
}
# What --validation compares: the default count cap's factor (the chosen one, 2, is RobustConfig's default).
CANDIDATES: dict[str, RobustConfig] = {f"mean (defaults), count_factor {f:g}": RobustConfig(count_factor=f)
                                       for f in (0.0, 2.0, 4.0)}
GOAL_POINTS = 2.0


def honest_mean(result: dict[str, Any], bad: frozenset[str]) -> float:
    accs = result["rounds"][-1]["client_acc"]
    return float(np.mean([a for cid, a in accs.items() if cid not in bad]))


def run_strategy(embedded: Any, strategy: str, rules: dict[str, RobustConfig], seeds: list[int], rounds: int,
                 validation: bool, t_start: float) -> dict[str, Any]:
    # acc[rule][scenario] -> per-seed honest mean accuracy; gap[rule][scenario] -> per-seed points below the clean
    # run's mean over the same honest devices; scenario "clean" or "<attack> x<n>"
    acc: dict[str, dict[str, list[float]]] = {r: {} for r in rules}
    gap: dict[str, dict[str, list[float]]] = {r: {} for r in rules}
    clean: list[float] = []
    for seed in seeds:
        data = federate(embedded, PartitionConfig("natural", seed=seed))
        if validation:
            data = holdout_validation(data)
        config = TrainingConfig(strategy=strategy, rounds=rounds, seed=seed)
        clean_run = run_simulation(data, config)
        clean.append(honest_mean(clean_run, frozenset()))
        for name, rule in rules.items():
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
            print(f"  {strategy} seed {seed} {name:40s} done ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr)
    table = {r: {s: float(np.mean(v)) for s, v in d.items()} for r, d in acc.items()}
    gaps = {r: {s: float(np.mean(v)) for s, v in d.items()} for r, d in gap.items()}
    worst = {r: max(g.values()) for r, g in gaps.items()}
    return {"clean_honest_mean_acc": float(np.mean(clean)), "honest_mean_acc": table, "gap_points": gaps,
            "worst_gap_points": worst, "per_seed": acc, "per_seed_gap_points": gap,
            "worst_seed_gap_points": {r: max(max(v) for v in d.values()) for r, d in gap.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", help="default: 0-4 (100-102 with --validation)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "ditto"])
    ap.add_argument("--validation", action="store_true",
                    help="choose settings: score on held-out training windows, other seeds, the candidate rules")
    args = ap.parse_args()
    seeds = args.seeds or ([100, 101, 102] if args.validation else [0, 1, 2, 3, 4])
    rules = CANDIDATES if args.validation else RULES
    embedded = embed_dataset(load_watch_dataset(), FrozenBackbone(), cache=EmbeddingCache(default_cache_dir()))
    t_start = time.perf_counter()
    per_strategy = {s: run_strategy(embedded, s, rules, seeds, args.rounds, args.validation, t_start)
                    for s in args.strategies}
    robust_rules = [r for r in rules if r not in ("mean, no bounds", "mean (defaults: count cap, max_abs)")]
    doc = {"config": {"seeds": seeds, "rounds": args.rounds, "strategies": args.strategies, "regime": "natural",
                      "devices": 6, "scored_on": "validation" if args.validation else "test",
                      "rules": {r: vars(c) for r, c in rules.items()}, "robust_rules": robust_rules},
           "strategies": per_strategy, "goal_points": GOAL_POINTS,
           "machine": platform.platform(), "seconds": time.perf_counter() - t_start}
    name = "poisoning_validation" if args.validation else "poisoning"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def markdown(doc: dict[str, Any]) -> str:
    c = doc["config"]
    lines = [f"Honest devices' final mean accuracy (%), scored on {c['scored_on']} windows, {c['regime']} regime, "
             f"{c['devices']} devices, {c['rounds']} rounds, mean of {len(c['seeds'])} seeds ({c['seeds']}). "
             "Attackers are 1 or 2 of the 6 devices (`bench/poisoning.py`). Each cell: the honest devices' "
             "accuracy, then in brackets its difference in points from the clean run of the same devices (paired "
             f"per seed; negative = damage). Bold: more than {doc['goal_points']:.0f} points below.", ""]
    for strategy, res in doc["strategies"].items():
        rules = list(res["honest_mean_acc"])
        scenarios = list(res["honest_mean_acc"][rules[0]])
        lines += [f"### {strategy}: clean run (default rule, no attacker) {100 * res['clean_honest_mean_acc']:.1f} %",
                  "", "| attack | " + " | ".join(rules) + " |", "|---|" + "---:|" * len(rules)]
        for s in scenarios:
            cells = []
            for r in rules:
                g = res["gap_points"][r][s]
                text = f"{100 * res['honest_mean_acc'][r][s]:.1f} ({-g:+.1f})"
                cells.append(f"**{text}**" if g > doc["goal_points"] else text)
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("| **worst gap (mean of seeds / worst seed)** | " + " | ".join(
            f"{res['worst_gap_points'][r]:.1f} / {res['worst_seed_gap_points'][r]:.1f}" for r in rules) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
