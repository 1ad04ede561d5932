"""Choose every setting on VALIDATION data, and record the search: hyperparameters per strategy, then the
device-side options (per-user standardization, few-label augmentation), then the default strategy.

The protocol (edge_agent/evaluation/protocol.py) trains on each federated user's TRAIN windows and scores its
VALIDATION windows (phase "validation"); no test window and no new user is read here. The seeds are
bench/evallib.TUNING_SEEDS, never the seeds the report uses. Every run is appended to
bench/results/tuning_<dataset>.jsonl as it finishes (a rerun skips what is there), and the choices go to
bench/results/tuning.json, which bench/strategies.py reads.

    .venv/bin/python bench/tune.py                    # both datasets; about 1.5 hours on 2 cores
    .venv/bin/python bench/tune.py --data hapt --jobs 2

How a choice is made (edge_agent/evaluation/selection.py). This is the rule's second version: the first (best
mean on two seeds) chose ditto at lr 0.001 on HAPT, which the first test report exposed (its global head, what a
new user gets, near chance with five labels per class); the README says so.
1. screen: every configuration tried (the strategy's current defaults plus a seeded sample of its grid,
   `--budget`) runs on the first two tuning seeds, in the four partition regimes;
2. finalists: the three best of each strategy by personalized mean (plus the best by new-user head, for a
   strategy that gives one) run on the three other tuning seeds, fresh: they alone choose, since the screening
   seeds made the finalists and would favour whichever got lucky there;
3. choose: the best mean over regimes, one configuration per strategy and dataset (a fleet does not know its
   regime in advance), among those that keep their floors, in no regime significantly below (by more than one
   point, paired over seeds):
   - the tuned local baseline, in personalized accuracy (FedAvg, the shared baseline, is exempt);
   - for a strategy that gives a new user a head: tuned FedAvg's global head, in that head's accuracy on a
     stand-in for new users (every federated user's whole validation part, with the population's statistics).
   Local is chosen first, then FedAvg, then the others; if every finalist breaks a floor, the one nearest its
   floors is kept and flagged.
4. device options (per-user standardization, augmentation, both) are tried on each choice and kept only if they
   raise the mean and keep the floors.
The default strategy is the one with the best mean over both datasets among those that give a new user a head
(`serves_new_users`: a user who has labelled nothing yet gets only what the fleet shares) and keep their floors,
and it replaces the current default only if its lead is significant (paired per dataset and seed, Bonferroni
for the number of challengers), or if the current default breaks a floor.
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

from edge_agent.evaluation.selection import (
    FLOOR_MARGIN,
    Floor,
    cell_key,
    choose,
    choose_default,
    finalists,
    mean_over_regimes,
)
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
RULE = 2  # this choice rule's version: a tuning.json entry chosen by another rule is never mixed with its own


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
    """One configuration's validation cells: its personalized accuracy, and its new-user head's (if any) on the
    protocol's stand-in for new users."""

    personal: dict[str, float]
    new_user: dict[str, float]


def floors(strategy: str, m: Measured, refs: dict[str, Measured]) -> list[Floor]:
    """The floors a configuration of `strategy` must keep against the baselines' `refs`. FedAvg is the reference
    for a shared model and is held to none: one model for all cannot match local training on each user's own
    windows, and asking it to would only make its choice a fallback."""
    out = []
    if strategy not in (BASELINE, SHARED_BASELINE) and BASELINE in refs:
        out.append(Floor("personalized vs local", m.personal, refs[BASELINE].personal))
    if m.new_user and strategy != SHARED_BASELINE and SHARED_BASELINE in refs:
        out.append(Floor("new-user head vs fedavg's", m.new_user, refs[SHARED_BASELINE].new_user))
    return out


def pick_finalists(screened: list[Measured], count: int) -> list[int]:
    """The `count` best by personalized mean, plus, for a strategy that gives new users a head, the best by that
    head if it is not among them: a finalist list that cannot keep the new-user floor would leave the choice to
    the fallback."""
    picked = finalists([m.personal for m in screened], count)
    if all(m.new_user for m in screened):
        best_head = finalists([m.new_user for m in screened], 1)[0]
        picked += [best_head] if best_head not in picked else []
    return picked


def tune_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Screen every candidate on the first seeds; the finalists run on the other, fresh seeds, which alone choose
    (the screening seeds made them finalists: reusing them would favour whichever got lucky there). Each strategy's
    configuration is chosen against the baselines' configuration-stage cells (local first, then FedAvg, then the
    others), then its device options against the baselines' final cells."""
    log_path = args.out_dir / f"tuning_{evallib.label(name)}.jsonl"
    screen, confirm = list(args.seeds[:args.screen_seeds]), list(args.seeds[args.screen_seeds:])
    tried = {s: candidates(s, args.budget) for s in args.strategies}

    def run(jobs: list[dict[str, Any]]) -> dict[str, Measured]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in evallib.run_jobs(name, jobs, log_path, args.jobs, args.backbone):
            groups.setdefault(config_key(r["strategy"], r["settings"], r["options"]), []).append(r)
        return {k: Measured(cells_of(v), cells_of(v, "new_user_proxy")) for k, v in groups.items()}

    screened = run([j for s, cs in tried.items() for c in cs for j in validation_jobs(s, c, {}, screen)])
    table: dict[str, list[dict[str, Any]]] = {}
    final: dict[str, list[int]] = {}
    for s, cs in tried.items():
        measured = [screened[config_key(s, c, {})] for c in cs]
        final[s] = pick_finalists(measured, args.finalists)
        table[s] = [{"settings": c, "screen_mean": mean_over_regimes(m.personal),
                     "screen_new_user": mean_over_regimes(m.new_user) if m.new_user else None,
                     "per_regime": {r: float(np.mean([m.personal[cell_key(r, x)] for x in screen]))
                                    for r in evallib.REGIME_SETTINGS}, "finalist": i in final[s]}
                    for i, (c, m) in enumerate(zip(cs, measured, strict=True))]
    confirmed = run([j for s, cs in tried.items() for i in final[s] for j in validation_jobs(s, cs[i], {}, confirm)])

    chosen: dict[str, dict[str, Any]] = {}
    config_refs: dict[str, Measured] = {}  # the baselines as configured, without options: the configuration floors
    final_refs: dict[str, Measured] = {}  # the baselines with their options: the options floors
    baselines = [s for s in (BASELINE, SHARED_BASELINE) if s in tried]
    batches = [[s] for s in baselines] + [[s for s in args.strategies if s not in baselines]]
    for batch in filter(None, batches):
        for s in batch:  # the configuration, among the finalists
            configs = [tried[s][i] for i in final[s]]
            measured = [confirmed[config_key(s, c, {})] for c in configs]
            pick = choose([m.personal for m in measured], [floors(s, m, config_refs) for m in measured])
            for i, m in zip(final[s], measured, strict=True):
                table[s][i]["confirm_mean"] = mean_over_regimes(m.personal)
            config_refs[s] = best = measured[pick.index]
            chosen[s] = {"settings": configs[pick.index], "options": {}, "validation_mean": pick.score,
                         "cells": best.personal, "new_user_cells": best.new_user,
                         "breaks_floors": pick.all_below_floor,
                         "ruled_out": pick.describe([json.dumps(c, sort_keys=True) for c in configs])}
        if not args.no_options:
            with_options = run([j for s in batch for o in OPTION_SETS.values()
                                for j in validation_jobs(s, chosen[s]["settings"], o, confirm)])
        for s in batch:  # then the device options: kept only if they raise the mean and keep the floors
            if args.no_options:
                final_refs[s] = config_refs[s]
                continue
            sets: list[dict[str, Any]] = [{}, *OPTION_SETS.values()]
            measured = [config_refs[s]] + [with_options[config_key(s, chosen[s]["settings"], o)]
                                           for o in OPTION_SETS.values()]
            pick = choose([m.personal for m in measured], [floors(s, m, final_refs) for m in measured])
            final_refs[s] = measured[pick.index]
            chosen[s].update(options=sets[pick.index], validation_mean=pick.score,
                             cells=measured[pick.index].personal, new_user_cells=measured[pick.index].new_user,
                             breaks_floors=pick.all_below_floor,
                             option_scores={json.dumps(o, sort_keys=True): mean_over_regimes(m.personal)
                                            for o, m in zip(sets[1:], measured[1:], strict=True)},
                             options_ruled_out=pick.describe([json.dumps(o, sort_keys=True) for o in sets]))
    for c in chosen.values():
        c["new_user_mean"] = mean_over_regimes(c["new_user_cells"]) if c["new_user_cells"] else None
    return {"rule": RULE, "seeds": list(args.seeds), "screen_seeds": screen, "confirm_seeds": confirm,
            "finalists": args.finalists, "budget": args.budget,
            "floors": {"personalized": BASELINE, "new-user head": SHARED_BASELINE, "margin": FLOOR_MARGIN},
            "candidates": table, "chosen": chosen}


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Settings chosen on validation data", "",
             "Validation phase only, in each federated user's training period: HAPT trains on the earlier bouts "
             "of each activity of the user's FIRST session and scores the last bout (the second session is the "
             "test session); watch scores the later quarter of the earlier 70 % of each recording (the later 30 % "
             f"is the test part). No test window and no new user was read. {TrainingConfig().rounds} rounds.", "",
             f"This is the rule's version {doc['rule']}. The first (the best mean on two seeds) chose ditto at "
             "lr 0.001 on HAPT; the first test report then showed its global head, what a new user gets, near chance "
             "with five labels per class. The floors and the fresh seeds below were added after that reading of "
             "the test set (README, 'Which strategy').", "",
             "How each choice was made (bench/tune.py, edge_agent/evaluation/selection.py):",
             "- screening: up to " + ", ".join(f"{d['budget']} ({n})" for n, d in doc["datasets"].items())
             + " configurations per strategy (its defaults and a seeded sample of its grid) on seeds "
             + ", ".join(f"{d['screen_seeds']} ({n})" for n, d in doc["datasets"].items()) + ";",
             "- finalists: the " + ", ".join(f"{d['finalists']} ({n})" for n, d in doc["datasets"].items())
             + " best of each strategy by personalized mean, plus the best by new-user head where that one is "
             "not among them, run again on the fresh seeds "
             + ", ".join(f"{d['confirm_seeds']} ({n})" for n, d in doc["datasets"].items())
             + ", which alone choose;",
             "- the choice: the best mean over the four partition regimes among the finalists that keep their "
             f"floors: in no regime significantly below (by more than {100 * FLOOR_MARGIN:.0f} point, 95 % interval "
             "paired over seeds) the tuned local baseline's personalized accuracy, nor, for a strategy that gives a "
             "new user a head, tuned FedAvg's global head. That head is scored on a stand-in for new users: every "
             "federated user's whole validation part, with the population's statistics (\"new-user head\" "
             "below). If every finalist breaks a floor, the one nearest its floors is kept, flagged;",
             "- device options (per-user standardization, augmentation, both) on the chosen configuration, kept "
             "only if they raise the mean and keep the floors;",
             f"- the default strategy: **{doc['default_strategy']}** (was {doc['previous_default']}): "
             + doc["default_test"]["text"] + ".", ""]
    for name, d in doc["datasets"].items():
        lines += [f"## {name}", "", "| strategy | validation mean % | new-user head % | settings | device options "
                  "| floors | tried |", "|---|---|---|---|---|---|---|"]
        for strategy, c in sorted(d["chosen"].items(), key=lambda kv: -kv[1]["validation_mean"]):
            settings = ", ".join(f"{k}={v}" for k, v in c["settings"].items())
            options = ", ".join(f"{k}" for k in c["options"]) or "none"
            head = "-" if c.get("new_user_mean") is None else f"{100 * c['new_user_mean']:.1f}"
            kept = "**broken** (nearest kept)" if c["breaks_floors"] else "kept"
            lines.append(f"| {strategy} | {100 * c['validation_mean']:.1f} | {head} | {settings} | {options} | "
                         f"{kept} | {len(d['candidates'][strategy])} |")
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
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                    help=f"default: all; any subset must hold {BASELINE}, {SHARED_BASELINE} and {DEFAULT_STRATEGY} "
                         "(the floors and the default need them), and the report (strategies.py) needs all")
    ap.add_argument("--budget", type=int, default=12, help="configurations tried per strategy (default 12)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(evallib.TUNING_SEEDS),
                    help=f"tuning seeds (default {' '.join(map(str, evallib.TUNING_SEEDS))})")
    ap.add_argument("--screen-seeds", type=int, default=2, metavar="N",
                    help="every candidate runs on the first N seeds; the finalists on the rest (default 2)")
    ap.add_argument("--finalists", type=int, default=3, metavar="N",
                    help="the N best of each strategy go on to the other seeds (default 3)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--no-options", action="store_true", help="skip the device options (stage 2)")
    ap.add_argument("--out-dir", type=Path, default=evallib.RESULTS)
    args = ap.parse_args(argv)
    if not 1 <= args.screen_seeds <= len(args.seeds) - 2:
        ap.error(f"--screen-seeds {args.screen_seeds}: at least 1, and at least 2 of the {len(args.seeds)} seeds "
                 "left for the finalists (a floor pairs over seeds)")
    if set(args.seeds) & set(evallib.TEST_SEEDS):
        ap.error(f"tuning seeds {args.seeds} overlap the report's test seeds {list(evallib.TEST_SEEDS)}")
    missing = [s for s in (BASELINE, SHARED_BASELINE, DEFAULT_STRATEGY) if s not in args.strategies]
    if missing:
        ap.error(f"--strategies without {', '.join(missing)}: the floors and the default are measured against them")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = evallib.dataset_names(args.data)
    out = args.out_dir / "tuning.json"
    doc: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"datasets": {}}
    for name in names:
        doc["datasets"][evallib.label(name)] = tune_dataset(name, args)
    stale = [n for n, d in doc["datasets"].items() if d.get("rule") != RULE]
    for n in stale:  # chosen by another rule: never mixed into this one's default
        evallib.log(f"tuning.json: the {n} entry was chosen by an earlier rule and is dropped; "
                    f"run bench/tune.py --data {n} again")
        del doc["datasets"][n]
    common = set.intersection(*(set(d["chosen"]) for d in doc["datasets"].values()))
    means = {s: float(np.mean([d["chosen"][s]["validation_mean"] for d in doc["datasets"].values()]))
             for s in sorted(common)}
    eligible = [s for s in means if serves_new_users(s)
                and not any(d["chosen"][s]["breaks_floors"] for d in doc["datasets"].values())]
    default, verdict = choose_default(DEFAULT_STRATEGY, eligible, means, {
        s: {name: d["chosen"][s]["cells"] for name, d in doc["datasets"].items()} for s in eligible})
    doc.update(default_strategy=default, default_scores=means, default_candidates=eligible, default_test=verdict,
               previous_default=DEFAULT_STRATEGY, tuned_fields=list(TUNED_FIELDS),
               training_fields=[f.name for f in fields(TrainingConfig)], rule=RULE,
               base_config=asdict(TrainingConfig()), environment=benchlib.environment())
    out.write_text(json.dumps(doc, indent=1, sort_keys=True))
    md = markdown(doc)
    (args.out_dir / "tuning.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
