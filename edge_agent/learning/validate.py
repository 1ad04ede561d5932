"""Is a head's set of tensors safe to use? One pure check that the aggregator and every device share.

A global model, the head a round task carries, and what a training step produced all pass through
`check_head_params` before anything uses or stores them. Finite values are not enough: an update of
1e30 averages into a finite global head whose first training step overflows float32 on every device
at once. So every value must also lie within a magnitude bound: the one a task announces, never above
`HARD_MAX_ABS` (a device does not let the network talk it into any bound at all), `DEFAULT_MAX_ABS`
when nothing is announced. A head of standardized embeddings holds values of order 1; the nearest-class-
mean initialization puts absent classes about 1e3 below the rest; 1e4 leaves room for both.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np

from .head import HeadConfig

DEFAULT_MAX_ABS = 1e4  # the bound on |weight| when the task announces none
HARD_MAX_ABS = 1e6  # no announced bound counts above this: far from float32 overflow for any head we build
# A head's config comes from the network too: a device would build (allocate) a head of this many weights. Ours
# have a few thousand; 4 M float32 weights (16 MB) is beyond any head a device should run.
MAX_HEAD_WEIGHTS = 1 << 22


class InvalidHeadError(ValueError):
    """Tensors that must not be used: the message names the tensor and what is wrong with it."""


def effective_bound(announced: float | None) -> float:
    """The magnitude bound to enforce: the announced one if sane, capped at HARD_MAX_ABS."""
    if announced is None or not math.isfinite(announced) or announced <= 0:
        return DEFAULT_MAX_ABS
    return min(float(announced), HARD_MAX_ABS)


def expected_shapes(head: HeadConfig, shared_keys: Collection[str]) -> dict[str, tuple[int, ...]]:
    """The head tensors a global model of a strategy sharing `shared_keys` holds, with their shapes."""
    return {k: shape for k, shape in head.shapes.items() if k in shared_keys}


def check_head_config(head: HeadConfig, *, what: str = "head") -> None:
    """Raise InvalidHeadError for a head configuration a device must not build (non-positive or huge sizes)."""
    if head.in_dim <= 0 or head.num_classes <= 0 or head.adapter_dim < 0:
        raise InvalidHeadError(f"{what}: head sizes in_dim={head.in_dim}, num_classes={head.num_classes}, "
                               f"adapter_dim={head.adapter_dim} (positive sizes, adapter_dim >= 0 expected)")
    weights = sum(math.prod(shape) for shape in head.shapes.values())
    if weights > MAX_HEAD_WEIGHTS:
        raise InvalidHeadError(f"{what}: a head of {weights} weights, at most {MAX_HEAD_WEIGHTS} allowed")


def check_head_params(params: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]] | None, *,
                      max_abs: float = DEFAULT_MAX_ABS, what: str = "head") -> None:
    """Raise InvalidHeadError unless `params` holds exactly the tensors of `shapes`, finite, |value| <= max_abs.

    `shapes` None means "any names and shapes": the check is then on values only (a client's personal tensors).
    """
    if shapes is not None:
        missing = sorted(set(shapes) - set(params))
        extra = sorted(set(params) - set(shapes))
        if missing or extra:
            raise InvalidHeadError(f"{what}: tensors {sorted(params)}, expected {sorted(shapes)}"
                                   f"{f' (missing {missing})' if missing else ''}"
                                   f"{f' (unexpected {extra})' if extra else ''}")
    for name in sorted(params):
        value = np.asarray(params[name])
        if shapes is not None and tuple(value.shape) != tuple(shapes[name]):
            raise InvalidHeadError(f"{what}: tensor {name} has shape {tuple(value.shape)}, expected "
                                   f"{tuple(shapes[name])}")
        if not np.issubdtype(value.dtype, np.floating) and not np.issubdtype(value.dtype, np.integer):
            raise InvalidHeadError(f"{what}: tensor {name} is {value.dtype}, expected numbers")
        if value.size == 0:
            continue
        finite = np.isfinite(value)
        if not finite.all():
            raise InvalidHeadError(f"{what}: tensor {name} holds {int(value.size - finite.sum())} NaN or "
                                   f"infinite value(s)")
        peak = float(np.max(np.abs(value)))
        if peak > max_abs:
            raise InvalidHeadError(f"{what}: tensor {name} holds a value of magnitude {peak:.3g}, beyond the "
                                   f"bound {max_abs:.3g}")


def head_problem(params: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]] | None, *,
                 max_abs: float = DEFAULT_MAX_ABS, what: str = "head") -> str | None:
    """`check_head_params` as data: None when the tensors are fine, else why they are not."""
    try:
        check_head_params(params, shapes, max_abs=max_abs, what=what)
    except InvalidHeadError as exc:
        return str(exc)
    return None
