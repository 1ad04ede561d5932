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

import numpy as np

from ..backbone import FrozenBackbone
from ..learning.head import quantize_head
from ..learning.strategies import ClientData
from .store import AgentStore

log = logging.getLogger("edge_fl.agent.bridge")


class BridgeSource:
    def __init__(self, url: str, store: AgentStore, backbone: FrozenBackbone, *, baudrate: int = 115200,
                 test_fraction: float = 0.3, min_windows: int = 14) -> None:
        from firmware_bridge.link import SerialLink  # pyserial only where a bridge is configured

        standardizer = backbone.embedding_standardizer()
        if standardizer is None:
            raise ValueError(f"{backbone.path}: its sidecar has no embedding_standardization; rebuild it with "
                             "models/build_backbone.py (a device cannot compute these statistics itself)")
        self.store, self.backbone, self.standardizer = store, backbone, standardizer
        self.test_fraction, self.min_windows = test_fraction, min_windows
        self.link = SerialLink(url, baudrate=baudrate)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, name="bridge-collector", daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        # SQLite connections belong to their thread: the collector writes through its own.
        store = AgentStore(self.store.path)
        try:
            while not self._stop.is_set():
                for w in self.link.windows(timeout=0.5):
                    if w.label >= 0:
                        store.add_window(w.window_id, int(w.label), w.to_float())
                    if self._stop.is_set():
                        break
        finally:
            store.close()

    def client_data(self) -> ClientData | None:
        """Everything collected so far, or None while there is too little to train on."""
        x, y = self.store.windows()
        if y.size < self.min_windows:
            log.info("only %d labelled window(s) from the MCU so far (need %d)", y.size, self.min_windows)
            return None
        emb = self.standardizer(self.backbone.embed(x))
        train = np.zeros(y.size, bool)
        for label in np.unique(y):
            idx = np.flatnonzero(y == label)  # in arrival order
            cut = max(1, int(round(idx.size * (1.0 - self.test_fraction))))
            train[idx[:cut]] = True
        return ClientData(emb[train], y[train], emb[~train], y[~train])

    def push(self, params: Mapping[str, np.ndarray]) -> int | None:
        """Send the int8 twin of `params` to the MCU; returns its head id, or None if the MCU is away."""
        from firmware_bridge.head_blob import encode_head
        from firmware_bridge.link import LinkError

        blob = encode_head(quantize_head(params), self.standardizer.mean, self.standardizer.std)
        try:
            head_id = self.link.push_head(blob)
        except LinkError as exc:
            log.warning("head not pushed to the MCU (%s); it keeps its previous head", exc)
            return None
        log.info("pushed head %d (%d bytes) to the MCU", head_id, len(blob))
        return head_id

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.link.close()
