"""The agent's local data from attached microcontrollers, and the heads it pushes back to them.

Labelled SENSOR_WINDOWs from the MCU are kept in the agent's own SQLite store (they never leave the
device), embedded with the frozen backbone and standardized with the statistics shipped in the model
sidecar. Per label, the earlier windows train and the later ones test: the same time split as the
bundled recordings, so an evaluation never scores a window that overlaps a training one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..backbone import FrozenBackbone
from ..learning.head import quantize_head
from ..learning.strategies import ClientData
from .store import AgentStore

if TYPE_CHECKING:
    from firmware_bridge.link import SerialLink

log = logging.getLogger("edge_fl.agent.bridge")


class BridgeSource:
    """Every attached MCU (one serial link each) feeds the store and receives each new head."""

    def __init__(self, urls: list[str], store: AgentStore, backbone: FrozenBackbone, *, baudrate: int = 115200,
                 test_fraction: float = 0.3, min_windows: int = 14) -> None:
        from firmware_bridge.link import SerialLink  # pyserial only where a bridge is configured

        standardizer = backbone.embedding_standardizer()
        if standardizer is None:
            raise ValueError(f"{backbone.path}: its sidecar has no embedding_standardization; rebuild it with "
                             "models/build_backbone.py (a device cannot compute these statistics itself)")
        self.store, self.backbone, self.standardizer = store, backbone, standardizer
        self.test_fraction, self.min_windows = test_fraction, min_windows
        self._last_reported = -1
        self._cached: tuple[int, ClientData] | None = None
        self.links = [SerialLink(url, baudrate=baudrate) for url in urls]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._collect, args=(link,), name=f"bridge-collector {link.url}",
                                          daemon=True) for link in self.links]
        for t in self._threads:
            t.start()

    def _collect(self, link: "SerialLink") -> None:
        # SQLite connections belong to their thread: each collector writes through its own.
        store = AgentStore(self.store.path)
        try:
            while not self._stop.is_set():
                for w in link.windows(timeout=0.5):
                    if w.label >= 0:
                        store.add_window(w.window_id, int(w.label), w.to_float())
                    if self._stop.is_set():
                        break
        finally:
            store.close()

    def client_data(self) -> ClientData | None:
        """Everything collected so far, or None while there is too little to train on."""
        count = self.store.window_count()
        if count < self.min_windows:
            if count != self._last_reported:  # the idle loop asks every second: say it once per change
                log.info("%d labelled window(s) from the MCU so far, %d needed to train", count, self.min_windows)
                self._last_reported = count
            return None
        if self._cached is not None and self._cached[0] == count:
            return self._cached[1]  # nothing new: do not embed every window again
        x, y = self.store.windows()
        emb = self.standardizer(self.backbone.embed(x))
        train = np.zeros(y.size, bool)
        for label in np.unique(y):
            idx = np.flatnonzero(y == label)  # in arrival order
            cut = max(1, int(round(idx.size * (1.0 - self.test_fraction))))
            train[idx[:cut]] = True
        data = ClientData(emb[train], y[train], emb[~train], y[~train])
        self._cached = (int(y.size), data)
        return data

    def push(self, params: Mapping[str, np.ndarray]) -> list[int | None]:
        """Send the int8 twin of `params` to every MCU; per MCU its head id, or None if it is away."""
        from firmware_bridge.head_blob import encode_head
        from firmware_bridge.link import LinkError

        blob = encode_head(quantize_head(params), self.standardizer.mean, self.standardizer.std)
        ids: list[int | None] = []
        for link in self.links:
            try:
                head_id = link.push_head(blob)
            except LinkError as exc:
                log.warning("head not pushed to the MCU on %s (%s); it keeps its previous head", link.url, exc)
                ids.append(None)
                continue
            log.info("pushed head %d (%d bytes) to the MCU on %s", head_id, len(blob), link.url)
            ids.append(head_id)
        return ids

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)
        for link in self.links:
            link.close()
