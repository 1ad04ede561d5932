"""The emulator's head-push receiver, driven directly: no port, no thread, no clock.

`firmware_bridge.emulator.staging.HeadReceiver` is the Python twin of the C firmware's
`edgefl_head_rx_*`. Here it runs every conformance scenario of firmware/conformance/mcu.txt that is a
head push only (HEAD_BEGIN / HEAD_CHUNK / HEAD_COMMIT frames), read with test_conformance's parser
and checked with its checker, as test_conformance runs them against the C firmware and the whole
emulator. ERROR replies go through the same ERROR-reply rule on a clock that stands still (as
test_host's in test_conformance).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from firmware_bridge.emulator.staging import HeadReceiver
from firmware_bridge.emulator.stream import SensorStream
from firmware_bridge.error_replies import ErrorReplyLimiter
from firmware_bridge.framing import FrameDecoder
from firmware_bridge.messages import (
    Ack,
    ErrorCode,
    ErrorMsg,
    HeadBegin,
    HeadChunk,
    HeadCommit,
    Message,
    MessageError,
    decode_message,
    head_push,
    to_frame,
)
from tests.unit.test_conformance import ALL, BLOB, CHUNK, DIM, HeadIs, Scenario, Send, Step, check, reply_lines
from tests.unit.test_dependency_rule import BRIDGE_ALLOWED_IMPORTS, PURE_BRIDGE_MODULES

HEAD_PUSH = (HeadBegin, HeadChunk, HeadCommit)


def head_push_messages(sc: Scenario) -> list[list[tuple[int, int, Message]]] | None:
    """Per step, the (frame type, seq, message) the agent sends; None if any frame is not a head push."""
    dec = FrameDecoder()
    steps: list[list[tuple[int, int, Message]]] = []
    for step in sc.steps:
        msgs: list[tuple[int, int, Message]] = []
        if isinstance(step, Send):
            for frame in dec.feed(step.data):
                try:
                    msg = decode_message(frame)
                except MessageError:
                    return None
                if not isinstance(msg, HEAD_PUSH):
                    return None
                msgs.append((frame.type, frame.seq, msg))
        steps.append(msgs)
    return steps if dec.stats.dropped == 0 else None


HEAD_SCENARIOS = [sc for sc in ALL if head_push_messages(sc) is not None]


def run_on_staging(sc: Scenario, rx: HeadReceiver | None = None) -> Iterator[tuple[Step, list[str]]]:
    """The scenario through a bare HeadReceiver: each reply encoded as a frame, read back as a canonical line."""
    rx = rx or HeadReceiver(embedding_dim=DIM)
    limiter = ErrorReplyLimiter()
    sent = head_push_messages(sc)
    assert sent is not None
    out_dec, tx_seq = FrameDecoder(), 0
    for step, msgs in zip(sc.steps, sent, strict=True):
        if isinstance(step, HeadIs):
            yield step, ["none" if rx.head_id is None else str(rx.head_id)]
            continue
        wire = b""
        for frame_type, seq, msg in msgs:
            assert isinstance(msg, HEAD_PUSH)
            reply = rx.handle(msg)
            if reply.error is None:
                answer: Message = Ack(int(msg.TYPE), seq, 0, reply.index)
            elif limiter.should_reply(frame_type, 0.0):
                answer = ErrorMsg(reply.error, reply.detail)
            else:
                continue
            wire += to_frame(answer, tx_seq)
            tx_seq += 1
        yield step, reply_lines(wire, out_dec)


def test_every_head_push_scenario_is_run_here() -> None:
    names = {sc.name for sc in HEAD_SCENARIOS}
    assert {"head_push", "duplicate_chunk", "missing_chunk_then_resend", "bad_crc_commit", "chunk_sizes",
            "chunk_index_and_head_id", "invalid_head_values", "head_begin_refused",
            "new_begin_abandons_push"} <= names
    assert "hello" not in names and "bad_frames" not in names  # the runner's business, not staging's


@pytest.mark.parametrize("sc", HEAD_SCENARIOS, ids=lambda sc: sc.name)
def test_staging_conforms(sc: Scenario) -> None:
    check(sc, run_on_staging(sc), "staging")


def push(rx: HeadReceiver, head_id: int, blob: bytes) -> list[ErrorCode | None]:
    begin, chunks, commit = head_push(head_id, blob, CHUNK)
    return [rx.handle(m).error for m in (begin, *chunks, commit)]


def test_a_head_for_another_embedding_width_is_refused_and_the_old_head_stays() -> None:
    rx = HeadReceiver(embedding_dim=DIM)
    assert push(rx, 1, BLOB) == [None] * 5
    narrow = HeadReceiver(embedding_dim=DIM // 2)
    assert push(narrow, 1, BLOB)[-1] == ErrorCode.BAD_MESSAGE and narrow.active is None
    assert push(rx, 2, BLOB)[-1] is None and rx.head_id == 2 and rx.head is not None
    assert (rx.stats.chunks_rx, rx.stats.heads_committed, rx.stats.commits_refused) == (6, 2, 0)
    assert (narrow.stats.heads_committed, narrow.stats.commits_refused) == (0, 1)


def test_abandon_loses_the_push_in_progress_not_the_committed_head() -> None:
    rx = HeadReceiver(embedding_dim=DIM)
    push(rx, 1, BLOB)
    begin, chunks, commit = head_push(2, BLOB, CHUNK)
    for m in (begin, *chunks):
        assert rx.handle(m).ok
    assert rx.accepts(chunks[0]) and rx.staging is not None
    rx.abandon()  # the cable came out
    assert rx.staging is None and not rx.accepts(chunks[0])
    assert rx.handle(commit).error == ErrorCode.HEAD_INCOMPLETE and rx.head_id == 1


def test_the_staging_buffer_size_is_the_receivers() -> None:
    rx = HeadReceiver(embedding_dim=DIM, max_head_bytes=len(BLOB) - 1)
    assert push(rx, 1, BLOB)[0] == ErrorCode.OUT_OF_MEMORY and rx.staging is None
    assert HeadReceiver(embedding_dim=DIM, max_head_bytes=len(BLOB)).handle(head_push(1, BLOB, CHUNK)[0]).ok


def test_staging_imports_only_the_pure_codecs() -> None:
    """No port, thread, file or clock: the same import rule as the codecs (test_dependency_rule)."""
    path = Path(__file__).resolve().parents[2] / "firmware_bridge" / "emulator" / "staging.py"
    allowed = BRIDGE_ALLOWED_IMPORTS | {f"firmware_bridge.{m}" for m in PURE_BRIDGE_MODULES}
    seen = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = "firmware_bridge.emulator".rsplit(".", node.level - 1)[0] if node.level else ""
            mods = [f"{package}.{node.module}" if package else node.module or ""]
        else:
            continue
        assert not [m for m in mods if m not in allowed], f"staging.py imports {mods}"
        seen += mods
    assert "firmware_bridge.head_blob" in seen  # the walk saw the imports


def test_the_sensor_stream_goes_round_with_ids_labels_and_one_scale() -> None:
    x = np.linspace(-2, 2, 3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
    y = np.array([4, 5, 6])
    stream = SensorStream(x, y, interval=0.5)
    got = [stream.next_window() for _ in range(4)]
    assert [w.msg.window_id for w in got] == [0, 1, 2, 3] and [w.index for w in got] == [0, 1, 2, 0]
    assert [w.label for w in got] == [w.msg.label for w in got] == [4, 5, 6, 4]
    assert {w.msg.scale for w in got} == {stream.scale}
    np.testing.assert_allclose(got[1].msg.to_float(), x[1], atol=stream.scale / 2 + 1e-6)
    unlabelled = SensorStream(x, y, interval=0.5, labelled=False)
    assert unlabelled.next_window().msg.label == -1
    assert stream.next_due(10.0, 10.2) == 10.5 and stream.next_due(10.0, 20.0) == 19.5  # never a burst
