"""What travels in a round task besides tensors: the fleet's training configuration, as envelope meta.

The aggregator's configuration is the one source of truth; devices rebuild the same strategy from it.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from .learning.head import HeadConfig
from .learning.strategies import Strategy, make_strategy
from .learning.training import TrainingConfig


def task_meta(train: TrainingConfig, head: HeadConfig, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {f"train.{k}": v for k, v in asdict(train).items()}
    meta.update({"head.in_dim": head.in_dim, "head.num_classes": head.num_classes,
                 "head.adapter_dim": head.adapter_dim})
    meta.update(extra)
    return meta


def from_meta(meta: dict[str, Any]) -> tuple[TrainingConfig, HeadConfig, Strategy]:
    try:
        train = TrainingConfig(**{f.name: meta[f"train.{f.name}"] for f in fields(TrainingConfig)})
        head = HeadConfig(int(meta["head.in_dim"]), int(meta["head.num_classes"]), int(meta["head.adapter_dim"]))
    except KeyError as exc:
        raise ValueError(f"round task lacks the training configuration key {exc}") from None
    return train, head, make_strategy(train.strategy, head, train.strategy_config())
