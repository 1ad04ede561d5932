"""How the backbone runs on this machine: the batch size and op resolver, decided once by a probe.

Why a probe, and why in a child process: on 32-bit Raspberry Pi OS (armv7l, emulated by qemu in a
Debian 12 chroot), tflite-runtime 2.14 crashes with SIGSEGV inside `invoke()` at every batch larger than
1, with the default kernels and with `reference_kernels` (the builtin kernels without the default
delegates) alike; batch 1 runs with both. (TFLite's BUILTIN_REF resolver runs at any batch size there, but
at batch 64 it is slower than the optimized kernels one window at a time: 1.18 s against 0.76 s for 512
windows, so it is not a candidate.) Whether real armv7 hardware crashes too is not known, and other
boards may fail elsewhere: hence a probe rather than a rule per `platform.machine()`.

A segfault ends the process that has it, so it cannot be caught where it happens: each candidate is tried
in a short-lived child (`python -m edge_agent.backbone_plan`) that loads the model, invokes it at that
batch size and checks the batched rows equal one-window-at-a-time rows. The first candidate that works
is the plan. Order: the requested (or default) batch with the default kernels, the same batch without
the delegates, then batch 1 with each (batching first: it is worth more than the delegate).

Some models cannot batch at all: one whose input batch dimension is fixed at 1 (its shape signature says
so; resizing it fails, or succeeds and computes garbage where a RESHAPE has the batch baked in), or one
that keeps state between invocations. FrozenBackbone gives those a `max_batch_size` of 1: only batch 1 is
probed, for the kernels alone. An intermediate feature tensor (read with every tensor kept) caps the
batch by memory, and the child runs the model the same way (`--preserve-all-tensors`) and checks that
tensor's batched rows too (`--feature-tensor`): a tensor whose first dimension is not the batch fails there.

The verdict is remembered per (model sha256, runtime and its version, machine, threads, what was asked)
in a small JSON file in the cache directory, so a device probes once, not at every start. A setting the
caller gives explicitly is never second-guessed: with both given there is nothing to probe.

`EDGE_FL_PROBE_CRASH` (comma-separated patterns such as ``default@64`` or ``*``) makes the probe child
kill itself with SIGSEGV for the matching candidates. Only the child reads it: it lets a test on x86_64
take the fallback path for real, with a real crashed process, which this machine cannot produce itself.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .codec.digest import sha256
from .fsutil import atomic_write

log = logging.getLogger("edge_fl.backbone")

DEFAULT_BATCH_SIZE = 64
PROBE_TIMEOUT_S = 300.0  # a Pi Zero, or qemu user-mode emulation, takes seconds to import numpy and the runtime
CRASH_ENV = "EDGE_FL_PROBE_CRASH"
_VERDICT_FORMAT = 1


@dataclass(frozen=True)
class RunPlan:
    """How to run the backbone: what was picked, how (explicit, probed or remembered), and what was tried."""

    batch_size: int
    reference_kernels: bool
    source: str  # "explicit" (the caller said so), "probed" (now, in a child), "remembered" (a cached verdict)
    tried: tuple[str, ...] = ()  # "default@64: crashed (SIGSEGV)", ... in the order tried

    def describe(self) -> str:
        kernels = "reference kernels" if self.reference_kernels else "default kernels"
        how = {"explicit": "as configured", "probed": "probed now", "remembered": "remembered verdict"}[self.source]
        tried = f"; tried {', '.join(self.tried)}" if self.tried else ""
        return f"batch {self.batch_size}, {kernels} ({how}{tried})"


class NoWorkingPlan(RuntimeError):
    """Every candidate crashed or failed in the probe."""


def candidate_label(batch_size: int, reference_kernels: bool) -> str:
    return f"{'reference' if reference_kernels else 'default'}@{batch_size}"


def candidates(batch_size: int | None, reference_kernels: bool | None,
               max_batch_size: int | None = None) -> list[tuple[int, bool]]:
    """(batch size, reference kernels) to try, best first; an explicit setting is the only value tried for it.
    `max_batch_size` lowers the default batch (an explicit one is the caller's to choose)."""
    default = DEFAULT_BATCH_SIZE if max_batch_size is None else max(1, min(DEFAULT_BATCH_SIZE, max_batch_size))
    batches = [batch_size] if batch_size is not None else sorted({default, 1}, reverse=True)
    resolvers = [reference_kernels] if reference_kernels is not None else [False, True]
    return [(b, r) for b in batches for r in resolvers]


def default_plan_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge-fl" / "backbone-runner"


@dataclass(frozen=True)
class PlanKey:
    """Everything a verdict depends on: the same model may crash under another runtime, version or CPU."""

    model_sha256: str
    runtime: str
    runtime_version: str
    machine: str
    num_threads: int
    asked_batch_size: int | None
    asked_reference_kernels: bool | None
    max_batch_size: int | None = None  # 1: the model cannot batch (fixed batch dimension, state); else a memory cap
    preserve_all_tensors: bool = False  # the feature tensor is not an output: every tensor is kept
    feature_tensor: int | None = None  # that tensor's index, checked batched against one window at a time

    def as_doc(self) -> dict[str, Any]:
        """The key as stored: the later fields only when set, so verdicts written before them still match."""
        doc = asdict(self)
        for name, default in (("max_batch_size", None), ("preserve_all_tensors", False), ("feature_tensor", None)):
            if doc[name] == default:
                del doc[name]
        return doc

    def digest(self) -> str:
        h = sha256()
        h.update(json.dumps(self.as_doc(), sort_keys=True).encode())
        return h.hexdigest()[:24]


_remembered: dict[PlanKey, RunPlan] = {}  # one probe per process, even where the cache directory is read-only


def plan_run(model_path: Path, key: PlanKey, plan_dir: Path | None = None) -> RunPlan:
    """The plan for running this model here: explicit settings as given, else a remembered or probed verdict."""
    if key.asked_batch_size is not None and key.asked_reference_kernels is not None:
        return RunPlan(key.asked_batch_size, key.asked_reference_kernels, "explicit")
    if key in _remembered:
        return _remembered[key]
    path = (plan_dir or default_plan_dir()) / f"{key.digest()}.json"
    plan = _read_verdict(path, key)
    if plan is None:
        plan = _probe(model_path, key)
        _write_verdict(path, key, plan)
        logged = log.warning if len(plan.tried) > 1 else log.info  # a fallback is worth an operator's attention
        logged("backbone runner for %s on %s (%s %s): %s", model_path.name, key.machine, key.runtime,
               key.runtime_version, plan.describe())
    else:
        log.info("backbone runner for %s: %s, from %s", model_path.name, plan.describe(), path)
    _remembered[key] = plan
    return plan


def _read_verdict(path: Path, key: PlanKey) -> RunPlan | None:
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != _VERDICT_FORMAT or doc.get("key") != key.as_doc():
            return None  # another format, or (astronomically unlikely) a digest collision: probe again
        batch, ref = int(doc["batch_size"]), bool(doc["reference_kernels"])
        if (batch, ref) not in candidates(key.asked_batch_size, key.asked_reference_kernels, key.max_batch_size):
            return None
        return RunPlan(batch, ref, "remembered", tuple(str(t) for t in doc.get("tried", ())))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("ignoring unreadable backbone runner verdict %s (%s); probing again", path, exc)
        return None


def _write_verdict(path: Path, key: PlanKey, plan: RunPlan) -> None:
    doc = {"format": _VERDICT_FORMAT, "key": key.as_doc(), "batch_size": plan.batch_size,
           "reference_kernels": plan.reference_kernels, "tried": list(plan.tried)}
    data = json.dumps(doc, indent=1).encode()

    def write(fh: BinaryIO) -> None:
        fh.write(data)

    try:
        atomic_write(path, write, durable=False)
    except OSError as exc:
        log.warning("cannot remember the backbone runner verdict in %s (%s): this process keeps it, the next one "
                    "probes again; set XDG_CACHE_HOME to a writable directory to keep it", path, exc)


def _probe(model_path: Path, key: PlanKey) -> RunPlan:
    tried: list[str] = []
    for batch, ref in candidates(key.asked_batch_size, key.asked_reference_kernels, key.max_batch_size):
        label = candidate_label(batch, ref)
        outcome = _probe_one(model_path, key, batch, ref)
        tried.append(f"{label}: {outcome}")
        if outcome == "ok":
            return RunPlan(batch, ref, "probed", tuple(tried))
    raise NoWorkingPlan(f"{model_path}: the backbone crashed or failed with every runner setting tried under "
                        f"{key.runtime} {key.runtime_version} on {key.machine}: {'; '.join(tried)}. "
                        "Try another runtime (--runtime) or check the model with another machine.")


def _probe_one(model_path: Path, key: PlanKey, batch: int, reference_kernels: bool) -> str:
    # The child runs this very package, wherever it was imported from (a source tree, a venv, a wheel).
    root = str(Path(__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {root!r}); from edge_agent.backbone_plan import probe_main; " \
           "sys.exit(probe_main())"
    cmd = [sys.executable, "-c", code, str(model_path), "--runtime", key.runtime,
           "--batch-size", str(batch), "--threads", str(key.num_threads)]
    if reference_kernels:
        cmd.append("--reference-kernels")
    if key.preserve_all_tensors:
        cmd.append("--preserve-all-tensors")
    if key.feature_tensor is not None:
        cmd += ["--feature-tensor", str(key.feature_tensor)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no answer in {PROBE_TIMEOUT_S:.0f} s"
    if proc.returncode == 0:
        return "ok"
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"crashed ({name})"
    last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return f"failed ({last})"


# --- the probe child ---------------------------------------------------------------------------------


def probe_inputs(details: dict[str, Any], batch: int, seed: int = 0) -> Any:
    """Random windows for the model's input (details as the interpreter gives them): the whole range of
    an integer type, standard normal for a float one."""
    import numpy as np

    shape = (batch, *(int(d) for d in details["shape"][1:]))
    rng = np.random.default_rng(seed)
    dtype = np.dtype(details["dtype"])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def _invoke(interp: Any, x: Any, feature_tensor: int | None) -> list[Any]:
    inp = interp.get_input_details()[0]
    if list(x.shape) != [int(d) for d in inp["shape"]]:
        interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    tensors = [int(o["index"]) for o in interp.get_output_details()]
    return [interp.get_tensor(t).copy() for t in tensors + ([feature_tensor] if feature_tensor is not None else [])]


def probe_main(argv: Sequence[str] | None = None) -> int:
    """Run the model once at one (batch size, op resolver); exit 0 when it works and batching changes nothing."""
    parser = argparse.ArgumentParser(prog="python -m edge_agent.backbone_plan",
                                     description="Probe one backbone runner setting (edge-fl runs this itself).")
    parser.add_argument("model", type=Path)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference-kernels", action="store_true")
    parser.add_argument("--preserve-all-tensors", action="store_true")
    parser.add_argument("--feature-tensor", type=int)
    args = parser.parse_args(argv)
    from .backbone import BackboneError, load_interpreter_module, open_interpreter

    try:
        _, module = load_interpreter_module(args.runtime)
        interp = open_interpreter(module, args.model, num_threads=args.threads,
                                  reference_kernels=args.reference_kernels,
                                  preserve_all_tensors=args.preserve_all_tensors)
        x = probe_inputs(interp.get_input_details()[0], args.batch_size)
        patterns = [p.strip() for p in os.environ.get(CRASH_ENV, "").split(",") if p.strip()]
        if any(fnmatch.fnmatch(candidate_label(args.batch_size, args.reference_kernels), p) for p in patterns):
            os.kill(os.getpid(), signal.SIGSEGV)  # the injected fault: a real crash of this process
        batched = _invoke(interp, x, args.feature_tensor)
        if args.batch_size > 1:
            single = _invoke(interp, x[:1], args.feature_tensor)
            if any(b.shape[1:] != s.shape[1:] or not (b[:1] == s).all() for b, s in zip(batched, single, strict=True)):
                print("batched outputs differ from one window at a time", file=sys.stderr)
                return 3
    except BackboneError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"ok: {candidate_label(args.batch_size, args.reference_kernels)} on {platform.machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(probe_main())
