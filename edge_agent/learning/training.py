"""The fleet's training configuration: one frozen value the aggregator owns, sends in every round task,
and from which every device rebuilds the same strategy. Pure: the learning core, not the simulator."""

from __future__ import annotations

from dataclasses import dataclass

from .head import OPTIMIZER_KINDS, FitConfig, HeadConfig, OptimizerConfig, OptimizerKind
from .strategies import StrategyConfig

DEFAULT_STRATEGY = "ditto"


@dataclass(frozen=True)
class TrainingConfig:
    strategy: str = DEFAULT_STRATEGY
    rounds: int = 30
    seed: int = 0
    fraction: float = 1.0  # share of clients sampled each round
    adapter_dim: int = HeadConfig.adapter_dim
    local_epochs: int = 1
    batch_size: int = FitConfig.batch_size
    lr: float = OptimizerConfig.lr
    optimizer: OptimizerKind = OptimizerConfig.kind
    weight_decay: float = FitConfig.weight_decay
    class_weighting: bool = FitConfig.class_weighting
    finetune_epochs: int = StrategyConfig.finetune_epochs
    fedrep_head_epochs: int = StrategyConfig.fedrep_head_epochs
    ditto_lambda: float = StrategyConfig.ditto_lambda
    int8_updates: bool = True
    # How devices compress their updates (codec/compression.py CodecSpec text, e.g. "topk:0.05", "sign1+rot"):
    # the change from the global model, with error feedback, in the compact update frame. "": today's envelope,
    # the whole shared tensors, int8 per output channel (or float32 without int8_updates).
    codec: str = ""
    # How the aggregator sends each new global model (codec/downlink.py): the change from the version before, in
    # this codec, with error feedback on the aggregator, on the retained topic model/delta/<version>; devices
    # fetch the whole model from model/current only to start or to resync. "": the whole model in every task.
    downlink_codec: str = ""

    def __post_init__(self) -> None:
        # Values arrive from TOML and from round-task meta: refuse a bad one here, where the config is read.
        if self.optimizer not in OPTIMIZER_KINDS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZER_KINDS)}")

    def strategy_config(self) -> StrategyConfig:
        opt = OptimizerConfig(kind=self.optimizer, lr=self.lr)
        fit = FitConfig(epochs=self.local_epochs, batch_size=self.batch_size, optimizer=opt,
                        weight_decay=self.weight_decay, class_weighting=self.class_weighting)
        return StrategyConfig(fit=fit, finetune_epochs=self.finetune_epochs,
                              fedrep_head_epochs=self.fedrep_head_epochs, ditto_lambda=self.ditto_lambda)
