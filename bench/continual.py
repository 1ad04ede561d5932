"""Adaptation over time on UCI HAPT: a device learns its user's first session, then its second session arrives.

    .venv/bin/python bench/continual.py     # bench/results/continual.{json,md,png}, about 5 minutes on one core

Every federated HAPT user recorded two sessions, each with two or three bouts of each of the six activities. Each
session is cut in time as the evaluation protocol cuts a training period (edge_agent/evaluation/protocol.py,
validation by "run"): its last bout of each activity is HELD OUT (never trained on), the other bouts TRAIN.

The fleet (the real aggregator and one real agent per user, edge_agent/sim.py) runs ROUNDS rounds. Until round
ARRIVAL_ROUND a device holds the training windows of its first session only; with round ARRIVAL_ROUND's task the
second session's arrive and it keeps training on what it holds (a StagedSource: what a files-fed device sees when
a new session's files land in its directory). After every round, each device's personalized head (the one its
telemetry scores) is scored on the held-out windows of each session. Scenarios:

- all: every training window of session 2 arrives, labelled, and every window is kept;
- all, capped: the same, with the device keeping at most `max_windows` windows, the oldest dropped first (as the
  files and serial sources do), the cap being the number of session 2's training windows of that user: session 1
  is evicted when session 2 arrives (and its oldest windows beyond the cap are never kept);
- few-label: only FEW_LABELS labelled windows per activity of session 2 arrive (drawn by the seed), beside all
  of session 1's.

Reported per strategy (the default, ditto; local training; FedAvg) over SEEDS, as paired differences per user with
95 % t intervals over seeds (edge_agent/evaluation/stats.py):
- BEFORE: accuracy on session 2's held-out windows after round ARRIVAL_ROUND - 1, trained on session 1 only;
- AFTER: the same at the last round; ADAPTATION = AFTER - BEFORE;
- FORGETTING: accuracy on session 1's held-out windows after round ARRIVAL_ROUND - 1 minus at the last round.
Training settings are TrainingConfig's defaults (the same for every strategy).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evallib

from edge_agent.data.federated import FederatedData
from edge_agent.data.from_userdata import UserFeatures, user_number
from edge_agent.data.partition import PartitionConfig
from edge_agent.data.userdata import DatasetCard, UserData
from edge_agent.evaluation.protocol import bouts
from edge_agent.evaluation.stats import Accuracies, PairedDifference, paired_difference, spread
from edge_agent.learning.head import Int8Head
from edge_agent.learning.strategies import ClientData
from edge_agent.learning.training import DEFAULT_STRATEGY, TrainingConfig
from edge_agent.sim import SimClient, StagedSource, run_simulation

ROUNDS = 30
ARRIVAL_ROUND = 16  # session 2 arrives with this round's task: rounds 1-15 train on session 1 only
SEEDS = tuple(range(10))
STRATEGY_NAMES = (DEFAULT_STRATEGY, "local", "fedavg")
FEW_LABELS = 5  # labelled windows per activity of session 2 in the few-label scenario
SESSIONS = ("s1", "s2")
PLOT_FLOOR = 80  # % accuracy at the bottom of the plot


@dataclass(frozen=True)
class Scenario:
    name: str
    labels_per_class: int | None  # None: every training window of session 2 arrives labelled
    capped: bool  # max_windows = the user's number of session 2 training windows
    summary: str


SCENARIOS = (
    Scenario("all", None, False, "all of session 2's training windows arrive; every window kept"),
    Scenario("all, capped", None, True, "the same, keeping at most as many windows as session 2 trains on "
             "(oldest dropped first): session 1 is evicted"),
    Scenario("few-label", FEW_LABELS, False, f"{FEW_LABELS} labelled windows per activity of session 2 arrive "
             "beside all of session 1's"),
)


@dataclass(frozen=True)
class SessionCut:
    train: np.ndarray  # indices among the user's windows, time order
    held_out: np.ndarray  # the last bout of each activity


def cut_session(user: UserData, card: DatasetCard, session: int) -> SessionCut:
    """One session's windows: the last bout of each activity held out, the earlier bouts to train on."""
    runs_by_label: dict[int, list[np.ndarray]] = {}
    for run in bouts(user, card, np.flatnonzero(user.session == session)):
        runs_by_label.setdefault(int(user.y[run[0]]), []).append(run)
    single = sorted(label for label, runs in runs_by_label.items() if len(runs) < 2)
    if single:
        raise ValueError(f"user {user.user_id!r}, session {session}: activities {single} have one bout only, so none "
                         "can be held out while training on it; this benchmark needs two bouts of each (UCI HAPT)")
    train = np.sort(np.concatenate([r for runs in runs_by_label.values() for r in runs[:-1]]))
    held_out = np.sort(np.concatenate([runs[-1] for runs in runs_by_label.values()]))
    return SessionCut(train, held_out)


@dataclass(frozen=True)
class UserStages:
    """One device's data: what it holds before session 2 arrives and after, and its held-out windows."""

    before: ClientData  # x_test / y_test: the held-out windows of both sessions, session 1's first
    after: ClientData
    s1_held_out: int  # how many of x_test are session 1's
    cap: int | None


def user_stages(prepared: UserFeatures, uid: str, number: int, scenario: Scenario, seed: int) -> UserStages:
    user, card = prepared.dataset.users[uid], prepared.dataset.card
    if user.session is None or user.sessions().size < 2:
        raise ValueError(f"user {uid!r} has fewer than two sessions; the continual benchmark needs two")
    first, second = (cut_session(user, card, int(s)) for s in user.sessions()[:2])
    arriving = second.train
    if scenario.labels_per_class is not None:
        rng = np.random.default_rng([seed, number, 0xC0417])
        arriving = np.sort(np.concatenate([
            rng.choice(second.train[user.y[second.train] == label], scenario.labels_per_class, replace=False)
            for label in np.unique(user.y[second.train])]))
    cap = second.train.size if scenario.capped else None
    held_before, held_after = first.train, np.concatenate([first.train, arriving])  # in the order they arrived
    if cap is not None:  # max_windows: the oldest dropped first
        held_before, held_after = held_before[-cap:], held_after[-cap:]
    std, features = prepared.standardizer, prepared.features[uid]
    test = np.concatenate([first.held_out, second.held_out])
    x_test, y_test = std(features[test]), user.y[test]

    def client(index: np.ndarray) -> ClientData:
        return ClientData(std(features[index]), user.y[index], x_test, y_test)

    return UserStages(client(held_before), client(held_after), first.held_out.size, cap)


def run_one(prepared: UserFeatures, strategy: str, scenario: Scenario, seed: int) -> dict[str, Any]:
    """One fleet of the federated users through ROUNDS rounds; per round and user, accuracy on each session's
    held-out windows."""
    card = prepared.dataset.card
    numbers = {uid: user_number(card, uid) for uid in card.roles.all()}
    users = card.roles.federate
    stages = {u: user_stages(prepared, u, numbers[u], scenario, seed) for u in users}
    dim = prepared.dim
    data = FederatedData(tuple(users), tuple(stages[u].before for u in users), np.zeros((0, dim), np.float32),
                         np.zeros(0, np.int64), card.num_classes, dim, card.class_names,
                         PartitionConfig("natural", seed=seed))
    acc: dict[str, dict[str, list[float]]] = {s: {u: [] for u in users} for s in SESSIONS}

    def staged(client: SimClient) -> StagedSource:
        st = stages[client.client_id]
        return StagedSource([(1, st.before), (ARRIVAL_ROUND, st.after)], client.round_open, client.client_id)

    def score(round_no: int, heads: Mapping[str, Int8Head]) -> None:
        for u in users:
            st = stages[u]
            right = heads[u].predict(st.before.x_test) == st.before.y_test
            acc["s1"][u].append(float(np.mean(right[:st.s1_held_out])))
            acc["s2"][u].append(float(np.mean(right[st.s1_held_out:])))

    run_simulation(data, TrainingConfig(strategy=strategy, rounds=ROUNDS, seed=seed), sources=staged,
                   watch_heads=score)
    return {"strategy": strategy, "scenario": scenario.name, "seed": seed, "acc": acc,
            "held": {u: [int(stages[u].before.y_train.size), int(stages[u].after.y_train.size)] for u in users},
            "held_out": {u: [stages[u].s1_held_out, int(stages[u].before.y_test.size - stages[u].s1_held_out)]
                         for u in users},
            "cap": {u: stages[u].cap for u in users}}


# --- the report ---------------------------------------------------------------------------------------------------

BEFORE, END = ARRIVAL_ROUND - 1, ROUNDS  # rounds, from 1


def at(runs: list[dict[str, Any]], session: str, round_no: int) -> Accuracies:
    """seed -> user -> accuracy on `session`'s held-out windows after `round_no`."""
    return {r["seed"]: {u: v[round_no - 1] for u, v in r["acc"][session].items()} for r in runs}


def minus(a: Accuracies, b: Accuracies) -> Accuracies:
    return {s: {u: a[s][u] - b[s][u] for u in a[s]} for s in a}


def interval(d: PairedDifference) -> dict[str, Any]:
    return {"mean": d.seeds.mean, "low": d.seeds.low, "high": d.seeds.high, "verdict": d.verdict,
            "over_users": asdict(d.users), "users_higher_lower": list(d.users_significant())}


def level(acc: Accuracies) -> dict[str, float]:
    m = spread(acc).mean
    return {"mean": m.mean, "low": m.low, "high": m.high}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    s1_before, s1_end = at(runs, "s1", BEFORE), at(runs, "s1", END)
    s2_before, s2_end = at(runs, "s2", BEFORE), at(runs, "s2", END)
    curve = {s: np.mean([[np.mean([v[i] for v in r["acc"][s].values()]) for i in range(ROUNDS)] for r in runs],
                        axis=0).tolist() for s in SESSIONS}
    return {"s1_before": level(s1_before), "s1_end": level(s1_end), "s2_before": level(s2_before),
            "s2_end": level(s2_end), "adaptation": interval(paired_difference(s2_end, s2_before)),
            "forgetting": interval(paired_difference(s1_before, s1_end)), "curve": curve}


def comparisons(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The cap's effect on forgetting per strategy, and the default strategy against the others per scenario."""
    out = []

    def forgetting(runs: list[dict[str, Any]]) -> Accuracies:
        return minus(at(runs, "s1", BEFORE), at(runs, "s1", END))

    for strategy in STRATEGY_NAMES:
        out.append({"what": "forgetting, capped - uncapped", "scenario": "all", "a": f"{strategy}, capped",
                    "b": strategy, **interval(paired_difference(forgetting(groups["all, capped", strategy]),
                                                                forgetting(groups["all", strategy])))})
    for scenario in SCENARIOS:
        base = groups[scenario.name, DEFAULT_STRATEGY]
        for other in STRATEGY_NAMES[1:]:
            runs = groups[scenario.name, other]
            for what, session, round_no in (("session 2 after", "s2", END), ("session 1 at the end", "s1", END),
                                            ("session 2 before", "s2", BEFORE)):
                out.append({"what": what, "scenario": scenario.name, "a": DEFAULT_STRATEGY, "b": other,
                            **interval(paired_difference(at(base, session, round_no), at(runs, session, round_no)))})
            out.append({"what": "forgetting", "scenario": scenario.name, "a": DEFAULT_STRATEGY, "b": other,
                        **interval(paired_difference(forgetting(base), forgetting(runs)))})
    return out


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def points(d: dict[str, Any]) -> str:
    """'+1.2 [+0.4, +2.0] / users [-0.9, +3.3]': the interval over seeds, then over users."""
    u = d["over_users"]
    return (f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] / users "
            f"[{100 * u['low']:+.1f}, {100 * u['high']:+.1f}]")


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Adaptation over time: UCI HAPT, session 2 arriving at round "
        f"{ARRIVAL_ROUND} of {ROUNDS} (bench/continual.py)", "",
        f"{len(doc['users'])} federated users, each a real agent; seeds {doc['seeds'][0]}-{doc['seeds'][-1]}; "
        "TrainingConfig's defaults for every strategy. Held out in each session: its last bout of each activity "
        "(never trained on). Accuracy in %, mean over users and seeds; differences are paired by seed and user, "
        "with a 95 % t interval over seeds (the verdict: \"no difference\" where it holds zero), then one over "
        "users. A seed changes the initialization, the training order and the few-label draw, not which windows are "
        "held out, so the interval over seeds is narrow; the one over the users says whether a new user of the "
        "same kind would see the difference.", "",
        f"- BEFORE / s1 @{BEFORE}: after round {BEFORE}, trained on session 1 only; AFTER / s1 @{END}: after round "
        f"{END}.",
        f"- ADAPTATION: session 2 AFTER - BEFORE. FORGETTING: session 1 @{BEFORE} - session 1 @{END}.", "",
    ]
    for scenario in SCENARIOS:
        lines += [f"## {scenario.name}: {scenario.summary}", "",
                  f"| strategy | s1 @{BEFORE} | s2 before (@{BEFORE}) | s2 after (@{END}) | adaptation | "
                  f"s1 @{END} | forgetting |", "|---|---|---|---|---|---|---|"]
        for strategy in STRATEGY_NAMES:
            s = doc["summary"][scenario.name][strategy]
            name = f"{strategy} (default)" if strategy == DEFAULT_STRATEGY else strategy
            lines.append(f"| {name} | {pct(s['s1_before']['mean'])} | {pct(s['s2_before']['mean'])} | "
                         f"{pct(s['s2_end']['mean'])} | {points(s['adaptation'])} | {pct(s['s1_end']['mean'])} | "
                         f"{points(s['forgetting'])} |")
        lines.append("")
    held = doc["windows"]
    lines += ["Windows a device holds (mean over users): "
              + "; ".join(f"{name}: {v['before']:.0f} before, {v['after']:.0f} after" for name, v in held.items())
              + f". Held out: {doc['held_out']['s1']:.0f} (session 1) and {doc['held_out']['s2']:.0f} (session 2) "
              "per user.", "",
              "## Paired differences (A - B, points, 95 % intervals over seeds / over users)", "",
              "| scenario | measure | A | B | A - B | verdict | users higher / lower |",
              "|---|---|---|---|---|---|---|"]
    for c in doc["comparisons"]:
        hi, lo = c["users_higher_lower"]
        lines.append(f"| {c['scenario']} | {c['what']} | {c['a']} | {c['b']} | {points(c)} | {c['verdict']} | "
                     f"{hi} / {lo} |")
    lines += ["", f"Plot: continual.png (accuracy per round on each session's held-out windows, mean over users and "
              f"seeds; the dotted line marks session 2's arrival). {doc['runs']} runs in {doc['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(4.2 * len(SCENARIOS), 3.4), sharey=True)
    x = np.arange(1, ROUNDS + 1)
    colors = dict(zip(STRATEGY_NAMES, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for ax, scenario in zip(axes, SCENARIOS, strict=True):
        for strategy in STRATEGY_NAMES:
            curve = doc["summary"][scenario.name][strategy]["curve"]
            ax.plot(x, 100 * np.asarray(curve["s1"]), color=colors[strategy], label=f"{strategy}, session 1")
            ax.plot(x, 100 * np.asarray(curve["s2"]), color=colors[strategy], linestyle="--",
                    label=f"{strategy}, session 2")
        ax.axvline(ARRIVAL_ROUND - 0.5, color="grey", linestyle=":")
        ax.text(ARRIVAL_ROUND + 0.3, 0.03, "session 2 arrives", transform=ax.get_xaxis_transform(), fontsize=8,
                color="grey")
        ax.set_title(scenario.name, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylim(PLOT_FLOOR, 100)  # the first rounds start lower: the rest is where the strategies differ
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy %")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"UCI HAPT: accuracy on each session's held-out windows per round, mean over users and seeds "
                 f"(axis from {PLOT_FLOOR} %)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="how many of seeds 0.. to run (default 10)")
    parser.add_argument("--out", type=Path, default=evallib.RESULTS, help="directory for continual.{json,md,png}")
    args = parser.parse_args()
    seeds = SEEDS[:args.seeds]
    if len(seeds) < 2:
        raise SystemExit("--seeds: at least 2 (the intervals are over seeds)")
    logging.disable(logging.WARNING)  # the services' INFO lines, thousands per run
    prepared = evallib.load("hapt").prepared
    t0 = time.perf_counter()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    total = len(SCENARIOS) * len(STRATEGY_NAMES) * len(seeds)
    for scenario in SCENARIOS:
        for strategy in STRATEGY_NAMES:
            groups[scenario.name, strategy] = [run_one(prepared, strategy, scenario, s) for s in seeds]
            done = sum(len(g) for g in groups.values())
            evallib.log(f"{scenario.name} / {strategy}: done ({done}/{total}, {time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    users = list(prepared.dataset.card.roles.federate)
    some = {name: groups[name, DEFAULT_STRATEGY] for name in (s.name for s in SCENARIOS)}
    doc = {
        "dataset": "hapt", "users": users, "seeds": list(seeds), "rounds": ROUNDS, "arrival_round": ARRIVAL_ROUND,
        "before_round": BEFORE, "strategies": list(STRATEGY_NAMES), "few_labels": FEW_LABELS,
        "scenarios": {s.name: s.summary for s in SCENARIOS},
        "training": asdict(TrainingConfig()),
        "windows": {name: {"before": float(np.mean([h[0] for r in runs for h in r["held"].values()])),
                           "after": float(np.mean([h[1] for r in runs for h in r["held"].values()]))}
                    for name, runs in some.items()},
        "held_out": {s: float(np.mean([h[i] for h in some["all"][0]["held_out"].values()]))
                     for i, s in enumerate(SESSIONS)},
        "summary": {s.name: {st: summarize(groups[s.name, st]) for st in STRATEGY_NAMES} for s in SCENARIOS},
        "comparisons": comparisons(groups),
        "per_user": {f"{sc}/{st}": {k: at(runs, k[:2], BEFORE if k.endswith("before") else END)
                                    for k in ("s1_before", "s1_end", "s2_before", "s2_end")}
                     for (sc, st), runs in groups.items()},
        "runs": total, "seconds": seconds, "machine": {"python": platform.python_version(), "processes": 1},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "continual.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "continual.md").write_text(markdown(doc))
    plot(doc, args.out / "continual.png")
    evallib.log(f"wrote {args.out / 'continual.json'}, continual.md, continual.png ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
