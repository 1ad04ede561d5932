"""EmulatedMcu.freeze() / thaw(): a hung firmware on an open port, then the same firmware resumed.

(Its protocol behaviour is checked by test_conformance.py and test_error_storm.py.)
"""

from __future__ import annotations

import time

from firmware_bridge.framing import FrameDecoder
from firmware_bridge.messages import Heartbeat, Hello, MessageType, decode_message, to_frame
from tests.unit.test_conformance import EmulatorPort

QUIET_S = 0.4  # eight window intervals at speedup 10: how long "nothing comes" is watched for


def types_of(data: bytes, dec: FrameDecoder) -> list[MessageType]:
    return [MessageType(f.type) for f in dec.feed(data)]


def test_freeze_stops_reading_answering_and_streaming_and_thaw_resumes() -> None:
    port = EmulatorPort(speedup=10.0)  # a window every 50 ms once an agent said HELLO
    emu, dec = port.emu, FrameDecoder()
    try:
        port.write(to_frame(Hello(0, 0, 0, "edge-fl-agent"), 0))
        assert MessageType.HELLO in types_of(port.replies(), dec)
        deadline = time.monotonic() + 5
        while emu.stats.windows_sent < 3:  # streaming
            assert time.monotonic() < deadline
            types_of(port._read_available(0.05), dec)

        emu.freeze()
        assert emu.frozen
        sessions, windows, frames_rx = emu.stats.sessions, emu.stats.windows_sent, emu.stats.frames_rx
        types_of(port._read_available(0), dec)  # whatever it wrote before it froze
        port.write(to_frame(Heartbeat(1), 1))  # the port is open: the write goes through...
        t0 = time.monotonic()
        got = b""
        while time.monotonic() - t0 < QUIET_S:
            got += port._read_available(0.02)
        assert got == b""  # ...but nothing is answered and nothing streamed
        assert emu.stats.windows_sent == windows and emu.stats.frames_rx == frames_rx
        assert emu.stats.bytes_handled < port.written and emu.stats.sessions == sessions

        emu.thaw()
        assert not emu.frozen
        replies = [decode_message(f) for f in dec.feed(port.replies()) if f.type == MessageType.HEARTBEAT]
        assert len(replies) == 1 and isinstance(replies[0], Heartbeat)  # the HEARTBEAT sent while it hung
        deadline = time.monotonic() + 5
        while emu.stats.windows_sent < windows + 2:  # and the stream goes on, same session
            assert time.monotonic() < deadline, "no windows after thaw()"
            types_of(port._read_available(0.05), dec)
        assert emu.stats.sessions == sessions and emu.stats.tx_dropped == 0
    finally:
        port.close()


def test_freeze_twice_and_thaw_twice_are_harmless_and_stop_works_while_frozen() -> None:
    port = EmulatorPort(realtime=False)
    try:
        port.emu.thaw()  # not frozen: nothing happens
        port.write(to_frame(Heartbeat(1), 1))
        assert len(FrameDecoder().feed(port.replies())) == 1
        port.emu.freeze()
        port.emu.freeze()
        port.write(to_frame(Heartbeat(2), 2))
        port.emu.thaw()
        port.emu.thaw()
        assert [f.type for f in FrameDecoder().feed(port.replies())] == [MessageType.HEARTBEAT]
        port.emu.freeze()
    finally:
        t0 = time.monotonic()
        port.close()  # stop() of a frozen emulator returns promptly
        assert time.monotonic() - t0 < 3
