"""Experiment reports built on the simulation: the few-shot curve and its plot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .data.federated import Embedded, federate
from .data.partition import PartitionConfig
from .learning.training import TrainingConfig
from .sim import run_simulation

FEW_SHOT_CURVE = (1, 2, 5, 10, 20, 0)  # labelled windows per class; 0 = all the client has


def few_shot_curve(embedded: Embedded, base: TrainingConfig, seeds: Sequence[int], strategies: Sequence[str],
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Accuracy against labelled windows per class (K) per strategy, on identical splits, averaged over seeds."""
    keys = ("mean_acc", "worst_acc", "new_user_acc")
    raw: dict[str, dict[str, list[list[float]]]] = {s: {k: [] for k in keys} for s in strategies}
    for k in FEW_SHOT_CURVE:
        per: dict[str, dict[str, list[float]]] = {s: {key: [] for key in keys} for s in strategies}
        for seed in seeds:
            data = federate(embedded, PartitionConfig(regime="few-shot", seed=seed, shots=k))
            for name in strategies:
                if progress:
                    progress(f"few-shot curve: K={k or 'all'} seed={seed} {name}")
                summary = run_simulation(data, replace(base, strategy=name, seed=seed))["summary"]
                for key in keys:
                    per[name][key].append(np.nan if summary[key] is None else summary[key])
        for name in strategies:
            for key in keys:
                raw[name][key].append(per[name][key])
    curve: dict[str, Any] = {"shots": list(FEW_SHOT_CURVE), "seeds": list(seeds), "rounds": base.rounds,
                             "strategies": {}}
    for name in strategies:
        entry: dict[str, list[float | None]] = {}
        for key in keys:
            arr = np.asarray(raw[name][key], dtype=float)  # (len(K), len(seeds))
            ok = ~np.all(np.isnan(arr), axis=1)
            entry[key] = [float(np.nanmean(r)) if o else None for r, o in zip(arr, ok, strict=True)]
            entry[key + "_min"] = [float(np.nanmin(r)) if o else None for r, o in zip(arr, ok, strict=True)]
            entry[key + "_max"] = [float(np.nanmax(r)) if o else None for r, o in zip(arr, ok, strict=True)]
        curve["strategies"][name] = entry
    return curve


def plot_few_shot_curve(curve: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f"plotting needs matplotlib (pip install 'edge-fl[plot]'): {exc}") from exc
    labels = [str(k) if k else "all" for k in curve["shots"]]
    xs = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, s in curve["strategies"].items():
        mean = np.array(s["mean_acc"], dtype=float) * 100
        line, = ax.plot(xs, mean, marker="o", label=f"{name}: mean client")
        if len(curve["seeds"]) > 1:
            ax.fill_between(xs, np.array(s["mean_acc_min"], float) * 100, np.array(s["mean_acc_max"], float) * 100,
                            color=line.get_color(), alpha=0.15, linewidth=0)
        ax.plot(xs, np.array(s["worst_acc"], dtype=float) * 100, linestyle=":", color=line.get_color(),
                label=f"{name}: worst client")
        if s["new_user_acc"][0] is not None:
            ax.axhline(100 * float(np.mean(s["new_user_acc"])), color=line.get_color(), linestyle="--",
                       linewidth=0.8, alpha=0.6, label=f"{name}: new user (no labels)")
    ax.set_xticks(xs, labels)
    ax.set_xlabel("labelled windows per class on each device (K)")
    ax.set_ylabel("test accuracy on the device's later windows (%)")
    seeds = curve["seeds"]
    ax.set_title(f"Few-label users, {curve['rounds']} rounds, "
                 + (f"mean of seeds {seeds} (band: min-max)" if len(seeds) > 1 else f"seed {seeds[0]}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
