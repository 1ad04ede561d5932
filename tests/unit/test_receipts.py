"""Receipts and paced uploads, the pure parts: the receipt payload (round trip, golden bytes, strict decoding),
when an update without a receipt is sent again, and each device's place in a round's upload window."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.codec.envelope import decode_envelope
from edge_agent.fleet import (
    RETRY_AFTER_KEY,
    UPLOAD_WINDOW_KEY,
    FleetMessageError,
    GlobalModel,
    RoundTask,
    decode_task,
    encode_task,
    upload_delay,
)
from edge_agent.learning.head import HeadConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.receipts import (
    MAX_REASON_CHARS,
    MAX_RECEIPT_BYTES,
    Receipt,
    ReceiptError,
    UploadSchedule,
    decode_receipt,
    encode_receipt,
    resend_delay,
)

UID = "0123456789abcdef0123456789abcdef"

# --- the payload -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("receipt", [
    Receipt(UID, 7, "counted"),
    Receipt(UID, 0, "refused", "late: round 7 closed at its deadline"),
    Receipt("a.b_c-1", 2**32 - 1, "refused", "é" * MAX_REASON_CHARS),
])
def test_a_receipt_round_trips(receipt: Receipt) -> None:
    assert decode_receipt(encode_receipt(receipt)) == receipt


def test_the_payload_is_the_json_of_the_contract() -> None:
    assert encode_receipt(Receipt(UID, 7, "counted")) == (
        b'{"update_id":"0123456789abcdef0123456789abcdef","round":7,"verdict":"counted","reason":""}')
    # Whatever wrote it (another language, another JSON library): key order and spaces do not matter.
    text = json.dumps({"reason": "spoofed", "verdict": "refused", "round": 3, "update_id": UID}, indent=2)
    assert decode_receipt(text.encode()) == Receipt(UID, 3, "refused", "spoofed")


def test_the_largest_receipt_fits_the_size_limit() -> None:
    widest = Receipt("x" * 64, 2**32 - 1, "refused", "\u0001" * MAX_REASON_CHARS)  # escaped as \u0001: 6 bytes
    assert len(encode_receipt(widest)) <= MAX_RECEIPT_BYTES
    assert decode_receipt(encode_receipt(widest)) == widest


def _doc(**change: object) -> bytes:
    doc: dict[str, object] = {"update_id": UID, "round": 7, "verdict": "counted", "reason": ""}
    doc.update(change)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


@pytest.mark.parametrize("payload, problem", [
    (b"", "receipt is not JSON"),
    (b"\xff\xfe", "receipt is not UTF-8"),
    (b"counted", "receipt is not JSON"),
    (b"[1, 2]", "receipt must be a JSON object, got list"),
    (b"[" * 100_000, "receipt of 100000 bytes is larger than 4096"),
    (_doc(round=...), "missing: round, unknown: -"),
    (_doc(colour="red"), "missing: -, unknown: colour"),
    (_doc(update_id=5), "update_id must be a string, got int"),
    (_doc(update_id="a/b"), "update_id 'a/b' must be 1-64 characters"),
    (_doc(update_id=""), "update_id '' must be 1-64 characters"),
    (_doc(round=True), "round must be an integer from 0 to 4294967295, got True"),
    (_doc(round=-1), "round must be an integer from 0 to 4294967295, got -1"),
    (_doc(round=2**32), "round must be an integer"),
    (_doc(round=7.0), "round must be an integer"),
    (_doc(verdict="accepted"), "verdict must be one of 'counted', 'refused', got 'accepted'"),
    (_doc(reason=None), "reason must be a string of at most 500 characters, got None"),
    (_doc(reason="x" * (MAX_REASON_CHARS + 1)), "reason must be a string of at most 500 characters"),
])
def test_a_bad_receipt_says_what_is_wrong(payload: bytes, problem: str) -> None:
    with pytest.raises(ReceiptError) as info:
        decode_receipt(payload)
    assert problem in str(info.value), info.value
    assert len(str(info.value)) < 300  # bounded, whatever the network sent


def test_the_aggregator_cannot_build_a_receipt_the_device_would_refuse() -> None:
    with pytest.raises(ReceiptError, match="verdict must be one of"):
        Receipt(UID, 1, "maybe")  # type: ignore[arg-type]
    with pytest.raises(ReceiptError, match="update_id"):
        Receipt("no spaces", 1, "counted")


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                                  st.sampled_from(["update_id", "round", "verdict", "reason", "x"]), inner,
                                  max_size=5)).map(lambda v: json.dumps(v).encode())))
def test_decode_receipt_raises_only_receipt_error(payload: bytes) -> None:
    try:
        receipt = decode_receipt(payload)
    except ReceiptError:
        return
    assert decode_receipt(encode_receipt(receipt)) == receipt


# --- sending again without a receipt ---------------------------------------------------------------------

def test_the_wait_for_a_receipt_doubles_up_to_its_cap() -> None:
    assert [resend_delay(n, 30.0, 300.0) for n in range(1, 7)] == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]
    assert resend_delay(10_000, 30.0, 300.0) == 300.0  # no overflow however long a device waits
    with pytest.raises(ValueError, match="sends counts sends made"):
        resend_delay(0, 30.0, 300.0)


def test_the_schedule_holds_a_first_send_then_waits_longer_after_each_send() -> None:
    s = UploadSchedule(10.0, 25.0)
    assert s.due("unknown", 0.0) and s.sends("unknown") == 0  # after a restart: whatever the outbox holds goes
    s.hold("u", 100.0)
    assert not s.due("u", 99.9) and s.due("u", 100.0)
    assert s.sent("u", 100.5) == 110.5 and s.sends("u") == 1
    assert not s.due("u", 110.4) and s.due("u", 110.5)
    assert s.sent("u", 111.0) == 131.0  # 20 s
    assert s.sent("u", 131.0) == 156.0  # 40 s, capped at 25 s
    s.forget("u")
    assert s.due("u", 0.0) and s.sends("u") == 0


@pytest.mark.parametrize("timeout, cap", [(0.0, 10.0), (10.0, 5.0), (1.0, float("inf")), (float("nan"), 1.0)])
def test_the_schedule_refuses_timeouts_that_never_resend(timeout: float, cap: float) -> None:
    with pytest.raises(ValueError, match="need 0 < timeout_s"):
        UploadSchedule(timeout, cap)


# --- each device's place in a round's upload window ------------------------------------------------------

def test_upload_delays_are_deterministic_in_the_window_and_spread_over_it() -> None:
    devices = [f"dev-{i}" for i in range(10_000)]
    delays = np.array([upload_delay(120.0, d, 5) for d in devices])
    assert delays.min() >= 0.0 and delays.max() < 120.0
    counts, _ = np.histogram(delays, bins=12, range=(0.0, 120.0))
    assert counts.min() > 700 and counts.max() < 970  # ~833 a bin: uniform, not a burst at either end
    assert [upload_delay(120.0, d, 5) for d in devices[:50]] == list(delays[:50])  # the same on every call
    assert upload_delay(120.0, "dev-1", 6) != upload_delay(120.0, "dev-1", 5)  # a new place every round
    assert upload_delay(0.0, "dev-1", 5) == 0.0
    # Golden: the same on every device and platform (blake2b of "<device>/<round>").
    digest = hashlib.blake2b(b"dev-1/1", digest_size=8, person=b"edgefl-upload").digest()
    assert upload_delay(100.0, "dev-1", 1) == 100.0 * int.from_bytes(digest, "big") / 2**64


def _task(**kwargs: object) -> RoundTask:
    head = HeadConfig(4, 2, 0)
    model = GlobalModel(0, TrainingConfig(strategy="fedavg"), head, {"head.w": np.zeros((4, 2), np.float32),
                                                                     "head.b": np.zeros(2, np.float32)})
    return RoundTask(3, 1000.0, None, model, **kwargs)  # type: ignore[arg-type]


def test_the_task_carries_its_upload_window_and_each_device_reads_its_delay() -> None:
    task = decode_task(decode_envelope(encode_task(_task(upload_window_s=90.0))))
    assert task.upload_window_s == 90.0
    assert task.upload_delay("dev-7") == upload_delay(90.0, "dev-7", 3)
    assert task.bounds == {}  # the window is not one of the update bounds


def test_no_window_is_no_meta_key_so_older_and_newer_devices_read_the_same_task() -> None:
    env = decode_envelope(encode_task(_task()))
    assert UPLOAD_WINDOW_KEY not in env.meta
    assert decode_task(env).upload_window_s == 0.0 and decode_task(env).upload_delay("dev-7") == 0.0


@pytest.mark.parametrize("bad", [-1.0, "60", True, float("inf")])
def test_a_task_with_a_bad_upload_window_is_refused(bad: object) -> None:
    env = decode_envelope(encode_task(_task()))
    env.meta[UPLOAD_WINDOW_KEY] = bad  # type: ignore[index]
    with pytest.raises(FleetMessageError, match="upload_window_s is .*, expected a number of seconds >= 0"):
        decode_task(env)


# --- when devices come back: the task's steer on resends -------------------------------------------------------

def test_the_task_says_when_devices_come_back_and_each_device_comes_back_at_its_own_time() -> None:
    task = decode_task(decode_envelope(encode_task(_task(retry_after_s=120.0))))
    assert task.retry_after_s == 120.0 and task.bounds == {}
    waits = np.array([task.retry_delay(f"dev-{i}") for i in range(5_000)])
    assert waits.min() >= 120.0 and waits.max() < 240.0  # never sooner than asked, spread over one more window
    counts, _ = np.histogram(waits, bins=10, range=(120.0, 240.0))
    assert counts.min() > 400 and counts.max() < 600  # ~500 a bin: the resends do not come back as one burst
    assert task.retry_delay("dev-1") != 120.0 + task.upload_delay("dev-1")  # not the upload window's draw again
    plain = decode_envelope(encode_task(_task()))
    assert RETRY_AFTER_KEY not in plain.meta and decode_task(plain).retry_delay("dev-1") == 0.0


def test_the_schedule_waits_at_least_what_the_task_says_and_longer_if_its_own_timeout_is() -> None:
    s = UploadSchedule(10.0, 300.0)
    s.pace("u", 45.0)
    assert s.sent("u", 0.0) == 45.0  # the task's steer beats the device's 10 s
    assert s.sent("u", 45.0) == 90.0  # 20 s of its own: still 45
    assert s.sent("u", 90.0) == 135.0
    assert s.sent("u", 135.0) == 215.0  # 80 s of its own now: longer than the steer
    s.forget("u")
    assert s.sent("u", 0.0) == 10.0  # the steer went with the update


@pytest.mark.parametrize("bad", [-1.0, "60", True, float("inf")])
def test_a_task_with_a_bad_retry_steer_is_refused(bad: object) -> None:
    env = decode_envelope(encode_task(_task()))
    env.meta[RETRY_AFTER_KEY] = bad  # type: ignore[index]
    with pytest.raises(FleetMessageError, match="retry_after_s is .*, expected a number of seconds >= 0"):
        decode_task(env)
