"""Devices joining and leaving, logged so that an operator sees them and a flapping fleet cannot flood the journal.

Each change gets its own INFO line, with the online count, up to `max_lines` per `interval_s`; beyond that the
changes are only counted, and one summary line per interval says how many joined and left and how many are
online. A thousand devices reconnecting at once cost `max_lines` + 1 lines a minute, not a thousand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable


class PresenceLog:
    def __init__(self, log: logging.Logger, clock: Callable[[], float], *, max_lines: int = 20,
                 interval_s: float = 60.0) -> None:
        self.log, self.clock = log, clock
        self.max_lines, self.interval_s = max_lines, interval_s
        self.window_start: float | None = None
        self.lines = 0
        self.quiet_joined = self.quiet_left = 0
        self.online = 0

    def changed(self, device: str, online: bool, count: int) -> None:
        """`device` went online (or offline); `count` devices are online now."""
        self.online = count
        self._roll(self.clock())
        if self.lines < self.max_lines:
            self.lines += 1
            self.log.info("device %s %s (%d online)", device, "joined" if online else "left", count)
        elif online:
            self.quiet_joined += 1
        else:
            self.quiet_left += 1

    def flush(self) -> None:
        """Write the summary of an interval that has ended (called from the service's tick)."""
        self._roll(self.clock())

    def _roll(self, now: float) -> None:
        if self.window_start is not None and now - self.window_start < self.interval_s:
            return
        if self.quiet_joined or self.quiet_left:
            self.log.info("presence: %d more joined and %d more left in the last %.0f s (only %d changes logged "
                          "one by one per interval); %d online", self.quiet_joined, self.quiet_left,
                          self.interval_s, self.max_lines, self.online)
        self.window_start, self.lines, self.quiet_joined, self.quiet_left = now, 0, 0, 0
