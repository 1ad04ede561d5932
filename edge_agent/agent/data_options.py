"""What a device does with its labelled windows before it trains on them, beside the strategy:
`[data] augment_copies` (copies of each labelled training window, embedded by the backbone: edge_agent/data/augment.py)
and `[data] per_user_standardization` (the user's own embedding statistics, shrunk towards the population's:
edge_agent/learning/features.py), resolved for one data source and refused where that source cannot apply them.

Which sources apply what:

- augmentation needs the raw sensor windows, labelled, before the backbone embeds them: the bundled recordings
  (watch-dataset), a windows dataset (user-dataset) and a windows card (files). An MCU's windows (serial) are
  embedded one at a time as they arrive and are not augmented; a features dataset or card holds no windows.
- per-user standardization needs population statistics to shrink the user's towards: every source but a files
  source with a features card, whose vectors are used as they are.

A key left unset takes its default (edge_agent/config.py, DEFAULT_AUGMENT_COPIES and
DEFAULT_PER_USER_STANDARDIZATION) where the source can apply it and stays off elsewhere; a key set explicitly where
the source cannot apply it is refused, saying why and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import DataConfig
from ..data.augment import AugmentConfig, ChannelGroup
from ..data.device_client import DataOptions


def option_problems(data: DataConfig, *, windows: bool, population: bool, what: str) -> list[str]:
    """The keys set explicitly that `what` (the source, as a message names it) cannot apply: it holds no raw
    sensor windows it augments (`windows` false), or no population statistics (`population` false)."""
    problems = []
    if data.augment_copies and not windows:
        problems.append(f"[data] augment_copies = {data.augment_copies}: {what} holds no raw sensor windows to "
                        "augment (copies are made of windows before the backbone embeds them); set "
                        "augment_copies = 0 or leave it out")
    if data.per_user_standardization and not population:
        problems.append(f"[data] per_user_standardization = true: {what} has no population statistics to shrink "
                        "the user's towards (a features card's vectors are used as they are); set it to false or "
                        "leave it out")
    return problems


def data_options(data: DataConfig, device: int, *, windows: bool, population: bool,
                 channel_names: Sequence[str] | None = None, what: str) -> DataOptions:
    """The options `data` asks of a source that has raw windows (`windows`) and population statistics
    (`population`); ValueError naming every key it cannot apply."""
    problems = option_problems(data, windows=windows, population=population, what=what)
    if problems:
        raise ValueError("; ".join(problems))
    copies = data.copies_to_make(can_augment=windows)
    augment: AugmentConfig | None = None
    groups: tuple[ChannelGroup, ...] = ()
    if copies > 0:
        from ..data.embedded_copies import device_augment_config

        augment, groups = device_augment_config(copies, channel_names, what)
    return DataOptions(augment, groups, data.standardizes_per_user(has_population=population), data.seed, device)


def describe(data: DataConfig, *, windows: bool, population: bool) -> str:
    """The options as `edge-fl check-config` says them."""
    copies = data.copies_to_make(can_augment=windows)
    augment = f"{copies} augmented copies of each labelled training window" if copies else "no augmented copies"
    if not population:
        return f"{augment}, features used as they are"
    scale = "per-user standardization" if data.standardizes_per_user(has_population=population) else \
        "the population's standardization"
    return f"{augment}, {scale}"
