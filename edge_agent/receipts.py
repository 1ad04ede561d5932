"""End-to-end receipts: the aggregator's word that an update was counted (or refused), and when a device
sends an update again without one. Pure: bytes and time in, values out; no MQTT, no clock of its own.

A broker's PUBACK means "the broker took it", not "the aggregator counted it": a broker past its queue
limits (`max_queued_messages`, `max_queued_bytes`) drops a message it already acknowledged. So a device
keeps an update in its outbox until a receipt for its update id arrives on `Topics.receipt(device)`, and
sends the same bytes again until then; the aggregator's idempotent ingest makes every copy after the first
a duplicate, and it answers each copy with the same receipt ("counted" also for a redelivery it had
already counted).

Payload: UTF-8 JSON `{"update_id": str, "round": int, "verdict": "counted" | "refused", "reason": str}`.
The aggregator publishes `encode_receipt(Receipt(...))` on `Topics.receipt(device)`, QoS 0, not retained (a
lost receipt costs one more copy of the update; at QoS 1 they filled paho's packet ids at 100,000 devices).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

from .protocol import check_name

Verdict = Literal["counted", "refused"]
VERDICTS: tuple[Verdict, ...] = ("counted", "refused")
MAX_ROUND = 2**32 - 1  # the envelope's round field is a u32
MAX_REASON_CHARS = 500  # a refusal says why in a sentence; more is a log flood, not a reason
# The largest payload decode_receipt reads: the four fields at their limits, with room for JSON escapes.
MAX_RECEIPT_BYTES = 4096
_KEYS = frozenset({"update_id", "round", "verdict", "reason"})


class ReceiptError(ValueError):
    """A receipt payload that is not one: the message says what is wrong with it."""


@dataclass(frozen=True)
class Receipt:
    """The aggregator's verdict on update `update_id` of round `round`: counted, or refused (`reason` says why)."""

    update_id: str
    round: int
    verdict: Verdict
    reason: str = ""

    def __post_init__(self) -> None:
        problem = _problem(self.update_id, self.round, self.verdict, self.reason)
        if problem:
            raise ReceiptError(problem)


def _problem(update_id: object, round_no: object, verdict: object, reason: object) -> str | None:
    if not isinstance(update_id, str):
        return f"update_id must be a string, got {type(update_id).__name__}"
    try:
        check_name("update_id", update_id)  # an envelope's update id has the same shape as a topic level
    except ValueError as exc:
        return str(exc)
    if isinstance(round_no, bool) or not isinstance(round_no, int) or not 0 <= round_no <= MAX_ROUND:
        return f"round must be an integer from 0 to {MAX_ROUND}, got {round_no!r:.40}"
    if verdict not in VERDICTS:
        return f"verdict must be one of {', '.join(repr(v) for v in VERDICTS)}, got {verdict!r:.40}"
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        return f"reason must be a string of at most {MAX_REASON_CHARS} characters, got {reason!r:.60}"
    return None


def encode_receipt(receipt: Receipt) -> bytes:
    """The payload the aggregator publishes on `Topics.receipt(device)`."""
    # The fields by hand: dataclasses.asdict recurses and deep-copies, a third of a receipt's cost at thousands a
    # second. Same keys, same order.
    doc = {"update_id": receipt.update_id, "round": receipt.round, "verdict": receipt.verdict,
           "reason": receipt.reason}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def decode_receipt(payload: bytes) -> Receipt:
    """The receipt a payload carries; ReceiptError (and nothing else) if it is not one."""
    if len(payload) > MAX_RECEIPT_BYTES:
        raise ReceiptError(f"receipt of {len(payload)} bytes is larger than {MAX_RECEIPT_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ReceiptError(f"receipt is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise ReceiptError(f"receipt is not JSON ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise ReceiptError(f"receipt must be a JSON object, got {type(doc).__name__}")
    missing, unknown = sorted(_KEYS - set(doc)), sorted(set(doc) - _KEYS)
    if missing or unknown:
        strange = ", ".join(k[:40] for k in unknown[:5])  # bounded: the keys come from the network
        raise ReceiptError(f"receipt must have exactly the keys {', '.join(sorted(_KEYS))}; "
                           f"missing: {', '.join(missing) or '-'}, unknown: {strange or '-'}")
    problem = _problem(doc["update_id"], doc["round"], doc["verdict"], doc["reason"])
    if problem:
        raise ReceiptError(f"receipt: {problem}")
    return Receipt(doc["update_id"], doc["round"], doc["verdict"], doc["reason"])


# --- when to send an update (again) --------------------------------------------------------------------------

def resend_delay(sends: int, timeout_s: float, max_timeout_s: float) -> float:
    """Seconds to wait for a receipt after the `sends`-th send (1 for the first) before sending again:
    `timeout_s`, doubling with each send, at most `max_timeout_s`. An aggregator that is slow because it is
    overloaded gets fewer copies, not more."""
    if sends < 1:
        raise ValueError(f"sends counts sends made, from 1; got {sends}")
    return min(max_timeout_s, timeout_s * 2.0 ** min(sends - 1, 62))


@dataclass
class UploadSchedule:
    """When each update in a device's outbox is next due to be sent, by update id. Time is passed in (a
    monotonic clock in the agent, a fake one in tests). An update it has never heard of is due at once: after a
    restart, whatever the outbox holds is sent again."""

    timeout_s: float
    max_timeout_s: float
    _due: dict[str, float] = field(default_factory=dict, init=False)
    _sends: dict[str, int] = field(default_factory=dict, init=False)
    _least: dict[str, float] = field(default_factory=dict, init=False)  # the task's steer (RoundTask.retry_delay)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= self.max_timeout_s < math.inf):
            raise ValueError(f"need 0 < timeout_s ({self.timeout_s}) <= max_timeout_s ({self.max_timeout_s}) < inf")

    def hold(self, update_id: str, until: float) -> None:
        """The first send of `update_id` waits until `until` (a round's upload window)."""
        self._due[update_id] = until

    def pace(self, update_id: str, least_wait_s: float) -> None:
        """Never send `update_id` again sooner than `least_wait_s` after a send (what its round's task says)."""
        self._least[update_id] = least_wait_s

    def steered(self, update_id: str) -> bool:
        """Did the task say when `update_id` may be sent again (`pace`)?"""
        return update_id in self._least

    def due(self, update_id: str, now: float) -> bool:
        return now >= self._due.get(update_id, -math.inf)

    def sent(self, update_id: str, now: float) -> float:
        """Record that the broker took `update_id` at `now`; returns when to send it again without a receipt."""
        sends = self._sends.get(update_id, 0) + 1
        self._sends[update_id] = sends
        wait = resend_delay(sends, self.timeout_s, self.max_timeout_s)
        self._due[update_id] = now + max(wait, self._least.get(update_id, 0.0))
        return self._due[update_id]

    def sends(self, update_id: str) -> int:
        return self._sends.get(update_id, 0)

    def forget(self, update_id: str) -> None:
        self._due.pop(update_id, None)
        self._sends.pop(update_id, None)
        self._least.pop(update_id, None)
