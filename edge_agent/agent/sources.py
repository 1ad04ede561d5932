"""Where a device's local data comes from: one interface, chosen in one place (`open_source`).

- the bundled recordings of one subject (the demo), through the real backbone;
- fixed data handed over in process (`edge-fl simulate` runs real agents on data it already embedded);
- the microcontrollers attached on serial lines (bridge_source.py), whose data grows as windows arrive
  and which run every new personalized head.

The agent service only asks `client_data()` before training and hands each new personalized head to
`push()`; it never knows which kind it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from ..config import AgentConfig
from ..learning.strategies import ClientData
from .store import AgentStore


class DataSource(Protocol):
    description: str  # for the log: "subject 4", "the MCU on /dev/ttyACM0"
    runs_heads: bool  # push() takes each new personalized head (worth computing only then)

    def client_data(self) -> ClientData | None:
        """The device's data now, or None while there is too little to train on."""
        ...

    def push(self, params: Mapping[str, np.ndarray]) -> object:
        """The device's new personalized head (float params): run it where the data comes from."""
        ...

    def close(self) -> None: ...


class FixedSource:
    """Data that does not change: nothing to push back to."""

    runs_heads = False

    def __init__(self, data: ClientData, description: str) -> None:
        self.data, self.description = data, description

    def client_data(self) -> ClientData | None:
        return self.data

    def push(self, params: Mapping[str, np.ndarray]) -> object:
        return None

    def close(self) -> None:
        pass


def dataset_source(cfg: AgentConfig) -> FixedSource:
    """The demo's local data: this subject's windows of the bundled recordings, through the real backbone."""
    from ..backbone import DEFAULT_MODEL, EmbeddingCache, FrozenBackbone
    from ..data.federated import default_cache_dir, embed_dataset, federate
    from ..data.partition import PartitionConfig
    from ..data.watch import load_watch_dataset

    d = cfg.data
    backbone = FrozenBackbone(cfg.backbone or DEFAULT_MODEL)
    cache = EmbeddingCache(d.cache_dir or default_cache_dir())
    embedded = embed_dataset(load_watch_dataset(d.dataset), backbone, cache=cache)
    fed = federate(embedded, PartitionConfig(regime=d.regime, seed=d.seed, shots=d.shots,
                                             classes_per_client=d.classes_per_client, alpha=d.alpha))
    client_id = f"subject-{d.subject:02d}"
    if client_id not in fed.client_ids:
        raise ValueError(f"subject {d.subject} is not a federated client (clients: {', '.join(fed.client_ids)})")
    return FixedSource(fed.clients[fed.client_ids.index(client_id)], f"subject {d.subject}")


def open_source(cfg: AgentConfig, store: AgentStore) -> DataSource:
    """The one place that turns `[data] source` into a data source."""
    d = cfg.data
    if d.source == "watch-dataset":
        return dataset_source(cfg)
    if d.source == "serial":
        from ..backbone import DEFAULT_MODEL, FrozenBackbone
        from .bridge_source import BridgeSource  # pyserial only where a bridge is configured

        if not d.port:
            raise ValueError("data.source = 'serial' needs data.port (a pyserial URL such as /dev/ttyACM0)")
        return BridgeSource([d.port, *d.more_ports], store, FrozenBackbone(cfg.backbone or DEFAULT_MODEL),
                            baudrate=d.baudrate, min_windows=d.min_windows)
    raise ValueError(f"unknown data source {d.source!r}; choose 'watch-dataset' or 'serial'")
