"""When a peer answers a bad frame with ERROR (PROTOCOL.md, "Error replies"). Pure: time is passed in.

Two peers that reject each other's frames (different protocol versions, a noisy line) must not keep
answering each other's errors: a frame of type ERROR, whatever its version, is never answered, and the
ERROR replies a peer sends are held to a token bucket (ERROR_REPLY_RATE per second, bursts of
ERROR_REPLY_BURST). Frames over the limit are still dropped and counted; only the reply is skipped.
The C firmware implements the same rule with the same numbers (edgefl_proto.h).
"""

from __future__ import annotations

ERROR_FRAME_TYPE = 0x09  # MessageType.ERROR; repeated here so framing-level code needs no messages import
ERROR_REPLY_RATE = 10.0  # ERROR replies per second, sustained
ERROR_REPLY_BURST = 10  # ERROR replies allowed back to back


def answers_with_error(frame_type: int) -> bool:
    """May a rejected frame of this type be answered with ERROR? Never for an ERROR frame."""
    return frame_type != ERROR_FRAME_TYPE


class ErrorReplyLimiter:
    """Token bucket over ERROR replies; `allow(now)` spends a token or counts a suppressed reply."""

    def __init__(self, rate: float = ERROR_REPLY_RATE, burst: int = ERROR_REPLY_BURST) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate={rate} must be > 0 and burst={burst} >= 1")
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._t: float | None = None
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if self._t is not None:
            self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._t) * self.rate)
        self._t = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def should_reply(self, frame_type: int, now: float) -> bool:
        """The whole rule: not to an ERROR frame, and within the rate."""
        return answers_with_error(frame_type) and self.allow(now)
