"""The serial link against an MCU: the emulated one on a pty by default, a real board with --hil-port URL.

Every wait is bounded and awaits an event (a reply, a window, a reconnection); nothing sleeps to sync.
Tests that need the emulator's internals (its counters, unplugging it) skip on a real board.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from firmware_bridge.framing import encode_frame
from firmware_bridge.link import HeadPushError, LinkOpenError, ProtocolVersionError, SerialLink
from firmware_bridge.messages import (
    ErrorCode,
    ErrorMsg,
    HeadBegin,
    HeadChunk,
    HeadCommit,
    Hello,
    InferResult,
    MessageType,
    SensorWindow,
    encode_message,
    head_push,
    to_frame,
)

from .conftest import SPEEDUP, SUBJECT

pytestmark = pytest.mark.hil


def results_for(link: SerialLink, head_id: int, n: int, timeout: float = 15.0) -> list[tuple[SensorWindow, InferResult]]:
    """n (window, INFER_RESULT) pairs computed with head `head_id`; windows arrive before their result."""
    windows: dict[int, SensorWindow] = {}
    pairs = []
    deadline = time.monotonic() + timeout
    while len(pairs) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(pairs)}/{n} results for head {head_id:#x} within {timeout} s"
        res = link.get_result(left)
        for w in link.windows(timeout=0):
            windows[w.window_id] = w
        if res.head_id == head_id and res.window_id in windows:
            pairs.append((windows[res.window_id], res))
    return pairs


def test_hello_handshake(link: SerialLink, emulator: Any) -> None:
    hello = link.hello(timeout=2.0)
    assert hello.proto_version == 1
    assert hello.sensor_rate_hz > 0 and hello.board
    assert link.peer == hello
    if emulator is not None:
        assert hello.board.startswith("edge-fl-emulator") and emulator.inference_runtime in hello.board
        assert hello.sensor_rate_hz == 50 and hello.arena_size == emulator.backbone.arena_size


def test_windows_stream_with_real_content_at_the_sensor_rate(link: SerialLink, emulator: Any) -> None:
    link.drain()
    first = link.get_window(5.0)
    t0 = time.monotonic()
    got = [first] + [link.get_window(5.0) for _ in range(11)]
    elapsed = time.monotonic() - t0
    ids = [w.window_id for w in got]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "window ids must be consecutive"
    assert all(w.n_channels == 6 and w.scale > 0 for w in got)
    if emulator is not None:
        assert all(w.n_samples == 100 for w in got)
        for w in got:  # the real recordings of the subject, int16 with the stream's fixed scale
            index, label = emulator.sent[w.window_id]
            assert w.label == label == int(emulator.windows_y[index])
            np.testing.assert_allclose(w.to_float(), emulator.windows_x[index], atol=w.scale / 2 + 1e-6)
        # Real time (compressed by SPEEDUP): one window per stride, not faster; a generous upper bound.
        per_window = elapsed / (len(got) - 1)
        assert 0.5 * emulator.interval <= per_window <= 6 * emulator.interval, per_window


def test_corrupted_frames_are_dropped_and_counted_on_both_sides(link: SerialLink, emulator: Any) -> None:
    good = to_frame(Hello(0, 0, 0, "edge-fl-agent"), 1)
    bad = bytearray(good)
    bad[5] ^= 0x20 if bad[5] ^ 0x20 else 0x40  # stays nonzero: still one delimited frame, bad CRC
    before_mcu = emulator.decoder.stats.dropped if emulator is not None else 0
    for _ in range(3):
        link.send_raw(bytes(bad))
    link.send_raw(b"\x17\x42garbage-without-crc\x00")
    assert link.hello(timeout=2.0).proto_version == 1  # the link survives and resynchronises
    if emulator is None:
        return
    assert emulator.decoder.stats.dropped - before_mcu == 4  # counted before the HELLO behind them
    before_agent = link.decoder.stats.dropped
    link.drain()
    emulator.corrupt_tx = 2  # the next two frames the MCU writes get one byte flipped
    got = [link.get_window(5.0) for _ in range(3)]
    assert link.decoder.stats.dropped - before_agent == 2
    assert link.snapshot()["decoder"]["frames"] > 0 and got[-1].window_id > got[0].window_id


def test_head_push_retries_a_dropped_chunk(link: SerialLink, other_head: Any, trained_head: Any) -> None:
    dropped: list[int] = []

    def lose_chunk_1_once(msg: Any, data: bytes) -> bytes | None:
        if isinstance(msg, HeadChunk) and msg.index == 1 and not dropped:
            dropped.append(msg.index)
            return None  # the wire ate it: the device never ACKs, the link must resend
        return data

    link.tx_filter = lose_chunk_1_once
    head_id = link.push_head(trained_head.blob, chunk_size=256, ack_timeout=0.3)
    assert dropped == [1] and link.stats.retries == 1
    assert results_for(link, head_id, 2)[0][1].head_id == head_id


def test_incomplete_or_corrupt_commit_is_refused_and_the_old_head_stays(link: SerialLink, trained_head: Any,
                                                                      other_head: Any, emulator: Any) -> None:
    old = link.push_head(trained_head.blob)
    new_id = old ^ 0x5A5A5A5A
    begin, chunks, commit = head_push(new_id, other_head.blob, 256)
    assert link.ack_or_error(begin, 2.0).status == 0  # type: ignore[union-attr]
    for c in chunks:
        if c.index != 1:
            assert link.ack_or_error(c, 2.0, index=c.index).status == 0
    reply = link.ack_or_error(commit, 2.0)
    assert isinstance(reply, ErrorMsg) and reply.code == ErrorCode.HEAD_INCOMPLETE, reply

    # The push helper names the chunk that never got through.
    link.tx_filter = lambda m, d: None if isinstance(m, HeadChunk) and m.index == 2 else d
    with pytest.raises(HeadPushError, match="chunk 2/") as info:
        link.push_head(other_head.blob, chunk_size=256, retries=1, ack_timeout=0.2, head_id=new_id)
    assert info.value.chunk == 2 and info.value.head_id == new_id
    link.tx_filter = None
    reply = link.ack_or_error(HeadCommit(new_id), 2.0)
    assert isinstance(reply, ErrorMsg) and reply.code == ErrorCode.HEAD_INCOMPLETE

    # A complete head whose bytes do not match the announced CRC-32.
    bad_begin = HeadBegin(new_id, begin.total_len, begin.n_chunks, begin.head_crc32 ^ 1)
    assert link.ack_or_error(bad_begin, 2.0).status == 0
    for c in chunks:
        link.ack_or_error(c, 2.0, index=c.index)
    reply = link.ack_or_error(commit, 2.0)
    assert isinstance(reply, ErrorMsg) and reply.code == ErrorCode.HEAD_CRC

    link.drain()
    assert {r.head_id for _, r in results_for(link, old, 3)} == {old}
    assert all(r.head_id == old for r in (link.get_result(5.0) for _ in range(3)))
    if emulator is not None:
        assert emulator.head_id == old


def test_unplug_replug_reconnects_reannounces_and_never_uses_a_half_pushed_head(trained_head: Any,
                                                                               other_head: Any,
                                                                               needs_emulator: Any) -> None:
    from firmware_bridge.emulator import EmulatedMcu

    with EmulatedMcu.on_pty(subject=SUBJECT, speedup=SPEEDUP) as emu, SerialLink(emu.port_url) as link:
        link.wait_peer_hello(5.0)
        old = link.push_head(trained_head.blob)
        gen, hellos = link.generation, emu.stats.hello_rx
        emu.unplug_on_chunk = 1  # the cable comes out while chunk 1 is on the wire
        with pytest.raises(HeadPushError, match="link lost") as info:
            # The unplug answers chunk 1 at once; the long ACK timeout only keeps a loaded machine from
            # turning the loss into a resend that would meet the replugged board.
            link.push_head(other_head.blob, chunk_size=256, ack_timeout=10.0, head_id=0xBEEF)
        assert info.value.chunk == 1
        link.wait_connected(10.0, after=gen)
        assert link.wait_peer_hello(10.0, after=gen).board.startswith("edge-fl-emulator")
        assert emu.stats.hello_rx > hellos  # the link re-announced itself
        reply = link.ack_or_error(HeadCommit(0xBEEF), 2.0)
        assert isinstance(reply, ErrorMsg) and reply.code == ErrorCode.HEAD_INCOMPLETE
        link.drain()
        assert {r.head_id for _, r in results_for(link, old, 3)} == {old}
        new = link.push_head(other_head.blob)  # and a full push after replug works
        assert results_for(link, new, 2)[0][1].head_id == new
        # Every loss was followed by a reconnection (on a loaded machine the link may also have opened the
        # old pty path once more before its node vanished: that is a second, equally handled, loss).
        assert link.stats.disconnects >= 1 and link.stats.connects == link.stats.disconnects + 1


def test_device_restart_on_a_socket_url_reconnects(needs_emulator: Any, trained_head: Any) -> None:
    from firmware_bridge.emulator import EmulatedMcu

    emu = EmulatedMcu.on_socket(0, subject=SUBJECT, speedup=SPEEDUP)
    port = int(emu.port_url.rsplit(":", 1)[1])
    try:
        with SerialLink(emu.port_url) as link:
            link.wait_peer_hello(5.0)
            link.push_head(trained_head.blob)
            gen = link.generation
            emu.stop()  # the board dies...
            emu = EmulatedMcu.on_socket(port, subject=SUBJECT, speedup=SPEEDUP)  # ...and boots again
            link.wait_connected(10.0, after=gen)
            link.wait_peer_hello(10.0, after=gen)
            assert emu.stats.hello_rx >= 1
            link.drain()
            w = link.get_window(5.0)
            assert w.n_samples == 100 and emu.head is None  # a rebooted MCU has no head until one is pushed
    finally:
        emu.stop()


def test_version_mismatch_is_a_clear_error_both_ways(link: SerialLink, emulator: Any) -> None:
    # The agent says version 2 in a version-2 frame: the device answers ERROR BAD_VERSION.
    mtype, payload = encode_message(Hello(0, 0, 0, "future-agent", proto_version=2))
    reply = link.request_raw(encode_frame(mtype, 9, payload, version=2),
                             lambda m: isinstance(m, ErrorMsg) and m.code == ErrorCode.BAD_VERSION, 2.0)
    assert isinstance(reply, ErrorMsg)
    if emulator is None:
        return
    from firmware_bridge.emulator import EmulatedMcu

    with EmulatedMcu.on_pty(subject=SUBJECT, proto_version=2, speedup=SPEEDUP) as future, \
            SerialLink(future.port_url, reconnect=False) as lk:
        with pytest.raises(ProtocolVersionError, match=r"version 2.*version 1"):
            lk.hello(timeout=2.0)
        assert lk.version_error is not None
        # The device's refusal came as an ERROR frame, which the agent never answers: no error ping-pong
        # (test_link_resilience.py bounds the exchange between two such peers).
        assert lk.stats.error_replies_suppressed >= 1


def test_callback_errors_are_logged_and_do_not_stop_the_reader(port_url: str) -> None:
    def broken(msg: Any) -> None:
        raise RuntimeError("user bug")

    with SerialLink(port_url, on_message=broken) as lk:
        lk.wait_peer_hello(5.0)
        lk.get_window(5.0)
        lk.get_window(5.0)
        assert lk.stats.callback_errors >= 2 and lk.connected


def test_a_port_that_cannot_be_opened_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(LinkOpenError, match=r"cannot open serial port .*nope"):
        SerialLink(str(tmp_path / "nope"))
    assert MessageType.HELLO == 1
