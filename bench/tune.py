"""Choose every setting on VALIDATION data, and record the search: hyperparameters per strategy, then the
device-side options (per-user standardization, few-label augmentation), then the default strategy.

The protocol (edge_agent/evaluation/protocol.py) trains on each federated user's TRAIN windows and scores its
VALIDATION windows (phase "validation"); no test window and no new user is read here. The seeds are
bench/evallib.TUNING_SEEDS, never the seeds the report uses. Every run is appended to
bench/results/tuning_<dataset>.jsonl as it finishes (a rerun skips what is there), and the choices go to
bench/results/tuning.json, which bench/strategies.py reads.

    .venv/bin/python bench/tune.py                    # both datasets; 30-40 minutes on 2 cores
    .venv/bin/python bench/tune.py --data hapt --jobs 2

How a choice is made: for each strategy, the configuration with the best mean validation accuracy over the
four partition regimes and the tuning seeds (one configuration per strategy and dataset: a fleet does not
know its regime in advance). The configurations tried are the strategy's current defaults plus a seeded
sample of its grid (`--budget`). Device options are then tried on each strategy's chosen configuration and
kept only if they raise that mean. The default strategy is the one with the best mean over both datasets
among those that federate a whole head (`serves_new_users`): a product requirement fixed before any run, since
a user who has labelled nothing yet gets only what the fleet shares.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import evallib

from edge_agent.evaluation.stats import t_interval
from edge_agent.learning.head import HeadConfig
from edge_agent.learning.strategies import STRATEGIES, make_strategy
from edge_agent.learning.training import DEFAULT_STRATEGY, TrainingConfig

COMMON_GRID: dict[str, tuple[Any, ...]] = {"lr": (0.001, 0.003, 0.01), "local_epochs": (1, 3), "adapter_dim": (0, 32)}
STRATEGY_GRID: dict[str, dict[str, tuple[Any, ...]]] = {
    "ditto": {"ditto_lambda": (0.001, 0.005, 0.02, 0.1)},
    "fedavg-ft": {"finetune_epochs": (5, 20)},
    "ncm": {"finetune_epochs": (5, 20)},
    "fedrep": {"fedrep_head_epochs": (5, 10)},
}
# These share the adapter and keep the classifier (or the reverse): without an adapter they are local training.
NEEDS_ADAPTER = ("fedper", "fedrep", "lg-fedavg")
TUNED_FIELDS = tuple(COMMON_GRID) + tuple(sorted({k for g in STRATEGY_GRID.values() for k in g}))
OPTION_SETS: dict[str, dict[str, Any]] = {
    "per-user standardization": {"per_user_standardization": True},
    "augmentation": {"augment": "default"},
    "both": {"per_user_standardization": True, "augment": "default"},
}


def serves_new_users(strategy: str) -> bool:
    """Does the strategy give a user with no labels a head (the fleet's global one)?"""
    head = HeadConfig(in_dim=4, num_classes=2)
    rule = make_strategy(strategy, head)
    return rule.new_user_head(rule.init_server(np.random.default_rng(0))) is not None


def grid(strategy: str) -> list[dict[str, Any]]:
    axes = {**COMMON_GRID, **STRATEGY_GRID.get(strategy, {})}
    if strategy in NEEDS_ADAPTER:
        axes["adapter_dim"] = (32,)
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def candidates(strategy: str, budget: int, seed: int = 0) -> list[dict[str, Any]]:
    """The defaults first, then up to `budget - 1` other grid points drawn with a fixed generator."""
    default = {k: getattr(TrainingConfig(), k) for k in grid(strategy)[0]}
    others = [g for g in grid(strategy) if g != default]
    rng = np.random.default_rng([seed, sorted(STRATEGIES).index(strategy)])
    picked = rng.permutation(len(others))[:max(0, budget - 1)]
    return [default] + [others[i] for i in sorted(picked)]


def mean_score(records: list[dict[str, Any]]) -> float:
    return float(np.mean([r["mean"] for r in records]))


def by_candidate(records: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any],
                                                                 list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(json.dumps([r["strategy"], r["settings"], r["options"]], sort_keys=True), []).append(r)
    for recs in groups.values():
        yield recs[0]["strategy"], recs[0]["settings"], recs[0]["options"], recs


def tune_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    log_path = args.out_dir / f"tuning_{evallib.label(name)}.jsonl"
    seeds = args.seeds
    jobs = [{"phase": "validation", "strategy": s, "settings": c, "options": {}, "regime": r, "seed": seed}
            for s in args.strategies for c in candidates(s, args.budget)
            for r in evallib.REGIME_SETTINGS for seed in seeds]
    records = evallib.run_jobs(name, jobs, log_path, args.jobs, args.backbone)
    chosen: dict[str, dict[str, Any]] = {}
    table: dict[str, list[dict[str, Any]]] = {}
    for strategy, settings, _, recs in by_candidate(records):
        table.setdefault(strategy, []).append({"settings": settings, "validation_mean": mean_score(recs),
                                               "per_regime": {r: mean_score([x for x in recs if x["regime"] == r])
                                                              for r in evallib.REGIME_SETTINGS}})
    for strategy, rows in table.items():
        rows.sort(key=lambda row: -row["validation_mean"])
        chosen[strategy] = {"settings": rows[0]["settings"], "options": {},
                            "validation_mean": rows[0]["validation_mean"]}
    if not args.no_options:
        jobs = [{"phase": "validation", "strategy": s, "settings": chosen[s]["settings"], "options": o, "regime": r,
                 "seed": seed}
                for s in args.strategies for o in OPTION_SETS.values()
                for r in evallib.REGIME_SETTINGS for seed in seeds]
        option_records = evallib.run_jobs(name, jobs, log_path, args.jobs, args.backbone)
        for strategy, _, options, recs in by_candidate(option_records):
            score = mean_score(recs)
            chosen[strategy].setdefault("option_scores", {})[json.dumps(options, sort_keys=True)] = score
            if score > chosen[strategy]["validation_mean"]:
                chosen[strategy].update(options=options, validation_mean=score)
    everything = records + (option_records if not args.no_options else [])
    for strategy, c in chosen.items():  # the chosen configuration's score per (regime, seed): for paired tests
        c["cells"] = {f"{r['regime']}/{r['seed']}": r["mean"] for r in everything
                      if r["strategy"] == strategy and r["settings"] == c["settings"] and r["options"] == c["options"]}
    return {"seeds": list(seeds), "budget": args.budget, "candidates": table, "chosen": chosen}


def choose_default(doc: dict[str, Any], eligible: list[str], means: dict[str, float]) -> tuple[str, dict[str, Any]]:
    """The eligible strategy with the best validation mean, if it beats the current default significantly: the
    paired difference over every (dataset, regime, tuning seed) cell, a t interval that excludes zero. Otherwise
    the current default stays: a change of default is a change for every fleet, not worth a difference that the
    tuning seeds cannot tell from noise."""
    best = max(eligible, key=lambda s: means[s])
    if best == DEFAULT_STRATEGY:
        return best, {"challenger": None}
    diffs = [d["chosen"][best]["cells"][k] - d["chosen"][DEFAULT_STRATEGY]["cells"][k]
             for d in doc["datasets"].values() for k in d["chosen"][best]["cells"]]
    interval = t_interval(diffs)
    verdict = {"challenger": best, "difference": asdict(interval), "cells": len(diffs), "text": interval.points()}
    return (best if interval.low > 0 else DEFAULT_STRATEGY), verdict


def default_reason(doc: dict[str, Any]) -> str:
    test = doc.get("default_test") or {}
    if not test.get("challenger"):
        return ": the best validation mean among the strategies that give a new user a head"
    moved = doc["default_strategy"] == test["challenger"]
    return (f": {test['challenger']} has the best validation mean among the strategies that give a new user a head, "
            f"{test['text']} points against {doc['previous_default']} over {test['cells']} paired (dataset, regime, "
            "seed) cells, " + ("significant: it becomes the default" if moved
                               else "no significant difference: the default stays"))


def markdown(doc: dict[str, Any]) -> str:
    seeds = sorted({s for d in doc["datasets"].values() for s in d["seeds"]})
    lines = ["# Settings chosen on validation data", "",
             "Validation phase only, in each federated user's training period: HAPT trains on the earlier bouts "
             "of each activity of the user's FIRST session and scores the last bout (the second session is the "
             "test session); watch scores the later quarter of the earlier 70 % of each recording (the later 30 % "
             f"is the test part). Tuning seeds {seeds}, {TrainingConfig().rounds} rounds, mean over the four "
             "partition regimes; configurations tried per strategy: "
             + ", ".join(f"{n} {d.get('budget', doc.get('budget'))}" for n, d in doc["datasets"].items())
             + " (the strategy's defaults and a seeded sample of its grid). No test window and no new user was read. "
             f"Default strategy: **{doc['default_strategy']}** (was {doc['previous_default']})"
             + default_reason(doc) + ".", ""]
    for name, d in doc["datasets"].items():
        lines += [f"## {name}", "", "| strategy | validation mean % | settings | device options | tried |",
                  "|---|---|---|---|---|"]
        for strategy, c in sorted(d["chosen"].items(), key=lambda kv: -kv[1]["validation_mean"]):
            settings = ", ".join(f"{k}={v}" for k, v in c["settings"].items())
            options = ", ".join(f"{k}" for k in c["options"]) or "none"
            lines.append(f"| {strategy} | {100 * c['validation_mean']:.1f} | {settings} | {options} | "
                         f"{len(d['candidates'][strategy])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="both", metavar="NAME|DIR",
                    help="watch, hapt, both (default), or a per-user dataset directory")
    ap.add_argument("--backbone", type=Path, help="with --data DIR: the model that embeds its windows")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--budget", type=int, default=12, help="configurations tried per strategy (default 12)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(evallib.TUNING_SEEDS[:2]))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--no-options", action="store_true", help="skip the device options (stage 2)")
    ap.add_argument("--out-dir", type=Path, default=evallib.RESULTS)
    args = ap.parse_args(argv)
    if set(args.seeds) & set(evallib.TEST_SEEDS):
        ap.error(f"tuning seeds {args.seeds} overlap the report's test seeds {list(evallib.TEST_SEEDS)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = evallib.dataset_names(args.data)
    out = args.out_dir / "tuning.json"
    doc: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"datasets": {}}
    for name in names:
        doc["datasets"][evallib.label(name)] = tune_dataset(name, args)
    means = {s: float(np.mean([d["chosen"][s]["validation_mean"] for d in doc["datasets"].values()
                               if s in d["chosen"]])) for s in args.strategies}
    eligible = [s for s in means if serves_new_users(s)]
    default, verdict = choose_default(doc, eligible, means)
    doc.update(default_strategy=default, default_scores=means, default_candidates=eligible, default_test=verdict,
               previous_default=DEFAULT_STRATEGY, tuned_fields=list(TUNED_FIELDS),
               training_fields=[f.name for f in fields(TrainingConfig)], budget=args.budget,
               base_config=asdict(TrainingConfig()), environment=benchlib.environment())
    out.write_text(json.dumps(doc, indent=1, sort_keys=True))
    md = markdown(doc)
    (args.out_dir / "tuning.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
