"""Head state on disk: an .npz of plain arrays plus a JSON metadata entry. Never pickle.

Loading uses `allow_pickle=False`, so a tampered file can at worst fail to load, not run code.
Writes are atomic (see fsutil), so a power cut leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from .fsutil import atomic_write

FORMAT = "edge-fl-head-state/1"
_META = "__meta__"


class StateError(RuntimeError):
    """A head-state file is missing, damaged or of another format."""


def save_head_state(path: str | os.PathLike[str], params: Mapping[str, np.ndarray],
                    meta: Mapping[str, Any] | None = None) -> None:
    if _META in params:
        raise ValueError(f"{_META!r} is reserved for metadata")
    doc = {"format": FORMAT, **(meta or {})}
    arrays = {k: np.asarray(v) for k, v in params.items()}
    for k, v in arrays.items():
        if v.dtype == object:
            raise ValueError(f"tensor {k!r} has dtype object; only numeric arrays are stored")
    arrays[_META] = np.frombuffer(json.dumps(doc, sort_keys=True).encode(), dtype=np.uint8)
    # allow_pickle spelled out: it also keeps a tensor named "allow_pickle" from being taken for the flag.
    atomic_write(path, lambda fh: np.savez(fh, allow_pickle=False, **arrays))


def load_head_state(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise StateError(f"head state not found: {path}") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise StateError(f"{path}: not a readable head-state file ({exc}); "
                         "delete it to start from the global head") from exc
    if _META not in arrays:
        raise StateError(f"{path}: no metadata entry; not an edge-fl head state")
    try:
        meta = json.loads(arrays.pop(_META).tobytes())
    except ValueError as exc:
        raise StateError(f"{path}: metadata is not JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise StateError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return arrays, meta
