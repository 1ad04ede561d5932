"""Chunked updates at the aggregator's door: reassembly within fixed memory, every drop logged and counted.

Each chunk is acknowledged to the broker as soon as it is handled (held in memory, or dropped): a partial
message never holds MQTT flow control (the broker's receive-maximum window) hostage, whatever a device
sends. Only the chunk that completes a message is acknowledged after the store committed the update, so
an accepted update is never lost or counted twice (store.py). The price: partial messages live in memory
only; an aggregator killed while a message is half received forgets its first chunks, and that update
does not count (the device's later updates are unaffected; see `ChunkIntake` for what a device sees).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from ..codec.chunking import Reassembler
from ..config import FleetConfig
from .metrics import Metrics

log = logging.getLogger("edge_fl.aggregator")

LOG_EVERY_S = 10.0  # at most one summary line of dropped partial messages this often (a flood is one line)


class ChunkIntake:
    """The reassembler with the fleet's limits, and the rate-limited account of what it drops.

    A device whose partial message is dropped is not told: the broker acknowledged each chunk to it, so
    its outbox counts the update as delivered. The update then misses this round (the device's next
    round is unaffected); an agent that reconnects re-sends its outbox, and a resent update of a round
    still open is counted then. Honest devices send a message's chunks back to back, so with the default
    limits only a device that sends many large messages at once, or an aggregator under a flood, drops.
    """

    def __init__(self, fleet: FleetConfig, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.clock = clock
        self.reassembler = Reassembler(
            max_message_bytes=fleet.max_update_bytes, max_pending=4096, timeout_s=fleet.chunk_timeout_s,
            max_buffered_bytes=fleet.max_partial_bytes, max_pending_per_source=fleet.max_partials_per_device,
            max_bytes_per_source=min(fleet.max_partial_bytes, 2 * fleet.max_update_bytes))
        self._unlogged: Counter[str] = Counter()
        self._unlogged_devices: set[str] = set()
        self._unlogged_bytes = 0
        self._last_log: float | None = None

    def feed(self, chunk: bytes, device: str) -> bytes | None:
        """The whole message if `chunk` completed it; raises codec.chunking.ChunkError for a bad chunk."""
        try:
            return self.reassembler.feed(chunk, self.clock(), source=device)
        finally:
            self._account()

    def tick(self) -> None:
        """Drop what expired; log what was dropped if a summary is due."""
        self.reassembler.expire(self.clock())
        self._account()
        self.flush_log(force=False)

    def _account(self) -> None:
        for d in self.reassembler.take_dropped():
            self.metrics.partial_dropped(d.reason)
            self._unlogged[d.reason] += 1
            self._unlogged_bytes += d.held_bytes
            if len(self._unlogged_devices) < 5:
                self._unlogged_devices.add(d.source)
        self.metrics.partial_bytes(self.reassembler.buffered_bytes)

    def flush_log(self, *, force: bool = True) -> None:
        if not self._unlogged:
            return
        now = self.clock()
        if not force and self._last_log is not None and now - self._last_log < LOG_EVERY_S:
            return
        self._last_log = now
        r = self.reassembler
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self._unlogged.items()))
        log.warning("dropped %d partial chunked update(s) (%s; %d B freed; devices include %s); holding %d partial "
                    "message(s), %d B (limits: fleet.chunk_timeout_s %.0f s, fleet.max_partial_bytes %d, "
                    "fleet.max_partials_per_device %d)", sum(self._unlogged.values()), reasons,
                    self._unlogged_bytes, ", ".join(sorted(self._unlogged_devices)), r.pending, r.buffered_bytes,
                    r.timeout_s, r.max_buffered_bytes, r.max_pending_per_source)
        self._unlogged.clear()
        self._unlogged_devices.clear()
        self._unlogged_bytes = 0
