"""What each update codec costs in accuracy, byte for byte, on the watch dataset through the real services.

Every codec of `edge_agent.codec.compression` (the change from the global model, with error feedback, in the
compact update frame) and the two envelopes devices sent before it (the whole shared tensors, int8 per output
channel or float32), for the default strategy (ditto) and for fedavg, where every device runs the global head and
so the codec's error reaches every prediction (its worst case), in the natural, label-skew and few-shot regimes.

Per codec, regime and strategy: whole MQTT payload bytes per update, up and down (`run_simulation`'s summary); the
ratio against the float32 frame (the lossless reference) and against the legacy float32 envelope; final mean, 10th
percentile and worst device accuracy (means over seeds); paired differences against the float32 frame (same data,
same seed) with a 95 % t interval over seeds; and the CPU time per update of the device's encoding (error feedback
+ frame) and of the aggregator's decoding, on real updates. The issue's targets are reported, never asserted: the
codec for each is chosen on VALIDATION (other seeds, each device scored on held-out training windows:
`data.federated.holdout_validation`), and its TEST result is reported beside.

    .venv/bin/python bench/compression.py                      # validation (seeds 100-104), then test (0-4): ~30 min
    .venv/bin/python bench/compression.py --reuse-validation   # test only; choices from compression_validation.json
    .venv/bin/python bench/compression.py --render-only        # markdown and plot again from the saved JSON
    .venv/bin/python bench/compression.py --quick              # 1 seed each, 10 rounds, 7 codecs, to a temp dir: ~1 min
    .venv/bin/python bench/compression.py --downlink-codecs int8 sign1   # also each codec with a compressed downlink

With `--downlink-codecs`, every uplink codec also runs with each listed `TrainingConfig.downlink_codec` (the global
model sent as a compressed change): rows keyed "<uplink> down:<downlink>"; a row without it (the whole model in
every round task) keeps the plain uplink label. Targets and the plot use the whole-model rows only.

Writes bench/results/compression.{json,md,png} and compression_validation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeGuard

import benchlib
import numpy as np

from edge_agent.backbone import EmbeddingCache, FrozenBackbone
from edge_agent.codec.compression import CodecSpec, ErrorFeedback
from edge_agent.codec.envelope import Envelope, Kind, decode_envelope, encode_envelope
from edge_agent.codec.update_frame import (
    HEADER_SIZE,
    SIGNATURE_SIZE,
    decode_update_frame,
    frame_seeds,
    pack_update_frame,
)
from edge_agent.data.federated import FederatedData, default_cache_dir, embed_dataset, federate, holdout_validation
from edge_agent.data.partition import PartitionConfig
from edge_agent.data.watch import load_watch_dataset
from edge_agent.learning.head import HeadConfig
from edge_agent.learning.strategies import make_strategy
from edge_agent.learning.training import DEFAULT_STRATEGY, TrainingConfig
from edge_agent.sim import run_simulation

NAME = "compression"
REFERENCE = "float32"  # the frame's lossless codec: every paired difference is against it
LEGACY_INT8, LEGACY_FLOAT32 = "envelope:int8", "envelope:float32"
LEGACY = {LEGACY_INT8: True, LEGACY_FLOAT32: False}  # label -> TrainingConfig.int8_updates, with codec ""
TOPK = (0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0004)
SUBSAMPLE = (0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.003)
SUBSAMPLE_SR = (0.1, 0.03, 0.01)
CODECS: tuple[str, ...] = (
    LEGACY_INT8, LEGACY_FLOAT32, REFERENCE, "float16", "int8", "int8+sr", "int4", "int4+sr",
    "sign1", "sign1+sr", "sign1+rot",
    *(f"topk:{f:g}" for f in TOPK), *(f"subsample:{f:g}" for f in SUBSAMPLE),
    *(f"subsample:{f:g}+sr" for f in SUBSAMPLE_SR))
QUICK_CODECS = (LEGACY_INT8, LEGACY_FLOAT32, REFERENCE, "int8", "sign1", "topk:0.01", "subsample:0.01")
FULL_MODEL = ("", "full")  # downlink labels for TrainingConfig.downlink_codec "": the whole model in every task
DOWNLINK_MARK = " down:"  # row key "<uplink> down:<downlink>"; no codec spec holds a space
REGIMES = ("natural", "label-skew", "few-shot")
STRATEGIES = (DEFAULT_STRATEGY, "fedavg")
METRICS = ("mean_acc", "p10_acc", "worst_acc", "new_user_acc",
           "uplink_bytes_per_client_round", "downlink_bytes_per_client_round")
# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (no scipy on a device-side install).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# LoRaWAN EU868 at 125 kHz: spreading factor and application payload per uplink packet (Regional Parameters,
# no FOpts, repeater-compatible maximum: 51 B at DR0-2, 115 B at DR3, 222 B at DR4-5).
LORA_RATES = {"DR0 (SF12)": (12, 51), "DR3 (SF9)": (9, 115), "DR5 (SF7)": (7, 222)}
LORA_OVERHEAD = 13  # MHDR 1 + FHDR 7 + FPort 1 + MIC 4: PHY payload = application payload + 13
DUTY_CYCLE = 0.01  # EU868 g1 sub-band: 1 % of the time on air
ROUNDS_PER_MONTH = 24 * 30  # the guide's assumption: one round an hour, every device selected

Grid = dict[str, dict[str, dict[str, dict[str, list[Any]]]]]  # strategy -> regime -> codec -> metric -> per seed
Stats = dict[str, dict[str, dict[str, dict[str, Any]]]]  # strategy -> regime -> codec -> statistics


@dataclass(frozen=True)
class Target:
    name: str
    ratio: float  # at least this many times fewer uplink bytes than the float32 frame, header included
    mean_points: float  # at most this many points of mean accuracy lost (paired, seed mean)
    worst_points: float | None  # at most this many points lost by the worst device; None: not part of the target


TARGETS = (Target(">= 32x fewer bytes, <= 0.5 points mean and <= 1 point worst device lost", 32, 0.5, 1.0),
           Target(">= 100x fewer bytes, <= 1.5 points mean lost", 100, 1.5, None))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the runs ------------------------------------------------------------------------------------------------------


def row_key(uplink: str, downlink: str) -> str:
    """The grid's key of one row: the uplink label alone when the whole model goes down (as in result files written
    before the downlink axis), else "<uplink> down:<downlink>"."""
    return uplink if downlink in FULL_MODEL else f"{uplink}{DOWNLINK_MARK}{downlink}"


def split_key(key: str) -> tuple[str, str]:
    """(uplink label, downlink codec; "" for the whole model) of a row key."""
    uplink, _, downlink = key.partition(DOWNLINK_MARK)
    return uplink, downlink


def row_keys(codecs: Sequence[str], downlinks: Sequence[str]) -> list[str]:
    """Each uplink codec with the whole model first (the reference its downlink rows are compared with)."""
    return [row_key(c, d) for c in codecs for d in ("", *downlinks)]


def full_model_rows(stats: Stats) -> Stats:
    """Only the rows whose downlink is the whole model: what the uplink targets and the plot are about."""
    return {s: {r: {c: v for c, v in cells.items() if not split_key(c)[1]} for r, cells in by_regime.items()}
            for s, by_regime in stats.items()}


def has_downlink_rows(stats: Stats) -> bool:
    return any(split_key(c)[1] for by_regime in stats.values() for cells in by_regime.values() for c in cells)


def training_config(key: str, strategy: str, seed: int, rounds: int) -> TrainingConfig:
    """A legacy envelope (codec "", int8 or float32) or a codec in the compact frame; and the downlink codec."""
    label, downlink = split_key(key)
    if label in LEGACY:
        return TrainingConfig(rounds=rounds, seed=seed, strategy=strategy, int8_updates=LEGACY[label],
                              downlink_codec=downlink)
    return TrainingConfig(rounds=rounds, seed=seed, strategy=strategy, codec=label, downlink_codec=downlink)


def scoring_data(embedded: Any, regime: str, seed: int, validation: bool) -> FederatedData:
    data = federate(embedded, PartitionConfig(regime=regime, seed=seed))
    return holdout_validation(data) if validation else data


def run_grid(embedded: Any, codecs: Sequence[str], strategies: Sequence[str], regimes: Sequence[str],
             seeds: Sequence[int], rounds: int, validation: bool) -> Grid:
    """One simulation per (strategy, regime, seed, row key: codec, downlink codec); the data is partitioned once
    per (regime, seed)."""
    grid: Grid = {s: {r: {c: {m: [] for m in METRICS} for c in codecs} for r in regimes} for s in strategies}
    total, done, t0 = len(codecs) * len(strategies) * len(regimes) * len(seeds), 0, time.perf_counter()
    phase = "validation" if validation else "test"
    for regime in regimes:
        for seed in seeds:
            data = scoring_data(embedded, regime, seed, validation)
            for strategy in strategies:
                for label in codecs:
                    summary = run_simulation(data, training_config(label, strategy, seed, rounds))["summary"]
                    for m in METRICS:
                        grid[strategy][regime][label][m].append(summary[m])
                done += len(codecs)
                elapsed = time.perf_counter() - t0
                cells = grid[strategy][regime]
                log(f"  {phase} {regime:10s} seed {seed:3d} {strategy:6s}: float32 "
                    f"{100 * cells[REFERENCE]['mean_acc'][-1]:.1f}%, lowest "
                    f"{100 * min(cells[c]['mean_acc'][-1] for c in codecs):.1f}% ({done}/{total} runs, "
                    f"{elapsed:.0f}s, ~{elapsed / done * (total - done):.0f}s left)")
    return grid


# --- statistics ----------------------------------------------------------------------------------------------------


def mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def paired(values: Sequence[float | None], reference: Sequence[float | None]) -> dict[str, Any]:
    """Per-seed differences in points (codec minus reference), their mean and a 95 % t interval over seeds.
    Seeds where either is None (no global head to score) are left out."""
    diffs = [100.0 * (float(v) - float(r)) for v, r in zip(values, reference, strict=True)
             if v is not None and r is not None]
    if not diffs:
        return {"mean": None, "ci95": None, "per_seed": []}
    centre = float(np.mean(diffs))
    if len(diffs) < 2:
        return {"mean": centre, "ci95": None, "per_seed": diffs}
    half = T975[min(len(diffs) - 1, len(T975)) - 1] * float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
    return {"mean": centre, "ci95": [centre - half, centre + half], "half_width": half, "per_seed": diffs}


def cell_stats(cell: Mapping[str, list[Any]], reference: Mapping[str, list[Any]],
               legacy_float32: Mapping[str, list[Any]], full_model: Mapping[str, list[Any]]) -> dict[str, Any]:
    """`full_model`: the same uplink codec's row with the whole model sent down (the cell itself when it is one)."""
    up = mean(cell["uplink_bytes_per_client_round"])
    assert up is not None
    down = mean(cell["downlink_bytes_per_client_round"])
    full_down = mean(full_model["downlink_bytes_per_client_round"])
    return {
        **{m: mean(cell[m]) for m in ("mean_acc", "p10_acc", "worst_acc", "new_user_acc")},
        "uplink_bytes": up, "downlink_bytes": down,
        "downlink_ratio_vs_full_model": full_down / down if down and full_down is not None else None,
        # what the downlink codec alone costs: against the same uplink codec with the whole model sent down
        "delta_mean_vs_full_model_points": paired(cell["mean_acc"], full_model["mean_acc"]),
        "ratio_vs_float32_frame": (mean(reference["uplink_bytes_per_client_round"]) or 0.0) / up,
        "ratio_vs_float32_envelope": (mean(legacy_float32["uplink_bytes_per_client_round"]) or 0.0) / up,
        "delta_mean_points": paired(cell["mean_acc"], reference["mean_acc"]),
        "delta_p10_points": paired(cell["p10_acc"], reference["p10_acc"]),
        "delta_worst_points": paired(cell["worst_acc"], reference["worst_acc"]),
        # the global head alone, on users it never saw: what ditto's personal heads hide of a codec's damage
        "delta_new_user_points": paired(cell["new_user_acc"], reference["new_user_acc"]),
    }


def grid_stats(grid: Grid) -> Stats:
    return {s: {r: {c: cell_stats(cell, cells[REFERENCE], cells[LEGACY_FLOAT32], cells[split_key(c)[0]])
                    for c, cell in cells.items()}
                for r, cells in by_regime.items()} for s, by_regime in grid.items()}


# --- CPU time per update, on real updates --------------------------------------------------------------------------


Update = tuple[str, int, dict[str, np.ndarray]]  # (device, round, the change from the global model)
Encoder = Callable[[Sequence[Update]], list[bytes]]  # a device's updates, in round order -> their payloads
Decoder = Callable[[Sequence[bytes], Sequence[str]], object]  # payloads and their devices -> decoded


def real_updates(embedded: Any, rounds: int) -> tuple[list[Update], dict[str, tuple[int, ...]]]:
    """Every update of a fedavg run (natural, seed 0) in the lossless frame, decoded: real deltas, in round order.
    fedavg and ditto upload the same tensors."""
    data = federate(embedded, PartitionConfig("natural", seed=0))
    config = TrainingConfig(rounds=rounds, seed=0, strategy="fedavg", codec=REFERENCE)
    strategy = make_strategy(config.strategy, HeadConfig(data.embedding_dim, data.num_classes, config.adapter_dim),
                             config.strategy_config())
    shapes = {k: s for k, s in strategy.head.shapes.items() if k in strategy.shared_keys}
    frames: list[tuple[str, int, bytes]] = []
    run_simulation(data, config, watch_uplink=lambda device, round_no, payload: frames.append(
        (device, round_no, payload)))
    updates = [(device, round_no, dict(decode_update_frame(
        payload, device_id=device, strategy=config.strategy, shapes=shapes,
        seed_of=frame_seeds(device)).tensors)) for device, round_no, payload in frames]
    return updates, shapes


def frame_encoder(spec: CodecSpec, shapes: Mapping[str, tuple[int, ...]]) -> Encoder:
    """What an agent runs per update (AgentService.compress): error feedback, then the frame; one residual per
    device, carried over its rounds as on a real device."""
    def encode(updates: Sequence[Update]) -> list[bytes]:
        feedback: dict[str, ErrorFeedback] = {}
        out = []
        for device, round_no, delta in updates:
            update_id = uuid.uuid4().hex
            seed_of = frame_seeds(device)
            encoded, _ = feedback.setdefault(device, ErrorFeedback()).compress(
                delta, spec, {k: seed_of(round_no, update_id, k) for k in shapes})
            out.append(pack_update_frame(round_no=round_no, model_version=round_no - 1, update_id=update_id,
                                         num_examples=500, codec=spec, encoded=encoded, shapes=shapes))
        return out
    return encode


def envelope_encoder(int8: bool, strategy: str) -> Encoder:
    """What an agent ran before the frame: the whole tensors in a JSON-headed envelope (the delta's values stand
    in for the tensors': the same shapes, so the same work)."""
    def encode(updates: Sequence[Update]) -> list[bytes]:
        return [encode_envelope(Envelope(kind=Kind.UPDATE, device_id=device, round=round_no,
                                         model_version=round_no - 1, strategy=strategy, update_id=uuid.uuid4().hex,
                                         num_examples=500, tensors=delta, codec="int8" if int8 else "float32"))
                for device, round_no, delta in updates]
    return encode


def cpu_us_per_update(fn: Callable[[], object], count: int, repeats: int) -> dict[str, Any]:
    """CPU microseconds per update (time.process_time) of `fn`, which handles `count` updates; median of blocks."""
    blocks = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        blocks.append(1e6 * (time.process_time() - t0) / count)
    return benchlib.summarize(blocks)


def codec_functions(label: str, shapes: Mapping[str, tuple[int, ...]], strategy: str) -> tuple[Encoder, Decoder]:
    """(device encoder, aggregator decoder) of one label."""
    if label in LEGACY:
        def decode_envelopes(payloads: Sequence[bytes], devices: Sequence[str]) -> object:
            return [decode_envelope(p) for p in payloads]
        return envelope_encoder(LEGACY[label], strategy), decode_envelopes

    def decode_frames(payloads: Sequence[bytes], devices: Sequence[str]) -> object:
        return [decode_update_frame(p, device_id=d, strategy=strategy, shapes=shapes, seed_of=frame_seeds(d))
                for p, d in zip(payloads, devices, strict=True)]
    return frame_encoder(CodecSpec.parse(label), shapes), decode_frames


def time_codec(label: str, updates: Sequence[Update], shapes: Mapping[str, tuple[int, ...]],
               repeats: int) -> dict[str, Any]:
    encode, decode = codec_functions(label, shapes, "fedavg")
    payloads, devices = encode(updates), [u[0] for u in updates]
    return {"encode_us": cpu_us_per_update(lambda: encode(updates), len(updates), repeats),
            "decode_us": cpu_us_per_update(lambda: decode(payloads, devices), len(updates), repeats),
            "mean_payload_bytes": float(np.mean([len(p) for p in payloads]))}


def measure_timing(embedded: Any, codecs: Sequence[str], rounds: int, repeats: int) -> dict[str, Any]:
    updates, shapes = real_updates(embedded, rounds)
    out: dict[str, Any] = {"updates_per_block": len(updates), "repeats": repeats, "shapes": shapes}
    for label in codecs:
        out[label] = time_codec(label, updates, shapes, repeats)
        log(f"  timing {label:18s} encode {out[label]['encode_us']['median']:7.0f} us, "
            f"decode {out[label]['decode_us']['median']:7.0f} us per update")
    return out


# --- targets: chosen on validation, reported on test ---------------------------------------------------------------


def shortfall(s: Mapping[str, Any], target: Target, shared: bool = False) -> float:
    """Points by which one cell misses the target's accuracy bounds (0 when it meets them). `shared`: the global
    head's accuracy on a new user must also stay within the mean bound (ditto's personal heads can hold the
    devices' accuracy while the shared model they and every new device start from degrades)."""
    misses = [-float(s["delta_mean_points"]["mean"]) - target.mean_points]
    if target.worst_points is not None:
        misses.append(-float(s["delta_worst_points"]["mean"]) - target.worst_points)
    if shared and s["delta_new_user_points"]["mean"] is not None:
        misses.append(-float(s["delta_new_user_points"]["mean"]) - target.mean_points)
    return max(0.0, *misses)


def meets(s: Mapping[str, Any], target: Target, shared: bool = False) -> bool:
    return bool(s["ratio_vs_float32_frame"] >= target.ratio and shortfall(s, target, shared) == 0.0)


def mean_bytes(stats: Mapping[str, Mapping[str, Any]], label: str) -> float:
    return sum(float(cells[label]["uplink_bytes"]) for cells in stats.values()) / len(stats)


def choose(stats: Stats, strategy: str, target: Target) -> dict[str, str | None]:
    """On validation numbers: the smallest payload meeting the target in every regime; and the nearest points on
    the curve: the smallest payload meeting the accuracy bounds, the closest to them among those small enough.
    The same with the shared model held too (`shortfall`'s `shared`)."""
    by_regime = stats[strategy]
    codecs = sorted(next(iter(by_regime.values())), key=lambda c: mean_bytes(by_regime, c))

    def everywhere(test: Callable[[Mapping[str, Any]], bool]) -> str | None:
        return next((c for c in codecs if all(test(cells[c]) for cells in by_regime.values())), None)

    small = [c for c in codecs if all(cells[c]["ratio_vs_float32_frame"] >= target.ratio
                                      for cells in by_regime.values())]
    closest = min(small, key=lambda c: max(shortfall(cells[c], target) for cells in by_regime.values()), default=None)
    return {"chosen": everywhere(lambda s: meets(s, target)),
            "smallest_meeting_accuracy": everywhere(lambda s: shortfall(s, target) == 0.0),
            "closest_meeting_ratio": closest,
            "chosen_with_shared_model": everywhere(lambda s: meets(s, target, shared=True)),
            "smallest_with_shared_model": everywhere(lambda s: shortfall(s, target, shared=True) == 0.0)}


def cell_view(s: Mapping[str, Any], target: Target) -> dict[str, Any]:
    return {"uplink_bytes": s["uplink_bytes"], "ratio": s["ratio_vs_float32_frame"], "mean_acc": s["mean_acc"],
            "worst_acc": s["worst_acc"], "delta_mean_points": s["delta_mean_points"]["mean"],
            "delta_mean_ci95": s["delta_mean_points"]["ci95"], "delta_worst_points": s["delta_worst_points"]["mean"],
            "delta_worst_ci95": s["delta_worst_points"]["ci95"],
            "delta_new_user_points": s["delta_new_user_points"]["mean"], "meets": meets(s, target),
            "meets_with_shared_model": meets(s, target, shared=True)}


def target_report(validation: Stats, test: Stats | None) -> list[dict[str, Any]]:
    """The uplink targets, chosen among the rows sending the whole model down."""
    validation = full_model_rows(validation)
    test = None if test is None else full_model_rows(test)
    rows = []
    for strategy in validation:
        for target in TARGETS:
            picks = choose(validation, strategy, target)
            row: dict[str, Any] = {"strategy": strategy, "target": asdict(target), "picks": picks, "points": {}}
            for label in picks.values():
                if label is None or label in row["points"]:
                    continue
                row["points"][label] = {
                    "validation": {r: cell_view(c[label], target) for r, c in validation[strategy].items()},
                    "test": None if test is None or strategy not in test else
                    {r: cell_view(c[label], target) for r, c in test[strategy].items() if label in c}}
            rows.append(row)
    return rows


# --- markdown ------------------------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def delta(d: Mapping[str, Any]) -> str:
    half = d.get("half_width")
    if d["mean"] is None:
        return "-"
    return f"{d['mean']:+.2f}" + ("" if half is None else f" ± {half:.2f}")


def bytes_table(stats: Stats, timing: Mapping[str, Any] | None) -> list[str]:
    """Bytes (the first strategy's runs: the others' differ by a few bytes of topk index coding) and CPU time."""
    by_regime = stats[next(iter(stats))]
    downlink = has_downlink_rows(stats)  # without that axis, the table as before it
    head = "| codec | uplink B / update | x vs float32 frame | x vs float32 envelope | downlink B / update |"
    lines = [head + (" downlink x vs whole model |" if downlink else "")
             + (" device encode us | aggregator decode us |" if timing else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if downlink else "") + ("---:|---:|" if timing else "")]
    for label in sorted(next(iter(by_regime.values())), key=lambda c: -mean_bytes(by_regime, c)):
        cells = [c[label] for c in by_regime.values()]
        row = (f"| {label} | {mean_bytes(by_regime, label):,.0f} | "
               f"{np.mean([c['ratio_vs_float32_frame'] for c in cells]):.1f} | "
               f"{np.mean([c['ratio_vs_float32_envelope'] for c in cells]):.1f} | "
               f"{np.mean([c['downlink_bytes'] for c in cells]):,.0f} |")
        if downlink:
            row += f" {downlink_ratio(cells)} |"
        uplink = split_key(label)[0]  # the device's encoding does not depend on the downlink
        if timing:
            row += f" {timing[uplink]['encode_us']['median']:.0f} | {timing[uplink]['decode_us']['median']:.0f} |"
        lines.append(row)
    return lines


def downlink_ratio(cells: Sequence[Mapping[str, Any]]) -> str:
    """Mean over regimes of how many times fewer downlink bytes than the same uplink codec's whole-model row."""
    ratios = [c.get("downlink_ratio_vs_full_model") for c in cells]
    known = [float(r) for r in ratios if r is not None]
    return f"{np.mean(known):.1f}" if len(known) == len(ratios) else "-"


def downlink_table(by_regime: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The downlink rows: bytes, ratio against the whole model, and accuracy paired against the same uplink codec
    with the whole model sent down (the downlink codec's own cost) and against the float32 frame (the total)."""
    regimes = list(by_regime)
    head = " | ".join(f"{r} mean (Δ vs whole model) | {r} Δ vs float32 frame" for r in regimes)
    lines = [f"| uplink | downlink | downlink B / update | x vs whole model | {head} |",
             "|---|---|---:|---:|" + "---:|" * (2 * len(regimes))]
    for label in next(iter(by_regime.values())):
        uplink, downlink = split_key(label)
        if not downlink:
            continue
        cells = [by_regime[r][label] for r in regimes]
        values = [f"{pct(s['mean_acc'])} ({delta(s['delta_mean_vs_full_model_points'])}) | "
                  f"{delta(s['delta_mean_points'])}" for s in cells]
        lines.append(f"| {uplink} | {downlink} | {np.mean([c['downlink_bytes'] for c in cells]):,.0f} | "
                     f"{downlink_ratio(cells)} | " + " | ".join(values) + " |")
    return lines


def accuracy_table(by_regime: Mapping[str, Mapping[str, Any]]) -> list[str]:
    regimes = list(by_regime)
    head = " | ".join(f"{r} mean (Δ) | {r} p10 | {r} worst (Δ)" for r in regimes)
    lines = [f"| codec | uplink B | {head} |", "|---|---:|" + "---:|" * (3 * len(regimes))]
    for label in sorted(next(iter(by_regime.values())), key=lambda c: -mean_bytes(by_regime, c)):
        cells = []
        for r in regimes:
            s = by_regime[r][label]
            cells += [f"{pct(s['mean_acc'])} ({delta(s['delta_mean_points'])})", pct(s["p10_acc"]),
                      f"{pct(s['worst_acc'])} ({delta(s['delta_worst_points'])})"]
        lines.append(f"| {label} | {mean_bytes(by_regime, label):,.0f} | " + " | ".join(cells) + " |")
    return lines


def same_new_user(stats: Stats) -> bool:
    """Does every strategy's global head score the same? (ditto's shared model trains exactly as fedavg's.)"""
    values = [[c["new_user_acc"] for by_codec in by_regime.values() for c in by_codec.values()]
              for by_regime in stats.values()]
    return all(v == values[0] for v in values)


def new_user_table(stats: Stats) -> list[str]:
    shown = dict(list(stats.items())[:1]) if same_new_user(stats) else stats
    columns = [(s, r) for s, by_regime in shown.items() for r in by_regime]
    name = (lambda s, r: r) if len(shown) == 1 else (lambda s, r: f"{s}, {r}")
    lines = ["| codec | " + " | ".join(name(s, r) for s, r in columns) + " |", "|---|" + "---:|" * len(columns)]
    first = stats[columns[0][0]]
    for label in sorted(next(iter(first.values())), key=lambda c: -mean_bytes(first, c)):
        cells = [stats[s][r][label] for s, r in columns]
        lines.append(f"| {label} | " + " | ".join(f"{pct(c['new_user_acc'])} ({delta(c['delta_new_user_points'])})"
                                                   for c in cells) + " |")
    return lines


def point_line(views: Mapping[str, Mapping[str, Any]], phase: str, shared: bool) -> str:
    """One codec's numbers in every regime, and whether it meets the target there."""
    parts = []
    for regime, v in views.items():
        ci = v["delta_mean_ci95"]
        ci_text = "" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
        parts.append(f"{regime} {v['ratio']:.1f}x, mean {v['delta_mean_points']:+.2f}{ci_text}, worst "
                     f"{v['delta_worst_points']:+.2f}, new user {v['delta_new_user_points'] or 0:+.2f} "
                     f"({'met' if v['meets_with_shared_model' if shared else 'meets'] else 'missed'})")
    return f"  - {phase}: " + "; ".join(parts)


ROLES = {"chosen": "chosen", "smallest_meeting_accuracy": "nearest: smallest payload within the accuracy bounds",
         "closest_meeting_ratio": "nearest: least accuracy lost at the ratio",
         "chosen_with_shared_model": "chosen, holding the shared model too",
         "smallest_with_shared_model": "holding the shared model too, the target is missed; nearest: smallest "
                                       "payload within the accuracy bounds"}


def pick_lines(row: Mapping[str, Any], role: str, shared: bool) -> list[str]:
    label = row["picks"][role]
    point = row["points"][label]
    lines = [f"- {ROLES[role]}: `{label}`", point_line(point["validation"], "validation", shared)]
    if point["test"]:
        lines.append(point_line(point["test"], "TEST", shared))
    elif point["test"] is not None:  # validation reused with fewer codecs on test
        lines.append("  - TEST: not run (not among this run's codecs)")
    return lines


def targets_section(rows: Sequence[Mapping[str, Any]], doc: Mapping[str, Any]) -> list[str]:
    val, test = doc["config"]["validation_seeds"], doc["config"]["seeds"]
    lines = ["## Targets (on the whole payload per update, header included; reported, not asserted)", "",
             f"Chosen on VALIDATION (seeds {val}, each device scored on the last quarter of its training windows): "
             "the smallest payload meeting the target in all three regimes. "
             + (f"Then its TEST result (seeds {test}, the devices' test windows). " if doc.get("test") else
                "Its test result is in compression.md. ")
             + "Differences are paired points against the float32 frame "
             "(seed means; [95 % CI] of the mean difference); 'new user' is the global head on users it never saw. "
             "'Holding the shared model too' adds a bound: the new-user accuracy may lose no more than the "
             "target's mean bound either (ditto's personal heads can keep the devices' accuracy while the shared "
             "model degrades).", ""]
    for row in rows:
        picks = row["picks"]
        lines.append(f"**{row['strategy']}, {row['target']['name']}**")
        roles = ["chosen"] if picks["chosen"] else ["smallest_meeting_accuracy", "closest_meeting_ratio"]
        if not picks["chosen"]:
            lines.append("- MISSED on validation: no codec meets it in every regime. Nearest points on the curve:")
        for role in roles:
            if picks[role]:
                lines += pick_lines(row, role, shared=False)
        strict = "chosen_with_shared_model" if picks["chosen_with_shared_model"] else "smallest_with_shared_model"
        if picks[strict] is not None and picks[strict] not in {picks[r] for r in roles}:
            lines += pick_lines(row, strict, shared=True)
        elif picks[strict] is not None:
            lines.append(f"- holding the shared model too: the same `{picks[strict]}`")
        lines.append("")
    return lines


def lora_airtime_s(app_bytes: int, sf: int) -> float:
    """Time on air of one LoRa packet (Semtech AN1200.13): 125 kHz, coding rate 4/5, explicit header, CRC,
    8-symbol preamble, low-data-rate optimisation at SF11-12."""
    t_sym = 2.0**sf / 125e3
    low_rate = 1 if sf >= 11 else 0
    bits = 8 * (app_bytes + LORA_OVERHEAD) - 4 * sf + 28 + 16
    symbols = 8 + max(math.ceil(bits / (4 * (sf - 2 * low_rate))) * 5, 0)
    return (8 + 4.25) * t_sym + symbols * t_sym


def lora_cost(nbytes: float, sf: int, per_packet: int) -> tuple[int, float]:
    """(packets, total airtime in s) of `nbytes` split over packets of at most `per_packet` bytes."""
    whole, rest = divmod(math.ceil(nbytes), per_packet)
    airtime = whole * lora_airtime_s(per_packet, sf) + (lora_airtime_s(rest, sf) if rest else 0.0)
    return whole + (1 if rest else 0), airtime


def pick(doc: Mapping[str, Any], strategy: str, ratio: float, shared: bool) -> tuple[str | None, bool]:
    """The codec chosen (on validation) for a target, or the smallest within its accuracy bounds; and whether it
    was the target's choice. `shared`: with the shared model held too."""
    chosen, nearest = (("chosen_with_shared_model", "smallest_with_shared_model") if shared
                       else ("chosen", "smallest_meeting_accuracy"))
    for row in doc["targets"]:
        if row["strategy"] == strategy and row["target"]["ratio"] == ratio:
            return (row["picks"][chosen], True) if row["picks"][chosen] else (row["picks"][nearest], False)
    return None, False


def codec_phrase(label: str, met: bool, ratio: float, b: Mapping[str, float]) -> str:
    how = f"meets the {ratio:.0f}x target" if met else f"the smallest payload within the {ratio:.0f}x target's bounds"
    return f"`{label}` ({b[label]:,.0f} B, {b[REFERENCE] / b[label]:.0f}x fewer than float32; {how})"


def shared_loss(doc: Mapping[str, Any], strategy: str, label: str) -> tuple[float, float]:
    """Least and most points the global head loses on a new user with this codec, over the regimes (test)."""
    losses = [-float(by_codec[label]["delta_new_user_points"]["mean"] or 0.0)
              for by_codec in doc["test"]["stats"][strategy].values()]
    return min(losses), max(losses)


def lora_line(label: str, b: Mapping[str, float]) -> str:
    costs = [(dr, *lora_cost(b[label], sf, size)) for dr, (sf, size) in LORA_RATES.items()]
    return f"`{label}`: " + "; ".join(f"{dr} {n} packet{'s' if n > 1 else ''}, {air:.2f} s on air, updates at least "
                                      f"{air / DUTY_CYCLE / 60:.1f} min apart" for dr, n, air in costs)


def guide(doc: Mapping[str, Any]) -> list[str]:
    """Which codec for which link, from the measured bytes (test) and the targets' choices (validation)."""
    stats = doc["test"]["stats"]
    first = stats[next(iter(stats))]
    b = {c: mean_bytes(first, c) for c in next(iter(first.values()))}
    down = float(np.mean([s[REFERENCE]["downlink_bytes"] for s in first.values()]))
    month = ROUNDS_PER_MONTH / 1e6
    lines = ["## Which codec for which link", "",
             f"From the numbers above: bytes from the test runs, choices from validation. Each update's uplink; "
             f"without a downlink codec a device downloads {down:,.0f} B a round (the whole model in every task and "
             "again on model/current, and the receipt) whatever the uplink codec.", "",
             "- **Wi-Fi, Ethernet**: bytes are nearly free. "
             + (f"`int8` in the frame ({b['int8']:,.0f} B"
                + (f", against {b[LEGACY_INT8]:,.0f} B for the int8 envelope devices sent before" if LEGACY_INT8 in b
                   else "") + ") or " if "int8" in b else "")
             + f"`float32` ({b[REFERENCE]:,.0f} B) where exactness matters."]

    def tested(label: str | None) -> TypeGuard[str]:
        """A choice made on validation may not have run on test (validation reused with fewer codecs or
        strategies)."""
        return label is not None and label in b and DEFAULT_STRATEGY in stats

    safe, safe_met = pick(doc, DEFAULT_STRATEGY, 32, shared=True)
    bold, bold_met = pick(doc, DEFAULT_STRATEGY, 32, shared=False)
    if tested(safe):
        text = (f"- **Metered cellular**: {codec_phrase(safe, safe_met, 32, b)} with the shared model held too: "
                f"at one round an hour a device sends {b[safe] * month:.2f} MB a month"
                + (f" instead of {b[LEGACY_INT8] * month:.2f} MB (int8 envelope)" if LEGACY_INT8 in b else "")
                + f", and downloads {down * month:.2f} MB with whole models: a `downlink_codec` cuts that part, "
                "most of the bill (bench/results/compression_downlink.md).")
        if tested(bold) and bold != safe:
            lo, hi = shared_loss(doc, DEFAULT_STRATEGY, bold)
            text += (f" Where only the devices' own accuracy counts ({DEFAULT_STRATEGY}'s personal heads), "
                     f"{codec_phrase(bold, bold_met, 32, b)}, but the shared model every new device starts from "
                     f"then loses {lo:.0f} to {hi:.0f} points (test).")
        lines.append(text)
    tiny, tiny_met = pick(doc, DEFAULT_STRATEGY, 100, shared=False)
    if tested(tiny):
        lo, hi = shared_loss(doc, DEFAULT_STRATEGY, tiny)
        text = ("- **LoRa (EU868)**, assuming the frame's bytes are split over LoRaWAN uplinks of at most 51 B "
                "(DR0-2), 115 B (DR3) or 222 B (DR4-5) of application payload, no fragmentation header, and the 1 % "
                "duty cycle: "
                f"{codec_phrase(tiny, tiny_met, 100, b)} for {DEFAULT_STRATEGY}, at a cost to the shared model of "
                f"{lo:.0f} to {hi:.0f} points on a new user. {lora_line(tiny, b)}.")
        if tested(safe) and safe != tiny:
            text += f" For comparison {lora_line(safe, b)}."
        text += (f" A round's {down:,.0f}-B download with whole models does not fit a LoRa downlink "
                 f"({math.ceil(down / 222)}+ packets), and even compressed (`downlink_codec`) it takes several: "
                 "LoRa carries the uplink.")
        lines.append(text)
    lines.append(f"- **Serial** (115,200 baud, about 11.5 kB/s): every codec takes under a second (the float32 "
                 f"frame {b[REFERENCE] / 11520:.2f} s); at 9,600 baud (960 B/s) the float32 frame takes "
                 f"{b[REFERENCE] / 960:.1f} s" + (f", `int8` {b['int8'] / 960:.1f} s" if "int8" in b else "")
                 + (f", `sign1` {b['sign1'] / 960:.2f} s." if "sign1" in b else "."))
    lines.append(f"- A signed update carries {SIGNATURE_SIZE} more bytes; the frame's fixed header is {HEADER_SIZE} "
                 "B, so at 100x the header is most of the payload.")
    if has_downlink_rows(stats):
        lines.append(downlink_guide(stats))
    return [*lines, ""]


def downlink_rows(stats: Stats) -> dict[str, list[tuple[str, Mapping[str, Any]]]]:
    """Downlink codec -> (uplink label, cell) over strategies, regimes and uplink codecs."""
    out: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for by_regime in stats.values():
        for cells in by_regime.values():
            for key, cell in cells.items():
                uplink, downlink = split_key(key)
                if downlink:
                    out.setdefault(downlink, []).append((uplink, cell))
    return out


def task_bytes(cells: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[float, float | None]:
    """(downlink bytes, ratio against the whole model) with the float32 frame uplink, as the whole-model figures:
    the float32 envelope's task is float32 whole tensors, not int8."""
    ref = [c for uplink, c in cells if uplink == REFERENCE]
    ratios = [c.get("downlink_ratio_vs_full_model") for c in ref]
    known = [float(r) for r in ratios if r is not None]
    return (float(np.mean([c["downlink_bytes"] for c in ref])),
            float(np.mean(known)) if known and len(known) == len(ratios) else None)


def downlink_guide(stats: Stats) -> str:
    """The round task's size per downlink codec: a month of it, and LoRa downlink packets at DR5."""
    month = ROUNDS_PER_MONTH / 1e6
    sizes = {d: task_bytes(cells)[0] for d, cells in downlink_rows(stats).items()}
    return ("- **Downlink**: the figures above send the whole model in every round task; with a compressed downlink "
            "(`downlink_codec`) a device downloads per round (task, change, receipt, and the whole model it reads "
            "once at the start, spread over the rounds) " + "; ".join(
                f"`{d}` {size:,.0f} B ({size * month:.2f} MB a month, {math.ceil(size / 222)} LoRa DR5 packets)"
                for d, size in sizes.items()) + ".")


def downlink_findings(stats: Stats) -> list[str]:
    """Per downlink codec: its bytes, the ratio against the whole model, and what it costs in mean accuracy against
    the same uplink codec with the whole model sent down."""
    lines = []
    for downlink, cells in downlink_rows(stats).items():
        size, ratio = task_bytes(cells)
        deltas = [float(c["delta_mean_vs_full_model_points"]["mean"]) for _, c in cells
                  if c["delta_mean_vs_full_model_points"]["mean"] is not None]
        lines.append(f"- Downlink `{downlink}`: {size:,.0f} B per device and round (float32 frame uplink)"
                     + (f", {ratio:.1f}x fewer than the whole model" if ratio is not None else "")
                     + (f"; mean accuracy against the same uplink codec with the whole model sent down "
                        f"{min(deltas):+.2f} to {max(deltas):+.2f} points over {len(deltas)} strategy, regime and "
                        "uplink cells." if deltas else "."))
    return lines


def worst_over_regimes(stats: Stats, strategy: str, label: str, key: str) -> float:
    """The most negative paired difference (points) of `key` over the regimes."""
    return min(float(cells[label][key]["mean"] or 0.0) for cells in stats[strategy].values())


def stochastic_note(stats: Stats) -> str | None:
    """When subsample+sr (sent without error feedback) loses far more than subsample, say so, with the numbers."""
    if "fedavg" not in stats:
        return None
    stats = full_model_rows(stats)
    pairs = [(c, c.removesuffix("+sr")) for c in next(iter(stats["fedavg"].values()))
             if c.startswith("subsample") and c.endswith("+sr")]
    pairs = [(sr, det) for sr, det in pairs if det in next(iter(stats["fedavg"].values()))]
    if not pairs:
        return None
    worse = [(sr, det, worst_over_regimes(stats, "fedavg", sr, "delta_mean_points"),
              worst_over_regimes(stats, "fedavg", det, "delta_mean_points")) for sr, det in pairs]
    if not all(a < 2 * b - 1 for _, _, a, b in worse):
        return None
    text = ", ".join(f"`{sr}` {a:+.1f} against `{det}` {b:+.1f}" for sr, det, a, b in worse)
    return (f"- Stochastic rounding does not pay for subsample (fedavg, mean device, worst regime: {text} points): "
            "+sr codecs go without error feedback (`CodecSpec.error_feedback`), and subsample sends its share of "
            "the coordinates without rescaling them, so the rest of every update is never delivered; the "
            "deterministic codec's error feedback delivers it in later rounds.")


def nearest_at_ratio(doc: Mapping[str, Any], strategy: str, ratio: float, b: Mapping[str, float]) -> str:
    """For a missed target: the codec closest to its accuracy bounds among those reaching the ratio (test)."""
    row = next(r for r in doc["targets"] if r["strategy"] == strategy and r["target"]["ratio"] == ratio)
    label = row["picks"]["closest_meeting_ratio"]
    if label is None:
        return "; no codec reaches the ratio."
    if label not in b:
        return f"; at the ratio, the least loss on validation is `{label}`'s, not run on test."
    stats = doc["test"]["stats"]
    return (f"; at the ratio, the least loss is `{label}`'s ({b[REFERENCE] / b[label]:.1f}x): mean "
            f"{worst_over_regimes(stats, strategy, label, 'delta_mean_points'):+.2f}, worst device "
            f"{worst_over_regimes(stats, strategy, label, 'delta_worst_points'):+.2f} points.")


def findings(doc: Mapping[str, Any]) -> list[str]:
    """The headline, from the targets' choices and the test numbers."""
    stats: Stats = doc["test"]["stats"]
    first = stats[next(iter(stats))]
    b = {c: mean_bytes(first, c) for c in next(iter(first.values()))}
    lines = ["## Findings (test numbers unless marked; choices made on validation)", ""]
    for strategy in stats:
        for ratio in sorted({t.ratio for t in TARGETS}):
            label, met = pick(doc, strategy, ratio, shared=False)
            if label is None:
                continue
            if label not in b:  # validation reused with fewer codecs on test
                lines.append(f"- {strategy}, {ratio:.0f}x target: {'met' if met else 'MISSED'} on validation; "
                             f"`{label}` (its choice or nearest point) not run on test.")
                continue
            mean_loss = worst_over_regimes(stats, strategy, label, "delta_mean_points")
            worst_loss = worst_over_regimes(stats, strategy, label, "delta_worst_points")
            state = "met on validation by" if met else "MISSED; the smallest payload within its accuracy bounds is"
            lines.append(f"- {strategy}, {ratio:.0f}x target: {state} `{label}` ({b[label]:,.0f} B, "
                         f"{b[REFERENCE] / b[label]:.1f}x); on test, at worst over the regimes, mean "
                         f"{mean_loss:+.2f} and worst device {worst_loss:+.2f} points; the shared model on a new user "
                         f"{worst_over_regimes(stats, strategy, label, 'delta_new_user_points'):+.2f}"
                         + ("." if met else nearest_at_ratio(doc, strategy, ratio, b)))
    safe, _ = pick(doc, DEFAULT_STRATEGY, 32, shared=True)
    if safe in b:
        lines.append(f"- Holding the shared model too, the most compressed codec within the 32x target's accuracy "
                     f"bounds is `{safe}` ({b[safe]:,.0f} B, {b[REFERENCE] / b[safe]:.1f}x the float32 frame"
                     + (f", {b[LEGACY_INT8] / b[safe]:.1f}x smaller than the int8 envelope devices sent before"
                        if LEGACY_INT8 in b else "") + ").")
    note = stochastic_note(stats)
    if note:
        lines.append(note)
    if has_downlink_rows(stats):
        lines += downlink_findings(stats)
    else:
        lines.append("- Downlink: these runs send the whole model (no `downlink_codec`): with every uplink codec a "
                     "device downloads the same "
                     f"{float(np.mean([c[REFERENCE]['downlink_bytes'] for c in first.values()])):,.0f} B a round; "
                     "`--downlink-codecs` measures compressed downlinks (bench/results/compression_downlink.md).")
    return [*lines, ""]


def markdown(doc: Mapping[str, Any], phase: str) -> str:
    c = doc["config"]
    part = doc[phase]
    lines = [f"# Update codecs: accuracy against bytes ({phase.upper()}: seeds {part['seeds']}, {c['rounds']} "
             f"rounds, 6 devices, `bench/compression.py`)", "",
             f"Whole MQTT payload per update (header included), mean over seeds and regimes. 'frame' codecs send "
             f"the change from the global model with error feedback in the {HEADER_SIZE}-byte-header update frame; "
             f"`{LEGACY_INT8}` / `{LEGACY_FLOAT32}` are the JSON-headed envelopes of the whole tensors that devices "
             "sent before. "
             + ("Downlink: everything a device downloads per round (task, model or its change, receipt); rows "
                "`<uplink> down:<codec>` send the global model as the change from the "
                "version before in that codec (`downlink_codec`), the others the whole model (int8 unless the float32 "
                "envelope is used); 'x vs whole model' against the same uplink codec's whole-model row. "
                if has_downlink_rows(part["stats"]) else
                "Downlink: everything a device downloads per round: the round task and model/current, each with the "
                "whole model (int8 unless the float32 envelope is used), and the receipt. ")
             + "CPU per update on real updates of this run (device: error feedback + frame; aggregator: decoding).",
             ""]
    if phase == "test" and doc.get("targets"):
        lines += findings(doc)
    lines += ["## Bytes and CPU per update", "", *bytes_table(part["stats"], doc.get("timing"))]
    if has_downlink_rows(part["stats"]):
        for strategy, by_regime in part["stats"].items():
            lines += ["", f"## {strategy}: downlink codecs, final mean accuracy % ({phase}) (paired Δ vs the same "
                      "uplink codec with the whole model sent down, and vs the float32 frame, points ± 95 % CI "
                      "half-width)", "", *downlink_table(by_regime)]
    for strategy, by_regime in part["stats"].items():
        note = " (default)" if strategy == DEFAULT_STRATEGY else " (every device runs the global head: the worst case)"
        lines += ["", f"## {strategy}{note}: final accuracy % ({phase}), (paired Δ vs float32 frame, points ± 95 % "
                  "CI half-width)", "", *accuracy_table(by_regime)]
    lines += ["", "## The global head alone on a new user (no labels): accuracy % (paired Δ vs float32 frame ± 95 % "
              "CI half-width)", "", "What ditto's personal heads hide of a codec's damage: the shared model itself, "
              "which every new device starts from."
              + (f" The strategies' global heads score alike ({', '.join(part['stats'])}: ditto's shared model "
                 "trains as fedavg's), so one set of columns."
                 if len(part["stats"]) > 1 and same_new_user(part["stats"]) else ""),
              "", *new_user_table(part["stats"]), ""]
    if doc.get("targets"):
        lines += targets_section(doc["targets"], doc)
        if phase == "test":
            lines += guide(doc)
    if doc.get("environment"):
        lines.append(benchlib.env_summary_md(doc["environment"]))
    return "\n".join(lines) + "\n"


# --- plot ----------------------------------------------------------------------------------------------------------


FAMILIES = {"float": "tab:blue", "int": "tab:cyan", "sign1": "tab:purple", "topk": "tab:orange",
            "subsample": "tab:green", "subsample+sr": "tab:olive", "envelope": "tab:red"}


def family(label: str) -> str:
    if label.startswith("envelope"):
        return "envelope"
    if label.startswith("subsample"):
        return "subsample+sr" if label.endswith("+sr") else "subsample"
    for name in ("topk", "sign1", "int"):
        if label.startswith(name):
            return name
    return "float"


def plot(doc: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = full_model_rows(doc["test"]["stats"])  # the downlink rows would sit on their uplink codec's points
    regimes = list(next(iter(stats.values())))
    fig, axes = plt.subplots(len(stats), len(regimes), figsize=(5.2 * len(regimes), 4.4 * len(stats)), dpi=110,
                             squeeze=False)
    for row, (strategy, by_regime) in enumerate(stats.items()):
        for col, regime in enumerate(regimes):
            plot_panel(axes[row][col], by_regime[regime], f"{strategy}, {regime}")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Final accuracy against uplink bytes per update (test, mean of seeds {doc['test']['seeds']}, "
                 f"{doc['config']['rounds']} rounds): filled = mean device, hollow = worst device", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


REFERENCE_MARKERS = {REFERENCE: ("*", "black", "float32 frame (reference)"),
                     LEGACY_INT8: ("s", "tab:red", "int8 envelope (before)"),
                     LEGACY_FLOAT32: ("D", "tab:red", "float32 envelope (before)")}
LABELLED = ("int8", "int4", "sign1", "sign1+rot", "float16")


def plot_panel(ax: Any, cells: Mapping[str, Mapping[str, Any]], title: str) -> None:
    for name, colour in FAMILIES.items():
        members = sorted((c for c in cells if family(c) == name and c not in REFERENCE_MARKERS),
                         key=lambda c: cells[c]["uplink_bytes"])
        if not members:
            continue
        x = [cells[c]["uplink_bytes"] for c in members]
        ladder = name in ("topk", "subsample", "subsample+sr")
        ax.plot(x, [100 * cells[c]["mean_acc"] for c in members], marker="o", linestyle="-" if ladder else "none",
                color=colour, label=name, markersize=5)
        ax.plot(x, [100 * cells[c]["worst_acc"] for c in members], marker="o", linestyle=":" if ladder else "none",
                color=colour, markerfacecolor="none", markersize=5)
    for label, (marker, colour, text) in REFERENCE_MARKERS.items():
        if label in cells:
            x = cells[label]["uplink_bytes"]
            ax.plot([x], [100 * cells[label]["mean_acc"]], marker=marker, color=colour, linestyle="none",
                    markersize=9, label=text)
            ax.plot([x], [100 * cells[label]["worst_acc"]], marker=marker, color=colour, linestyle="none",
                    markersize=9, markerfacecolor="none")
    for label in LABELLED:
        if label in cells:
            ax.annotate(label, (cells[label]["uplink_bytes"], 100 * cells[label]["mean_acc"]), fontsize=6,
                        textcoords="offset points", xytext=(-4, 6), rotation=45)
    ax.set_xscale("log")
    ax.margins(y=0.12)  # room for the labels above the highest points
    ref = cells[REFERENCE]["uplink_bytes"]
    for ratio in (32, 100):
        ax.axvline(ref / ratio, color="grey", linestyle="--", linewidth=0.7)
        ax.annotate(f"{ratio}x", (ref / ratio, 0.02), xycoords=("data", "axes fraction"), fontsize=7, color="grey",
                    xytext=(2, 0), textcoords="offset points")
    ax.set_xlabel("uplink bytes per update (whole payload, log)")
    ax.set_ylabel("final accuracy %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")


# --- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", help="test seeds (default 0-4; --quick: 0)")
    ap.add_argument("--validation-seeds", type=int, nargs="+", help="default 100-104 (--quick: 100)")
    ap.add_argument("--rounds", type=int, help="default 30 (--quick: 10)")
    ap.add_argument("--codecs", nargs="+", help=f"labels: codec specs or {LEGACY_INT8} / {LEGACY_FLOAT32}, "
                    "space- or comma-separated (float32 and the float32 envelope are always added: the references)")
    ap.add_argument("--downlink-codecs", nargs="+", default=[],
                    help="also run every codec with each of these TrainingConfig.downlink_codec specs, space- or "
                    "comma-separated (default none: the whole model in every round task; that row is always kept)")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES))
    ap.add_argument("--timing-repeats", type=int, default=3, help="timed blocks per codec (each: every update)")
    ap.add_argument("--quick", action="store_true", help="a 2-minute check; writes to a temp dir unless --out-dir")
    ap.add_argument("--reuse-validation", action="store_true",
                    help="skip the validation runs: read compression_validation.json from --out-dir")
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown and plot from the saved JSON")
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2, 3, 4])
    args.validation_seeds = args.validation_seeds or ([100] if quick else [100, 101, 102, 103, 104])
    args.rounds = args.rounds or (10 if quick else 30)
    codecs = split_labels(args.codecs) if args.codecs else list(QUICK_CODECS if quick else CODECS)
    args.codecs = [c for c in (REFERENCE, LEGACY_FLOAT32) if c not in codecs] + codecs
    args.downlink_codecs = [d for d in split_labels(args.downlink_codecs) if d not in FULL_MODEL]
    for label in args.codecs:
        if label not in LEGACY:
            CodecSpec.parse(label)  # a typo fails now, not after half an hour of runs
    for label in args.downlink_codecs:
        CodecSpec.parse(label)
    args.out_dir = args.out_dir or (Path(tempfile.gettempdir()) / "edge-fl-compression-quick" if quick
                                    else benchlib.RESULTS_DIR)
    return args


def split_labels(values: Sequence[str]) -> list[str]:
    """Labels given as separate arguments or comma-separated ("int8,sign1"), in order, once each. An empty
    argument stays (the whole-model downlink: --downlink-codecs "")."""
    parts = [p.strip() for v in values for p in (v.split(",") if v else [v])]
    return list(dict.fromkeys(parts))


def write(doc: Mapping[str, Any], out_dir: Path, name: str, phase: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(doc, phase))


def phase_doc(embedded: Any, args: argparse.Namespace, validation: bool) -> dict[str, Any]:
    seeds = args.validation_seeds if validation else args.seeds
    t0 = time.perf_counter()
    grid = run_grid(embedded, row_keys(args.codecs, args.downlink_codecs), args.strategies, args.regimes, seeds,
                    args.rounds, validation)
    return {"seeds": seeds, "scored_on": "validation" if validation else "test", "per_seed": grid,
            "stats": grid_stats(grid), "elapsed_s": time.perf_counter() - t0}


def render(out_dir: Path) -> None:
    """Statistics, choices, markdown and plot again from the saved per-seed results (no simulation)."""
    vdoc = json.loads((out_dir / f"{NAME}_validation.json").read_text())
    vdoc["validation"]["stats"] = grid_stats(vdoc["validation"]["per_seed"])
    vdoc["targets"] = target_report(vdoc["validation"]["stats"], None)
    write(vdoc, out_dir, f"{NAME}_validation", "validation")
    doc = json.loads((out_dir / f"{NAME}.json").read_text())
    doc["test"]["stats"] = grid_stats(doc["test"]["per_seed"])
    doc["targets"] = target_report(vdoc["validation"]["stats"], doc["test"]["stats"])
    write(doc, out_dir, NAME, "test")
    plot(doc, out_dir / f"{NAME}.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        render(args.out_dir)
        return 0
    benchlib.warn_openblas_env()
    t0 = time.perf_counter()
    embedded = embed_dataset(load_watch_dataset(), FrozenBackbone(), cache=EmbeddingCache(default_cache_dir()))
    config = {"rounds": args.rounds, "seeds": args.seeds, "validation_seeds": args.validation_seeds,
              "strategies": args.strategies, "regimes": args.regimes, "devices": 6, "reference": REFERENCE,
              "codecs": {c: {"codec": "", "int8_updates": LEGACY[c]} if c in LEGACY else {"codec": c, "int8_updates":
                             True} for c in args.codecs},
              "downlink_codecs": args.downlink_codecs,
              "frame_header_bytes": HEADER_SIZE, "signature_bytes": SIGNATURE_SIZE, "lora_rates": LORA_RATES}
    validation_path = args.out_dir / f"{NAME}_validation.json"
    if args.reuse_validation:
        vdoc = json.loads(validation_path.read_text())
        config["validation_seeds"] = vdoc["validation"]["seeds"]  # the seeds the choices were made on
        log(f"validation: reusing {validation_path} (seeds {vdoc['validation']['seeds']})")
    else:
        log(f"validation: {len(args.codecs)} codecs x {1 + len(args.downlink_codecs)} downlinks x "
            f"{len(args.strategies)} strategies x {len(args.regimes)} regimes x seeds {args.validation_seeds}, "
            f"{args.rounds} rounds")
        vdoc = {"benchmark": f"{NAME}_validation", "description": __doc__, "config": config,
                "validation": phase_doc(embedded, args, validation=True), "environment": benchlib.environment()}
        vdoc["targets"] = target_report(vdoc["validation"]["stats"], None)
        write(vdoc, args.out_dir, f"{NAME}_validation", "validation")
    log(f"test: seeds {args.seeds}")
    test = phase_doc(embedded, args, validation=False)
    log("timing: device encode and aggregator decode per update")
    timing = measure_timing(embedded, args.codecs, args.rounds, args.timing_repeats)
    doc = {"benchmark": NAME, "description": __doc__, "config": config, "test": test, "timing": timing,
           "targets": target_report(vdoc["validation"]["stats"], test["stats"]),
           "environment": benchlib.environment(), "elapsed_s": time.perf_counter() - t0}
    write(doc, args.out_dir, NAME, "test")
    plot(doc, args.out_dir / f"{NAME}.png")
    print(markdown(doc, "test"))
    log(f"written to {args.out_dir} in {doc['elapsed_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
