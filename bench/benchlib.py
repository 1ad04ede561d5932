"""Shared helpers for the benchmarks in bench/: environment record, statistics, subprocess runs, output files.

Imports only the standard library at module level, so a worker process that imports this module
measures the memory and import cost of its framework, not of this helper. numpy is imported lazily.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Set on some machines as a workaround for an old OpenBLAS; they slow down the OpenBLAS that current
# numpy wheels bundle. Every result records whether they were set.
OPENBLAS_VARS: tuple[str, ...] = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# run_all.sh lists here the OPENBLAS_* variables it removed, since the benchmark itself can no longer see them.
UNSET_NOTE_VAR = "EDGEFL_BENCH_UNSET"

# Distributions whose versions we record; read from metadata so that nothing heavy gets imported.
DISTRIBUTIONS: tuple[str, ...] = (
    "edge-fl", "numpy", "ai-edge-litert", "tflite-runtime", "tensorflow", "tensorflow-cpu", "keras",
    "torch", "psutil", "threadpoolctl", "matplotlib", "seglearn",
)


# ---------------------------------------------------------------- memory and time

def _proc_status_kb(field: str) -> float | None:
    """A `kB` field of /proc/self/status (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size in MB (MiB), from /proc so that no psutil import is needed."""
    kb = _proc_status_kb("VmRSS")
    return round((kb if kb is not None else 0.0) / 1024.0, 2)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM; getrusage's ru_maxrss as a fallback)."""
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        kb = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux
    return round(kb / 1024.0, 2)


def monotonic() -> float:
    """CLOCK_MONOTONIC is system-wide on Linux, so stamps from a parent and its child can be subtracted."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements; the raw samples are kept for later analysis."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        return {"n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) >= 2 else [xs[0]] * 3
    return {
        "n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1],
        "q1": q[0], "q3": q[2], "samples": [float(x) for x in samples],
    }


def spread_pct(stats: Mapping[str, Any]) -> float:
    """Interquartile range as a percentage of the median: one number for how noisy a row is."""
    med = float(stats.get("median") or 0.0)
    return 100.0 * (float(stats["q3"]) - float(stats["q1"])) / med if med else float("nan")


# ---------------------------------------------------------------- environment

def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def interpreter_packages(python: str | os.PathLike[str]) -> dict[str, Any]:
    """Python and package versions of ANOTHER interpreter (e.g. the device venv), asked in a subprocess."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(d):\n"
            "    try: return m.version(d)\n"
            "    except m.PackageNotFoundError: return None\n"
            f"print(json.dumps({{'python': sys.version.split()[0], 'packages': {{d: v(d) for d in {list(DISTRIBUTIONS)!r}}}}}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _openblas_runtime() -> dict[str, Any]:
    """Ask the OpenBLAS that numpy loaded which kernel set it picked at run time.

    This is what OPENBLAS_CORETYPE overrides, and the build config alone does not show it.
    """
    libs: list[str] = []
    try:
        with open("/proc/self/maps") as fh:
            libs = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line})
    except OSError:
        return {}
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        info: dict[str, Any] = {"library": lib}
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                for what in ("get_corename", "get_config", "get_num_threads"):
                    fn = getattr(handle, f"{prefix}openblas_{what}{suffix}", None)
                    if fn is None or what in info:
                        continue
                    fn.restype = ctypes.c_int if what == "get_num_threads" else ctypes.c_char_p
                    value = fn()
                    info[what] = value.decode() if isinstance(value, bytes) else value
        return info
    return {}


def blas_info() -> dict[str, Any]:
    """Which BLAS numpy uses: threadpoolctl if installed, else numpy's build config plus an OpenBLAS query."""
    import numpy as np

    info: dict[str, Any] = {"numpy": np.__version__}
    if importlib.util.find_spec("threadpoolctl") is not None:
        import threadpoolctl

        info["source"] = "threadpoolctl"
        info["threadpools"] = threadpoolctl.threadpool_info()
    else:
        info["source"] = "numpy.show_config + OpenBLAS query (threadpoolctl not installed)"
        try:
            config = np.show_config(mode="dicts")  # numpy >= 1.25
            info["build_blas"] = config.get("Build Dependencies", {}).get("blas")
            info["simd"] = config.get("SIMD Extensions")
        except TypeError:
            info["build_blas"] = "numpy too old for show_config(mode='dicts')"
    info["openblas_runtime"] = _openblas_runtime()
    return info


def openblas_env() -> dict[str, Any]:
    return {
        "seen_by_process": {name: os.environ.get(name) for name in OPENBLAS_VARS},
        "unset_by_launcher": [v for v in os.environ.get(UNSET_NOTE_VAR, "").split(",") if v],
    }


def _git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "edge_agent", "models"))}
    except OSError:
        return {}


def environment() -> dict[str, Any]:
    """Everything needed to judge whether two result files are comparable."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "packages": package_versions(),
        "blas": blas_info(),
        "openblas_env": openblas_env(),
        "git": _git_state(),
    }


def warn_openblas_env() -> None:
    """A loud line when the slow OpenBLAS overrides are active, since numbers then are not comparable."""
    present = [f"{v}={os.environ[v]}" for v in OPENBLAS_VARS if v in os.environ]
    if present:
        print(f"warning: {', '.join(present)} set; numpy timings are slowed. Use bench/run_all.sh, or "
              f"`env -u {' -u '.join(OPENBLAS_VARS)} ...`", file=sys.stderr)


# ---------------------------------------------------------------- subprocesses

def run_json_subprocess(cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
                        timeout_s: float = 600.0) -> dict[str, Any]:
    """Run a worker that prints one JSON object as its last stdout line; add wall time and CPU times.

    os.wait4 gives the rusage of exactly this child. Its ru_maxrss is NOT the child's own peak: Linux
    carries the high-water mark across fork+exec, so it includes the parent's RSS at spawn time. Peak
    memory therefore comes from the worker's own VmHWM (per address space, reset by exec).
    """
    start = monotonic()
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=err, text=True,
                                env=dict(env) if env is not None else None, cwd=REPO_ROOT)
        assert proc.stdout is not None
        out = proc.stdout.read()  # the worker's stdout is small: one JSON line plus maybe a marker
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = monotonic() - start
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd)} failed with exit code {proc.returncode}:\n{stderr[-4000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker {' '.join(cmd)} printed no JSON result. stderr:\n{stderr[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["parent_view"] = {
        "spawn_monotonic": start,
        "wall_s": wall,
        "ru_maxrss_mb_includes_parent": round(usage.ru_maxrss / 1024.0, 2),
        "user_cpu_s": usage.ru_utime,
        "system_cpu_s": usage.ru_stime,
    }
    return result


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for workers: ours (OpenBLAS variables included, so they are measured as launched)."""
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    env.update(extra or {})
    return env


# ---------------------------------------------------------------- output

def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def env_summary_md(env: Mapping[str, Any]) -> str:
    """Two lines under every table, so a pasted table still says where it came from."""
    pk = env["packages"]
    blas = env["blas"].get("openblas_runtime", {})
    ob = env["openblas_env"]
    set_vars = [k for k, v in ob["seen_by_process"].items() if v is not None]
    versions = ", ".join(f"{k} {v}" for k, v in pk.items() if v and k in (
        "numpy", "ai-edge-litert", "tflite-runtime", "tensorflow", "tensorflow-cpu", "keras", "torch"))
    return (
        f"Environment: {env['date_utc']}, Python {env['python']}, {versions}; "
        f"{env['cpu_count']} CPUs ({env['cpu_model']}), load avg {env['load_average_1_5_15']}.\n"
        f"BLAS: {blas.get('get_config', 'unknown')} core {blas.get('get_corename', '?')}; "
        f"OPENBLAS_* overrides {'SET: ' + ', '.join(set_vars) if set_vars else 'not set'}"
        f"{' (unset by launcher: ' + ', '.join(ob['unset_by_launcher']) + ')' if ob['unset_by_launcher'] else ''}."
    )


def write_results(name: str, doc: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    json_path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def emit_worker_result(result: Mapping[str, Any]) -> None:
    """A worker's only stdout output: one JSON line (the parent reads the last line starting with '{')."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
