"""Choose every setting on VALIDATION data, and record the search: hyperparameters per strategy, then the
device-side options (per-user standardization, few-label augmentation), then the default strategy.

The protocol (edge_agent/evaluation/protocol.py) trains on each federated user's TRAIN windows and scores its
VALIDATION windows (phase "validation"); no test window and no new user is read here. The seeds are
bench/evallib.TUNING_SEEDS, never the seeds the report uses. Every run is appended to
bench/results/tuning_<dataset>.jsonl as it finishes (a rerun skips what is there), and the choices go to
bench/results/tuning.json, which bench/strategies.py reads.

    .venv/bin/python bench/tune.py                    # both datasets; about 1.5 hours on 2 cores
    .venv/bin/python bench/tune.py --data hapt --jobs 2

How a choice is made (edge_agent/evaluation/selection.py), fixed before any run:
1. screen: every configuration tried (the strategy's current defaults plus a seeded sample of its grid,
   `--budget`) runs on the first two tuning seeds, in the four partition regimes;
2. confirm: the three best of each strategy by that mean run on all five tuning seeds (two seeds hid a learning
   rate that collapses on some draws with five labels per class);
3. choose: the best mean over regimes and the five seeds, one configuration per strategy and dataset (a fleet
   does not know its regime in advance), among those that keep their floors, in no regime significantly below
   (by more than one point, paired over seeds):
   - the tuned local baseline, in personalized accuracy;
   - for a strategy that gives a new user a head: tuned FedAvg's global head, in that head's accuracy on the
     federated users' validation windows (the nearest validation has to a new user).
   Local is chosen first, then FedAvg, then the others.
4. device options (per-user standardization, augmentation, both) are tried on each choice and kept only if they
   raise the mean and keep the floors.
The default strategy is the one with the best mean over both datasets among those that give a new user a head
(`serves_new_users`: a user who has labelled nothing yet gets only what the fleet shares), and it replaces the
current default only if its lead is significant over the paired (dataset, regime, seed) cells.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import evallib

from edge_agent.evaluation.selection import FLOOR_MARGIN, Floor, cell_key, choose, finalists, mean_over_regimes
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


BASELINE = "local"  # every other strategy's personalized accuracy is held to it, regime by regime
SHARED_BASELINE = "fedavg"  # and the head a strategy gives a new user to FedAvg's global head


def cells_of(records: list[dict[str, Any]], measure: str = "mean") -> dict[str, float]:
    return {cell_key(r["regime"], r["seed"]): r[measure] for r in records if r.get(measure) is not None}


def config_key(strategy: str, settings: dict[str, Any], options: dict[str, Any]) -> str:
    return json.dumps([strategy, settings, options], sort_keys=True)


def validation_jobs(strategy: str, settings: dict[str, Any], options: dict[str, Any],
                    seeds: list[int]) -> list[dict[str, Any]]:
    return [{"phase": "validation", "strategy": strategy, "settings": settings, "options": options, "regime": r,
             "seed": seed} for r in evallib.REGIME_SETTINGS for seed in seeds]


@dataclass(frozen=True)
class Measured:
    """One configuration's validation cells: its personalized accuracy, and its new-user head's (if any)."""

    personal: dict[str, float]
    new_user: dict[str, float]


def floors(strategy: str, m: Measured, chosen: dict[str, dict[str, Any]]) -> list[Floor]:
    out = []
    if strategy != BASELINE and BASELINE in chosen:
        out.append(Floor("personalized vs local", m.personal, chosen[BASELINE]["cells"]))
    if m.new_user and strategy != SHARED_BASELINE and SHARED_BASELINE in chosen:
        out.append(Floor("new-user head vs fedavg's", m.new_user, chosen[SHARED_BASELINE]["new_user_cells"]))
    return out


def tune_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Screen every candidate on the first seeds, confirm the finalists on all of them, choose each strategy's
    configuration (the baselines first, then the others against their floors), then its device options the same
    way."""
    log_path = args.out_dir / f"tuning_{evallib.label(name)}.jsonl"
    seeds, screen = list(args.seeds), list(args.seeds[:args.screen_seeds])
    tried = {s: candidates(s, args.budget) for s in args.strategies}

    def run(jobs: list[dict[str, Any]]) -> dict[str, Measured]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in evallib.run_jobs(name, jobs, log_path, args.jobs, args.backbone):
            groups.setdefault(config_key(r["strategy"], r["settings"], r["options"]), []).append(r)
        return {k: Measured(cells_of(v), cells_of(v, "global")) for k, v in groups.items()}

    screened = run([j for s, cs in tried.items() for c in cs for j in validation_jobs(s, c, {}, screen)])
    table: dict[str, list[dict[str, Any]]] = {}
    final: dict[str, list[int]] = {}
    for s, cs in tried.items():
        cells = [screened[config_key(s, c, {})].personal for c in cs]
        final[s] = finalists(cells, args.finalists)
        table[s] = [{"settings": c, "screen_mean": mean_over_regimes(cells[i]),
                     "per_regime": {r: float(np.mean([cells[i][cell_key(r, x)] for x in screen]))
                                    for r in evallib.REGIME_SETTINGS}, "finalist": i in final[s]}
                    for i, c in enumerate(cs)]
    confirmed = run([j for s, cs in tried.items() for i in final[s] for j in validation_jobs(s, cs[i], {}, seeds)])

    chosen: dict[str, dict[str, Any]] = {}
    baselines = [s for s in (BASELINE, SHARED_BASELINE) if s in tried]
    batches = [[s] for s in baselines] + [[s for s in args.strategies if s not in baselines]]
    for batch in filter(None, batches):
        for s in batch:  # the configuration, among the finalists
            configs = [tried[s][i] for i in final[s]]
            measured = [confirmed[config_key(s, c, {})] for c in configs]
            pick = choose([m.personal for m in measured], [floors(s, m, chosen) for m in measured])
            for i, m in zip(final[s], measured, strict=True):
                table[s][i]["confirm_mean"] = mean_over_regimes(m.personal)
            best = measured[pick.index]
            chosen[s] = {"settings": configs[pick.index], "options": {}, "validation_mean": pick.score,
                         "cells": best.personal, "new_user_cells": best.new_user,
                         "ruled_out": pick.describe([json.dumps(c, sort_keys=True) for c in configs])}
        if args.no_options:
            continue
        with_options = run([j for s in batch for o in OPTION_SETS.values()
                            for j in validation_jobs(s, chosen[s]["settings"], o, seeds)])
        for s in batch:  # then the device options: kept only if they raise the mean and keep the floors
            sets: list[dict[str, Any]] = [{}, *OPTION_SETS.values()]
            measured = [Measured(chosen[s]["cells"], chosen[s]["new_user_cells"])] + [
                with_options[config_key(s, chosen[s]["settings"], o)] for o in OPTION_SETS.values()]
            pick = choose([m.personal for m in measured], [floors(s, m, chosen) for m in measured])
            chosen[s].update(options=sets[pick.index], validation_mean=pick.score,
                             cells=measured[pick.index].personal, new_user_cells=measured[pick.index].new_user,
                             option_scores={json.dumps(o, sort_keys=True): mean_over_regimes(m.personal)
                                            for o, m in zip(sets[1:], measured[1:], strict=True)},
                             options_ruled_out=pick.describe([json.dumps(o, sort_keys=True) for o in sets]))
    for c in chosen.values():
        c["new_user_mean"] = mean_over_regimes(c["new_user_cells"]) if c["new_user_cells"] else None
    return {"seeds": seeds, "screen_seeds": screen, "finalists": args.finalists, "budget": args.budget,
            "floors": {"personalized": BASELINE, "new-user head": SHARED_BASELINE, "margin": FLOOR_MARGIN},
            "candidates": table, "chosen": chosen}


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
             f"is the test part). {TrainingConfig().rounds} rounds. Configurations tried per strategy: "
             + ", ".join(f"{n} {d.get('budget', doc.get('budget'))}" for n, d in doc["datasets"].items())
             + " (the strategy's defaults and a seeded sample of its grid), each on tuning seeds "
             + ", ".join(f"{n} {d.get('screen_seeds')}" for n, d in doc["datasets"].items())
             + f"; the best {doc.get('finalists')} of each strategy then on seeds {seeds}. The choice: the best mean "
             "over the four partition regimes and those seeds, among configurations not significantly below the "
             f"tuned local baseline by more than {100 * FLOOR_MARGIN:.0f} point in any regime (paired over seeds). "
             "No test window and no new user was read. "
             f"Default strategy: **{doc['default_strategy']}** (was {doc['previous_default']})"
             + default_reason(doc) + ".", ""]
    for name, d in doc["datasets"].items():
        lines += [f"## {name}", "", "| strategy | validation mean % | new-user head % | settings | device options "
                  "| tried |", "|---|---|---|---|---|---|"]
        for strategy, c in sorted(d["chosen"].items(), key=lambda kv: -kv[1]["validation_mean"]):
            settings = ", ".join(f"{k}={v}" for k, v in c["settings"].items())
            options = ", ".join(f"{k}" for k in c["options"]) or "none"
            head = "-" if c.get("new_user_mean") is None else f"{100 * c['new_user_mean']:.1f}"
            lines.append(f"| {strategy} | {100 * c['validation_mean']:.1f} | {head} | {settings} | {options} | "
                         f"{len(d['candidates'][strategy])} |")
        default_rows = d["candidates"].get(doc["default_strategy"], [])
        if default_rows:  # candidate 0 is the strategy's shipped defaults (TrainingConfig)
            picked = d["chosen"][doc["default_strategy"]]["settings"]
            shipped, chosen_row = default_rows[0], next(r for r in default_rows if r["settings"] == picked)
            lines += ["", "The default strategy's shipped settings (TrainingConfig: "
                      + ", ".join(f"{k}={v}" for k, v in shipped["settings"].items())
                      + f") score {100 * shipped['screen_mean']:.1f} % on the screening seeds, the chosen ones "
                      f"{100 * chosen_row['screen_mean']:.1f} %."]
        notes = [f"- {strategy}: {line}" for strategy, c in d["chosen"].items()
                 for line in c.get("ruled_out", []) + c.get("options_ruled_out", [])]
        lines += ["", "Ruled out by a floor (paired difference in points, 95 % interval over seeds):", "", *notes] \
            if notes else []
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="both", metavar="NAME|DIR",
                    help="watch, hapt, both (default), or a per-user dataset directory")
    ap.add_argument("--backbone", type=Path, help="with --data DIR: the model that embeds its windows")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--budget", type=int, default=12, help="configurations tried per strategy (default 12)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(evallib.TUNING_SEEDS),
                    help=f"tuning seeds (default {' '.join(map(str, evallib.TUNING_SEEDS))})")
    ap.add_argument("--screen-seeds", type=int, default=2, metavar="N",
                    help="every candidate runs on the first N seeds (default 2)")
    ap.add_argument("--finalists", type=int, default=3, metavar="N",
                    help="the N best of each strategy run on all the seeds (default 3)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--no-options", action="store_true", help="skip the device options (stage 2)")
    ap.add_argument("--out-dir", type=Path, default=evallib.RESULTS)
    args = ap.parse_args(argv)
    if not 2 <= args.screen_seeds <= len(args.seeds):
        ap.error(f"--screen-seeds {args.screen_seeds}: between 2 and the {len(args.seeds)} seeds")
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
