"""The agent's local data from attached microcontrollers, and the heads it pushes back to them.

Labelled SENSOR_WINDOWs from the MCU are kept in the agent's own SQLite store (they never leave the
device), embedded with the frozen backbone and standardized with the statistics shipped in the model
sidecar. Per label, the earlier windows train and the later ones test: the same time split as the
bundled recordings, so an evaluation never scores a window that overlaps a training one.

A gateway outlives its cables: an MCU may be missing when the agent starts, be unplugged, reboot or
hang. Each link reconnects on its own (firmware_bridge.link), and the collector re-pushes the latest
head on every new connection, because a rebooted MCU comes back without one.
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

    runs_heads = True

    def __init__(self, urls: list[str], store: AgentStore, backbone: FrozenBackbone, *, baudrate: int = 115200,
                 test_fraction: float = 0.3, min_windows: int = 14) -> None:
        from firmware_bridge.link import SerialLink  # pyserial only where a bridge is configured

        standardizer = backbone.embedding_standardizer()
        if standardizer is None:
            raise ValueError(f"{backbone.path}: its sidecar has no embedding_standardization; rebuild it with "
                             "models/build_backbone.py (a device cannot compute these statistics itself)")
        self.store, self.backbone, self.standardizer = store, backbone, standardizer
        self.description = "the MCU on " + ", ".join(urls)
        self.test_fraction, self.min_windows = test_fraction, min_windows
        self._last_reported = -1
        self._cached: tuple[int, ClientData] | None = None
        self.links = [SerialLink(url, baudrate=baudrate, require_port=False) for url in urls]
        self._stop = threading.Event()
        self._blob: bytes | None = None  # the latest head, for MCUs that (re)connect after it was pushed
        self._push_locks = {link.url: threading.Lock() for link in self.links}
        # url -> (connection generation, blob, head id) of the last head that MCU accepted
        self._pushed: dict[str, tuple[int, bytes, int]] = {}
        # url -> (connection generation, blob) of the last push that failed: not retried on that connection
        # (an MCU that refused a head refuses it again; a hung one is reconnected by its link first)
        self._failed: dict[str, tuple[int, bytes]] = {}
        self._threads = [threading.Thread(target=self._collect, args=(link,), name=f"bridge-collector {link.url}",
                                          daemon=True) for link in self.links]
        for t in self._threads:
            t.start()

    def _collect(self, link: SerialLink) -> None:
        from firmware_bridge.link import LinkError

        # SQLite connections belong to their thread: each collector writes through its own.
        store = AgentStore(self.store.path)
        try:
            while not self._stop.is_set():
                self._repush_if_reconnected(link)
                try:
                    w = link.get_window(0.5)
                except LinkError:
                    continue
                if w.label < 0:
                    continue
                try:
                    store.add_window(w.window_id, int(w.label), w.to_float())
                except Exception:  # a full disk or a locked database must not end collection for good
                    log.exception("window %d from the MCU on %s not stored", w.window_id, link.url)
        finally:
            store.close()

    def _repush_if_reconnected(self, link: SerialLink) -> None:
        blob, gen, done = self._blob, link.generation, self._pushed.get(link.url)
        if blob is None or not link.connected or link.peer_generation != gen:
            return  # nothing to push yet, or the MCU has not said HELLO on this connection yet
        failed = self._failed.get(link.url)
        if failed is not None and failed[0] == gen and failed[1] is blob:
            return
        if done is None or done[0] != gen or done[1] is not blob:
            self._push_one(link, blob, again=True)

    def _push_one(self, link: SerialLink, blob: bytes, *, again: bool = False) -> int | None:
        from firmware_bridge.link import LinkError

        with self._push_locks[link.url]:
            gen, done = link.generation, self._pushed.get(link.url)
            if done is not None and done[0] == gen and done[1] is blob:
                return done[2]  # the other thread pushed this very head on this connection a moment ago
            try:
                head_id = link.push_head(blob)
            except LinkError as exc:
                self._failed[link.url] = (gen, blob)
                log.warning("head not pushed to the MCU on %s (%s); it keeps its previous head; tried again "
                            "after the MCU reconnects or with the next round's head", link.url, exc)
                return None
            self._pushed[link.url] = (gen, blob, head_id)
        log.info("%s head %d (%d bytes) to the MCU on %s", "re-pushed" if again else "pushed", head_id, len(blob),
                 link.url)
        return head_id

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
            cut = max(1, round(idx.size * (1.0 - self.test_fraction)))
            train[idx[:cut]] = True
        data = ClientData(emb[train], y[train], emb[~train], y[~train])
        self._cached = (int(y.size), data)
        return data

    def push(self, params: Mapping[str, np.ndarray]) -> list[int | None]:
        """Send the int8 twin of `params` to every MCU; per MCU its head id, or None if it is away (it gets
        the head when it reconnects)."""
        from firmware_bridge.head_blob import encode_head

        blob = encode_head(quantize_head(params), self.standardizer.mean, self.standardizer.std)
        self._blob = blob
        return [self._push_one(link, blob) for link in self.links]

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)
        for link in self.links:
            link.close()
