"""The agent's local data from attached microcontrollers, and the heads it pushes back to them.

Each labelled SENSOR_WINDOW from the MCU is embedded with the frozen backbone once, as it arrives (one
window per invoke: the interpreter's buffers stay those of one window), and only its embedding is kept, in
the agent's own SQLite store (it never leaves the device): the backbone's int8 output codes, 64 bytes a
window, exact, at most `max_windows` of them, the oldest dropped first. So memory and disk stay bounded
over a device's life, and no window is ever embedded twice. Training data is built from the codes,
standardized with the statistics shipped in the model sidecar. Per label, the earlier windows train and
the later ones test: the same time split as the bundled recordings, so an evaluation never scores a
window that overlaps a training one.

A gateway outlives its cables: an MCU may be missing when the agent starts, be unplugged, reboot or
hang. Each link reconnects on its own (firmware_bridge.link), and the collector re-pushes the latest
head on every new connection, because a rebooted MCU comes back without one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..backbone import BackboneError, FrozenBackbone, dequantize
from ..learning.features import EmbeddingStandardizer, fit_user_standardizer
from ..learning.head import quantize_head
from ..learning.strategies import ClientData
from .store import AgentStore

if TYPE_CHECKING:
    from firmware_bridge.link import SerialLink

log = logging.getLogger("edge_fl.agent.bridge")

DEFAULT_MAX_WINDOWS = 5000  # embeddings kept; int8 codes: 64 B each on disk, 256 B each as training data
_FEATURE_CHUNK = 512  # rows standardized at a time: no float copy of all windows beyond the result itself


class EmbeddingCodes:
    """How an embedding is kept: the backbone's own output codes where its output is quantized (int8 for the
    bundled model: exact, since the backbone's float output is `dequantize` of them), else float16."""

    def __init__(self, backbone: FrozenBackbone) -> None:
        self.quant, self.dim = backbone.output_quant, backbone.embedding_dim
        out = np.dtype(self.quant.dtype)
        self.dtype: np.dtype[Any] = out if self.quant.scale and out.kind in "iu" else np.dtype(np.float16)
        # Codes from another model, output or quantization mean nothing to this backbone (see use_embedding_space).
        space: dict[str, Any] = {"model_sha256": backbone.sha256, "output": backbone.feature.index, "dim": self.dim,
                                 "dtype": self.dtype.name, "scale": self.quant.scale,
                                 "zero_point": self.quant.zero_point}
        if backbone.feature.index < 0:  # an intermediate tensor (no output position): which one. Output features
            space["tensor"] = backbone.feature.tensor_index  # keep the string they always had: codes stay valid
        self.space = json.dumps(space)

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        if self.dtype.kind == "f":
            return embeddings.astype(self.dtype)
        info = np.iinfo(self.dtype)
        q = np.rint(embeddings.astype(np.float64) / self.quant.scale) + self.quant.zero_point
        codes: np.ndarray = np.clip(q, info.min, info.max).astype(self.dtype)
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return codes.astype(np.float32) if self.dtype.kind == "f" else dequantize(codes, self.quant)


class Codes(Protocol):
    """How one window's feature vector is kept in the store: EmbeddingCodes for a backbone,
    file_source.FeatureCodes for features."""

    dim: int
    dtype: np.dtype[Any]
    space: str

    def encode(self, embeddings: np.ndarray) -> np.ndarray: ...
    def decode(self, codes: np.ndarray) -> np.ndarray: ...


def split_in_arrival_order(y: np.ndarray, test_fraction: float) -> np.ndarray:
    """Train mask: per label, the earlier windows train and the later `test_fraction` test (at least one
    window of each label trains)."""
    train = np.zeros(y.size, bool)
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)  # in arrival order
        train[idx[:max(1, round(idx.size * (1.0 - test_fraction)))]] = True
    return train


class StoredWindows:
    """A growing source's training data: the embeddings kept in the agent store, as ClientData split in arrival
    order, rebuilt only when a window arrived; None (said once per change) while fewer than `min_windows` windows.
    Shared by the MCU source and the file source.

    The stored augmented copies of a window (file_source.py) train when their window trains and never test: a copy
    of a window that tests would leak it into training. `per_user_standardization`: the statistics are refitted
    each time the data is rebuilt, from the embeddings of the training windows (copies and test windows left out;
    labels unread), shrunk towards `population` (`fit_user_standardizer`); `standardizer` is what the data last
    handed out was standardized with (the MCU source folds it into the head it pushes)."""

    def __init__(self, store: AgentStore, codes: Codes, population: EmbeddingStandardizer | None, *,
                 min_windows: int, test_fraction: float, what: str, per_user_standardization: bool = False) -> None:
        if per_user_standardization and population is None:
            raise ValueError(f"{what}: per-user standardization needs population statistics to shrink towards; "
                             "features used as they are have none (set [data] per_user_standardization = false)")
        self.store, self.codes, self.population = store, codes, population
        self.min_windows, self.test_fraction, self.what = min_windows, test_fraction, what
        self.per_user_standardization = per_user_standardization
        self.standardizer = population
        self._last_reported = -1
        self._cached: tuple[int, ClientData] | None = None  # (seq of the newest embedding, the data built)

    def client_data(self) -> ClientData | None:
        count, newest = self.store.embedding_version()
        if count < self.min_windows:
            if count != self._last_reported:  # the idle loop asks every second: say it once per change
                log.info("%d labelled window(s) from %s so far, %d needed to train", count, self.what,
                         self.min_windows)
                self._last_reported = count
            return None
        if self._cached is not None and self._cached[0] == newest:
            return self._cached[1]  # nothing new
        self._cached = None  # the previous data can go before the new is built
        rows = self.store.embedding_rows(self.codes.dim, self.codes.dtype)
        windows = rows.windows
        train = split_in_arrival_order(rows.labels[windows], self.test_fraction)
        train_rows, test_rows = windows[train], windows[~train]
        copy_rows = np.flatnonzero(np.isin(rows.original, train_rows))  # copies of training windows, in order
        standardize = self.population
        if self.per_user_standardization:
            assert self.population is not None
            standardize = fit_user_standardizer(self._features(rows.codes, train_rows, None), self.population)
        fit = np.concatenate([train_rows, copy_rows])
        data = ClientData(self._features(rows.codes, fit, standardize), rows.labels[fit],
                          self._features(rows.codes, test_rows, standardize), rows.labels[test_rows])
        self._cached, self.standardizer = (newest, data), standardize
        return data

    def _features(self, codes: np.ndarray, rows: np.ndarray,
                  standardize: EmbeddingStandardizer | None) -> np.ndarray:
        """float32 head inputs of `rows`, a chunk at a time: standardized embeddings, or the features as stored."""
        out = np.empty((rows.size, self.codes.dim), np.float32)
        for lo in range(0, rows.size, _FEATURE_CHUNK):
            chunk = self.codes.decode(codes[rows[lo: lo + _FEATURE_CHUNK]])
            out[lo: lo + _FEATURE_CHUNK] = chunk if standardize is None else standardize(chunk)
        return out


class BridgeSource:
    """Every attached MCU (one serial link each) feeds the store and receives each new head."""

    runs_heads = True

    def __init__(self, urls: list[str], store: AgentStore, backbone: FrozenBackbone, *, baudrate: int = 115200,
                 test_fraction: float = 0.3, min_windows: int = 14, max_windows: int = DEFAULT_MAX_WINDOWS,
                 per_user_standardization: bool = False) -> None:
        from firmware_bridge.link import SerialLink  # pyserial only where a bridge is configured

        standardizer = backbone.embedding_standardizer()
        if standardizer is None:
            raise ValueError(f"{backbone.path}: its sidecar has no embedding_standardization; rebuild it with "
                             "models/build_backbone.py (a device cannot compute these statistics itself)")
        self.store, self.backbone, self.standardizer = store, backbone, standardizer
        self.description = "the MCU on " + ", ".join(urls)
        if max_windows < min_windows:
            raise ValueError(f"max_windows ({max_windows}) must be at least min_windows ({min_windows})")
        self.test_fraction, self.min_windows, self.max_windows = test_fraction, min_windows, max_windows
        self.codes = EmbeddingCodes(backbone)
        self._embed_lock = threading.Lock()  # one interpreter, several collector threads
        dropped = store.use_embedding_space(self.codes.space)
        if dropped:
            log.warning("%d stored embedding(s) came from another backbone model or output and were dropped (the "
                        "raw windows are not kept, so they cannot be recomputed); collecting anew", dropped)
        store.keep_newest_embeddings(max_windows)  # a lowered max_windows holds from the start
        self.stored = StoredWindows(store, self.codes, standardizer, min_windows=min_windows,
                                    test_fraction=test_fraction, what="the MCU",
                                    per_user_standardization=per_user_standardization)
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
                    self._keep(store, w.window_id, int(w.label), w.to_float())
                except Exception:  # a full disk, a locked database or a malformed window must not end collection
                    log.exception("window %d from the MCU on %s not stored", w.window_id, link.url)
        finally:
            store.close()

    def _keep(self, store: AgentStore, window_id: int, label: int, window: np.ndarray,
              replaces_window: int | None = None) -> None:
        """Embed one window (the only time it is embedded) and keep its codes, within the cap."""
        with self._embed_lock:
            embedding = self.backbone.embed(window[None])
        store.add_embedding(window_id, label, self.codes.encode(embedding)[0], cap=self.max_windows,
                            replaces_window=replaces_window)

    def _embed_waiting(self) -> None:
        """Windows stored raw (by an earlier edge-fl, or by a caller without the backbone): embed and drop them."""
        while batch := self.store.pending_windows(64):
            for seq, window_id, label, window in batch:
                try:
                    self._keep(self.store, window_id, label, window, replaces_window=seq)
                except BackboneError as exc:  # a window of another shape: it can never be embedded
                    log.warning("stored window %d dropped: %s", window_id, exc)
                    self.store.drop_window(seq)

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
        """Everything kept so far, or None while there is too little to train on."""
        self._embed_waiting()
        return self.stored.client_data()

    def head_blob(self, params: Mapping[str, np.ndarray]) -> bytes:
        """The int8 twin of `params` and the statistics the MCU standardizes its embeddings with before it: those
        the data last handed out was standardized with, which `params` were trained on (the sidecar's, or with
        per-user standardization this user's, refitted as windows arrive)."""
        from firmware_bridge.head_blob import encode_head

        standardizer = self.stored.standardizer or self.standardizer
        return encode_head(quantize_head(params), standardizer.mean, standardizer.std)

    def push(self, params: Mapping[str, np.ndarray]) -> list[int | None]:
        """Send the int8 twin of `params` to every MCU; per MCU its head id, or None if it is away (it gets
        the head when it reconnects)."""
        blob = self.head_blob(params)
        self._blob = blob
        return [self._push_one(link, blob) for link in self.links]

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)
        for link in self.links:
            link.close()
