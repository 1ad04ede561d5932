"""The report: every strategy, at the settings chosen on validation (bench/tune.py), on both datasets, on the
TEST windows over 10 seeds nobody tuned on; paired differences per user with 95 % intervals. (The choice rule
was revised once after a reading of these test windows; the README says so.)

    .venv/bin/python bench/tune.py          # first: the choices (bench/results/tuning.json)
    .venv/bin/python bench/strategies.py    # then the report: bench/results/strategies.{json,md} and plots

What is compared, per dataset and partition regime:
- every strategy at its tuned settings and device options; against the TUNED local baseline (local training
  only, chosen on validation like everything else) and against FedAvg, as paired differences (same seed, same
  user) with a t interval over seeds (edge_agent/evaluation/stats.py). A difference is stated only where that
  interval excludes zero; otherwise "no difference".
- the few-label curve (1, 2, 5, 10 labelled windows per class);
- device options, each switched off from the default strategy's tuned choice, and on for local training;
- HAPT is cut for adaptation over time: each user's first session trains, the next one tests;
- watch: a held-out recording instead of the later part of each recording, as a robustness check (the settings
  were tuned on the first 70 % of every recording, these test recordings included: not a clean test);
- fairness: each user's accuracy under every strategy, the worst users by name, and what predicts them (how
  well the population's class means, from the backbone's own users, classify that user's windows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import evallib

from edge_agent.evaluation.protocol import TEST_BY, VALIDATION_BY
from edge_agent.evaluation.stats import Accuracies, paired_difference, spread
from edge_agent.learning.strategies import STRATEGIES
from edge_agent.learning.training import TrainingConfig

CURVE_SHOTS = (1, 2, 5, 10)
CURVE_EXTRA = ("fedavg",)  # beside the default strategy and local
SHIFT_STRATEGIES = ("local", "fedavg")  # beside the default strategy, under the other protocols
SHIFTS = {"watch": {"new-recording": {"test_by": "session", "validation_by": "segment"}}}
SHIFT_REGIMES = ("natural", "few-shot")
OPTION_REGIMES = ("few-shot",)  # where few labels make the device options matter (and copies are cheap)


def accuracies(records: list[dict[str, Any]]) -> Accuracies:
    return {int(r["seed"]): r["users"] for r in records}


def jobs_for(strategy: str, choice: dict[str, Any], regime: str, seeds: tuple[int, ...], **extra: Any
             ) -> list[dict[str, Any]]:
    return [{"phase": "test", "strategy": strategy, "settings": choice["settings"], "options": choice["options"],
             "regime": regime, "seed": s, **extra} for s in seeds]


def plan(name: str, tuning: dict[str, Any], seeds: tuple[int, ...]) -> dict[str, list[dict[str, Any]]]:
    """Every group of runs the report needs, by a label: "<regime>/<strategy>", "curve/<K>/<strategy>",
    "option/<regime>/<strategy>/<option off or on>", "shift/<protocol>/<regime>/<strategy>"."""
    chosen = tuning["datasets"][name]["chosen"]
    default = tuning["default_strategy"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for regime in evallib.REGIME_SETTINGS:
        for strategy in STRATEGIES:
            groups[f"{regime}/{strategy}"] = jobs_for(strategy, chosen[strategy], regime, seeds)
    for k in CURVE_SHOTS:
        for strategy in dict.fromkeys((default, "local", *CURVE_EXTRA)):
            # K = the regime's own shots: the very runs of the few-shot table (the same job, run once).
            extra = {} if k == evallib.REGIME_SETTINGS["few-shot"].shots else {"shots": k}
            groups[f"curve/{k}/{strategy}"] = jobs_for(strategy, chosen[strategy], "few-shot", seeds, **extra)
    for strategy in dict.fromkeys((default, "local")):
        on = chosen[strategy]["options"]
        for option in ("per_user_standardization", "augment"):
            flipped = dict(on)
            if option in flipped:
                flipped.pop(option)
            else:
                flipped[option] = True if option == "per_user_standardization" else "default"
            for regime in OPTION_REGIMES:
                groups[f"option/{regime}/{strategy}/{option}"] = jobs_for(
                    strategy, {"settings": chosen[strategy]["settings"], "options": flipped}, regime, seeds)
    for label, protocol in SHIFTS.get(name, {}).items():
        for regime in SHIFT_REGIMES:
            for strategy in dict.fromkeys((default, *SHIFT_STRATEGIES)):
                groups[f"shift/{label}/{regime}/{strategy}"] = jobs_for(strategy, chosen[strategy], regime, seeds,
                                                                        protocol=protocol)
    return groups


def comparison(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    d = paired_difference(accuracies(a), accuracies(b))
    up, down = d.users_significant()
    return {"seeds": asdict(d.seeds), "users": asdict(d.users), "verdict": d.verdict,
            "worst_user": asdict(d.worst_user), "worst_user_verdict": d.worst_user.verdict,
            "per_user": {u: asdict(i) for u, i in d.per_user.items()}, "users_higher": up, "users_lower": down,
            "text": d.seeds.points()}


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    s = spread(accuracies(records))
    new = [r["new_user"] for r in records if r["new_user"] is not None]
    return {"mean": asdict(s.mean), "per_user": dict(s.per_user), "worst_user": s.worst_user,
            "worst_user_acc": s.per_user[s.worst_user], "worst_quarter_mean": s.worst_quarter_mean,
            "best_minus_worst": s.best_minus_worst,
            "new_user": float(np.mean(new)) if new else None,
            "new_user_range": [float(min(new)), float(max(new))] if new else None,
            "uplink": float(np.mean([r["uplink"] for r in records]))}


def population_fit(bench: evallib.BenchData) -> dict[str, float]:
    """Per federated user: the accuracy of the nearest class mean of the PRETRAIN users' standardized
    embeddings on all of the user's windows: how well what the backbone learnt from its own users carries
    over to this one, before any federated training."""
    prepared = bench.prepared
    std, card = prepared.standardizer, prepared.dataset.card
    if not card.roles.pretrain:
        return {}  # no pretrain users: nothing to measure the fit against (the report says so)
    x = np.concatenate([std(prepared.features[u]) for u in card.roles.pretrain])
    y = np.concatenate([prepared.dataset.users[u].y for u in card.roles.pretrain])
    # A class the pretrain users lack has no mean: it is never guessed (its distance is infinite).
    means = np.stack([x[y == c].mean(axis=0) if (y == c).any() else np.full(x.shape[1], np.inf)
                      for c in range(card.num_classes)])
    out = {}
    for u in card.roles.federate:
        e = std(prepared.features[u])
        guess = np.argmin(((e[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        out[u] = float(np.mean(guess == prepared.dataset.users[u].y))
    return out


def rank_correlation(a: dict[str, float], b: dict[str, float]) -> float:
    users = sorted(a)
    ra = np.argsort(np.argsort([a[u] for u in users]))
    rb = np.argsort(np.argsort([b[u] for u in users]))
    return float(np.corrcoef(ra, rb)[0, 1])


def report_dataset(name: str, tuning: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    seeds = tuple(args.seeds)
    key = evallib.label(name)
    groups = plan(key, tuning, seeds)
    flat = [j for g in groups.values() for j in g]
    unique = list({evallib.job_key(j): j for j in flat}.values())
    done = evallib.run_jobs(name, unique, args.out_dir / f"strategies_{key}.jsonl", args.jobs, args.backbone)
    by_key = {evallib.job_key(r): r for r in done}
    res = {label: [by_key[evallib.job_key(j)] for j in g] for label, g in groups.items()}
    default = tuning["default_strategy"]
    doc: dict[str, Any] = {"regimes": {}, "curve": {}, "options": {}, "shifts": {}}
    for regime in evallib.REGIME_SETTINGS:
        rows = {}
        for strategy in STRATEGIES:
            own = res[f"{regime}/{strategy}"]
            rows[strategy] = {**summary(own),
                              "vs_local": comparison(own, res[f"{regime}/local"]) if strategy != "local" else None,
                              "vs_fedavg": comparison(own, res[f"{regime}/fedavg"]) if strategy != "fedavg" else None}
        doc["regimes"][regime] = rows
    for k in CURVE_SHOTS:
        doc["curve"][k] = {s: {**summary(res[f"curve/{k}/{s}"]),
                               "vs_local": comparison(res[f"curve/{k}/{s}"], res[f"curve/{k}/local"])
                               if s != "local" else None}
                           for s in dict.fromkeys((default, "local", *CURVE_EXTRA))}
    for label in groups:
        if label.startswith("option/"):
            _, regime, strategy, option = label.split("/")
            doc["options"].setdefault(strategy, {}).setdefault(option, {})[regime] = {
                "chosen_has_it": option in tuning["datasets"][key]["chosen"][strategy]["options"],
                "chosen_minus_flipped": comparison(res[f"{regime}/{strategy}"], res[label])}
    for label in groups:
        if label.startswith("shift/"):
            _, protocol, regime, strategy = label.split("/")
            own = res[label]
            entry = {**summary(own)}
            if strategy != "local":
                entry["vs_local"] = comparison(own, res[f"shift/{protocol}/{regime}/local"])
            doc["shifts"].setdefault(protocol, {}).setdefault(regime, {})[strategy] = entry
    bench = evallib.load(name, args.backbone)
    fit = population_fit(bench)
    natural = doc["regimes"]["natural"]
    doc["fairness"] = {
        "population_fit": fit,
        "rank_correlation_with_fit": {s: rank_correlation(natural[s]["per_user"], fit) for s in STRATEGIES}
        if fit else {},
        "worst_users": {s: natural[s]["worst_user"] for s in STRATEGIES},
        "users": {u: len(bench.prepared.dataset.users[u]) for u in bench.prepared.dataset.card.roles.federate},
    }
    doc["protocol"] = asdict(bench.protocol)
    doc["backbone_sha256"] = bench.backbone.sha256
    return doc


def targets(doc: dict[str, Any], default: str) -> list[dict[str, Any]]:
    out = []
    for name, d in doc["datasets"].items():
        below = [r for r, rows in d["regimes"].items() if rows[default]["vs_local"]["verdict"] == "lower"]
        below += [f"K={k}" for k, rows in d["curve"].items() if rows[default]["vs_local"]["verdict"] == "lower"]
        out.append({"target": f"{name}: {default} never significantly below tuned local", "met": not below,
                    "detail": "below in " + ", ".join(below) if below else "in no regime or K"})
        raised = [r for r, rows in d["regimes"].items() if rows[default]["vs_local"]["worst_user_verdict"] == "higher"]
        out.append({"target": f"{name}: the worst user's accuracy raised over local (worst user per seed, paired)",
                    "met": bool(raised), "detail": ", ".join(raised) or "in no regime"})
    above = {name: [k for k in (1, 2) if d["curve"][k][default]["vs_local"]["verdict"] == "higher"]
             for name, d in doc["datasets"].items()}
    out.append({"target": f"{default} significantly above local at 1 and 2 labels per class on a dataset",
                "met": any(len(v) == 2 for v in above.values()),
                "detail": "; ".join(f"{n}: K={v}" for n, v in above.items())})
    if "hapt" in doc["datasets"]:
        # A new user arrives whatever regime the fleet trained in: the target is checked in each of them.
        per_regime = {r: rows[default]["new_user"] for r, rows in doc["datasets"]["hapt"]["regimes"].items()}
        missed = [r for r, v in per_regime.items() if not (v and v >= 0.85)]
        out.append({"target": "HAPT: a held-out new user at 85 % or more, in every regime", "met": not missed,
                    "detail": ", ".join(f"{r} {pct(v)} %" for r, v in per_regime.items())
                    + " (the 5 new users' windows, mean over seeds)"})
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def diff_cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    word = {"higher": "**higher**", "lower": "**lower**", "no difference": "no diff."}[c["verdict"]]
    return f"{c['text']} {word}"


def markdown(doc: dict[str, Any]) -> str:
    default = doc["default_strategy"]
    seeds = doc["seeds"]
    lines = [f"# Strategies on unseen data: {len(seeds)} test seeds {seeds[0]}-{seeds[-1]}, settings chosen on "
             "validation", "",
             f"Accuracy (%) on each federated user's TEST windows, int8 heads, {TrainingConfig().rounds} rounds. "
             "Differences are paired "
             "(same seed, same user) in accuracy points, with the 95 % t interval over seeds; **higher** / "
             "**lower** only where it excludes zero. \"worst user\": lowest mean over seeds, by name; \"worst 1/4\": "
             "mean of the lowest quarter of users. Settings: bench/results/tuning.md. "
             f"Default strategy (chosen on validation): **{default}**.", ""]
    for name, d in doc["datasets"].items():
        p = d["protocol"]
        lines += [f"## {name}", "", f"Test split: {TEST_BY[p['test_by']]}; validation: "
                  f"{VALIDATION_BY[p['validation_by']]}. The test windows are the same for every seed (a seed "
                  "draws the partition, the shots and the initialisation); no window the tuning read is among them.",
                  ""]
        for regime, rows in d["regimes"].items():
            lines += [f"### {regime}", "",
                      "| strategy | mean [95 % CI] | vs tuned local | vs fedavg | worst user | worst 1/4 | best-worst "
                      "| new user | uplink B |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for s, r in rows.items():
                m = r["mean"]
                star = " (default)" if s == default else ""
                lines.append(f"| {s}{star} | {pct(m['mean'])} [{pct(m['low'])}, {pct(m['high'])}] | "
                             f"{diff_cell(r['vs_local'])} | {diff_cell(r['vs_fedavg'])} | "
                             f"{r['worst_user']} {pct(r['worst_user_acc'])} | {pct(r['worst_quarter_mean'])} | "
                             f"{pct(r['best_minus_worst'])} | {pct(r['new_user'])} | {r['uplink']:.0f} |")
            lines.append("")
        lines += ["### Few labels per class (few-shot regime, K labelled windows per class per user)", "",
                  "| K | " + " | ".join(d["curve"][CURVE_SHOTS[0]]) + " |",
                  "|---|" + "---|" * len(d["curve"][CURVE_SHOTS[0]])]
        for k, rows in d["curve"].items():
            cells = [f"{pct(r['mean']['mean'])}" + (f" ({diff_cell(r['vs_local'])} vs local)" if r["vs_local"] else "")
                     for r in rows.values()]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines += ["", "### Device options (the chosen setting minus the setting flipped; test seeds)", "",
                  "| strategy | option | chosen on validation | " + " | ".join(OPTION_REGIMES) + " |",
                  "|---|---|---|" + "---|" * len(OPTION_REGIMES)]
        for s, opts in d["options"].items():
            for option, regimes in opts.items():
                has = next(iter(regimes.values()))["chosen_has_it"]
                cells = [diff_cell(regimes[r]["chosen_minus_flipped"]) for r in OPTION_REGIMES]
                lines.append(f"| {s} | {option} | {'on' if has else 'off'} | " + " | ".join(cells) + " |")
        for protocol, regimes in d["shifts"].items():
            lines += ["", f"### {protocol}: {TEST_BY[SHIFTS[name][protocol]['test_by']]} (a robustness check: the "
                      "tuning read the earlier part of these recordings)", "",
                      "| regime | strategy | mean [95 % CI] | vs tuned local | worst user |",
                      "|---|---|---|---|---|"]
            for regime, rows in regimes.items():
                for s, r in rows.items():
                    m = r["mean"]
                    lines.append(f"| {regime} | {s} | {pct(m['mean'])} [{pct(m['low'])}, {pct(m['high'])}] | "
                                 f"{diff_cell(r.get('vs_local'))} | {r['worst_user']} {pct(r['worst_user_acc'])} |")
        f = d["fairness"]
        nat = d["regimes"]["natural"]
        users = list(nat[default]["per_user"])
        lines += ["", "### Fairness: each user's accuracy (natural regime, mean over seeds)", "",
                  "| user | windows | population fit | " + " | ".join(STRATEGIES) + " |",
                  "|---|---|---|" + "---|" * len(STRATEGIES)]
        for u in sorted(users, key=lambda u: nat[default]["per_user"][u]):
            lines.append(f"| {u} | {f['users'][u]} | {pct(f['population_fit'].get(u))} | "
                         + " | ".join(pct(nat[s]["per_user"][u]) for s in STRATEGIES) + " |")
        lines += ["", "Population fit: nearest class mean of the backbone's own (pretrain) users on all of the "
                  "user's windows. Rank correlation of each strategy's per-user accuracy with it: "
                  + ", ".join(f"{s} {v:+.2f}" for s, v in f["rank_correlation_with_fit"].items()) + ".", ""]
    lines += ["## Targets", "", "| target | met | detail |", "|---|---|---|"]
    lines += [f"| {t['target']} | {'yes' if t['met'] else 'NO'} | {t['detail']} |" for t in doc["targets"]]
    return "\n".join(lines) + "\n"


def plot_curves(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        curve = doc["datasets"][name]["curve"]
        ks = list(curve)
        xs = np.arange(len(ks))
        for s in curve[ks[0]]:
            m = np.array([curve[k][s]["mean"]["mean"] for k in ks]) * 100
            lo = np.array([curve[k][s]["mean"]["low"] for k in ks]) * 100
            hi = np.array([curve[k][s]["mean"]["high"] for k in ks]) * 100
            line, = ax.plot(xs, m, marker="o", label=s + (" (default)" if s == doc["default_strategy"] else ""))
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xticks(xs, [str(k) for k in ks])
        ax.set_xlabel("labelled windows per class on each device (K)")
        ax.set_ylabel("test accuracy, mean over users (%)")
        ax.set_title(f"{name}: {len(doc['seeds'])} test seeds, band = 95 % CI over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="both", metavar="NAME|DIR",
                    help="watch, hapt, both (default), or a per-user dataset directory tuned by bench/tune.py")
    ap.add_argument("--backbone", type=Path, help="with --data DIR: the model that embeds its windows")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(evallib.TEST_SEEDS))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--tuning", type=Path, default=evallib.RESULTS / "tuning.json")
    ap.add_argument("--out-dir", type=Path, default=evallib.RESULTS)
    args = ap.parse_args(argv)
    if not args.tuning.exists():
        ap.error(f"{args.tuning} is missing: run bench/tune.py first (settings are chosen on validation data)")
    tuning = json.loads(args.tuning.read_text())
    if set(args.seeds) & {s for d in tuning["datasets"].values() for s in d["seeds"]}:
        ap.error("the test seeds overlap the seeds the settings were tuned on")
    names = evallib.dataset_names(args.data)
    missing = [n for n in names if evallib.label(n) not in tuning["datasets"]]
    if missing:
        ap.error(f"no tuned settings for {', '.join(missing)} in {args.tuning}: run bench/tune.py --data {missing[0]}")
    for name in names:
        entry = tuning["datasets"][evallib.label(name)]
        untuned = [s for s in STRATEGIES if s not in entry["chosen"]]
        if untuned:
            ap.error(f"{args.tuning}: no tuned settings for {', '.join(untuned)} on {evallib.label(name)}: run "
                     f"bench/tune.py --data {name} with every strategy")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"seeds": args.seeds, "default_strategy": tuning["default_strategy"], "datasets": {}}
    for name in names:
        doc["datasets"][evallib.label(name)] = report_dataset(name, tuning, args)
    doc["targets"] = targets(doc, tuning["default_strategy"])
    doc["elapsed_s"] = time.perf_counter() - t0
    doc["environment"] = benchlib.environment()
    (args.out_dir / "strategies.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    md = markdown(doc)
    (args.out_dir / "strategies.md").write_text(md)
    plot_curves(doc, args.out_dir / "few_shot_curve.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
