"""Two peers of different protocol versions, wired to each other, exchange a bounded number of ERRORs.

Before the ERROR-reply rule (firmware_bridge/error_replies.py, PROTOCOL.md "Error replies") each side
answered the other's ERROR BAD_VERSION with its own, ~1,900 frames/s each way, forever. Now an ERROR frame
is never answered and ERROR replies are held to a token bucket; here for the C firmware (two test_host
processes, one built as version 2, on a simulated clock) and for the emulator (version 2) against a v1
peer that still answers everything it cannot read (the worst case: the old behaviour).
"""

from __future__ import annotations

import heapq
import re
import struct
import subprocess
import time
from pathlib import Path

from firmware_bridge.error_replies import ERROR_REPLY_BURST, ERROR_REPLY_RATE
from firmware_bridge.framing import FrameDecoder, decode_frame, encode_frame
from firmware_bridge.messages import ErrorCode, ErrorMsg, Heartbeat, Hello, MessageType, encode_message, to_frame
from tests.unit.test_conformance import EmulatorPort
from tests.unit.test_firmware_c import FIRMWARE, build_host


def test_the_c_firmware_uses_the_same_numbers() -> None:
    header = (FIRMWARE / "edgefl_proto.h").read_text(encoding="utf-8")
    defined = dict(re.findall(r"#define EDGEFL_ERROR_REPLY_(RATE|BURST) (\d+)u", header))
    assert {k: int(v) for k, v in defined.items()} == {"RATE": ERROR_REPLY_RATE, "BURST": ERROR_REPLY_BURST}
    assert "error_replies.py" in header  # the header says where the rule is defined


class CPeer:
    """test_host's device mode driven interactively: bytes in at a given time, reply frames out."""

    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen([str(exe), "device"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def command(self, lines: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(lines + "\nSYNC\n")
        self.proc.stdin.flush()
        out = []
        while (line := self.proc.stdout.readline().rstrip("\n")) != "SYNC":
            assert line, "test_host ended"
            out.append(line)
        return out

    def feed(self, data: bytes, now_ms: int) -> list[bytes]:
        out = self.command(f"UPTIME {now_ms}\nRX {data.hex()}")
        assert all(line.startswith("TX ") for line in out), out
        return [bytes.fromhex(line[3:]) for line in out]

    def stats(self) -> dict[str, int]:
        (line,) = self.command("STATS")
        return {k: int(v) for k, v in (t.split("=") for t in line.split()[1:])}

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def test_c_firmware_v1_and_v2_wired_together_go_quiet(tmp_path: Path) -> None:
    peers = {1: CPeer(build_host(tmp_path, name="v1")),
             2: CPeer(build_host(tmp_path, "-DEDGEFL_PROTO_VERSION=2u", name="v2"))}
    try:
        # Both boot and greet in their own version; then the v1 side's application sends a HEARTBEAT
        # every 10 ms for 2 s (a keepalive), each answered by the v2 side with ERROR BAD_VERSION as the
        # bucket allows. Every frame reaches the other side 1 ms after it was sent.
        mtype, payload = encode_message(Hello(50, 0, 0, "v2-peer", proto_version=2))
        events: list[tuple[int, int, int, bytes]] = [(0, 0, 2, to_frame(Hello(50, 0, 0, "v1-peer"), 0)),
                                                     (0, 1, 1, encode_frame(mtype, 0, payload, version=2))]
        beats = 200
        for k in range(beats):
            events.append((10 * k, 2 + k, 2, to_frame(Heartbeat(10 * k), 1 + k)))
        heapq.heapify(events)
        order = len(events)
        errors = {1: 0, 2: 0}
        deliveries, t = 0, 0
        while events:
            t, _, dest, data = heapq.heappop(events)
            deliveries += 1
            assert deliveries < 10_000, f"still exchanging frames at t={t} ms: an ERROR storm"
            for reply in peers[dest].feed(data, t):
                if decode_frame(reply).type == MessageType.ERROR:
                    errors[dest] += 1
                heapq.heappush(events, (t + 1, order, 3 - dest, reply))
                order += 1
        duration_s = 10 * (beats - 1) / 1000
        # Quiet within a millisecond of the last keepalive: nothing answers the ERRORs.
        assert t <= 10 * (beats - 1) + 2
        assert errors[1] == 1  # v1 answered v2's HELLO, never one of v2's ERRORs
        bound = ERROR_REPLY_BURST + ERROR_REPLY_RATE * duration_s
        assert bound - 2 <= errors[2] <= bound  # the bucket really limits, and really refills
        s1, s2 = peers[1].stats(), peers[2].stats()
        assert s1["errors_unanswered"] == errors[2] and s1["errors_suppressed"] == 0
        assert s2["errors_unanswered"] == errors[1]
        assert s2["errors_suppressed"] == 1 + beats - errors[2]  # every frame refused, most not answered
    finally:
        for p in peers.values():
            p.close()


def test_emulator_v2_and_a_v1_peer_that_answers_everything_go_quiet() -> None:
    port = EmulatorPort(proto_version=2)
    dec = FrameDecoder()
    sent_errors = 0
    got_errors = 0

    def answer(data: bytes) -> int:
        """The v1 peer as agents were: an ERROR BAD_VERSION for every frame it cannot read, ERRORs too."""
        nonlocal sent_errors, got_errors
        frames = dec.feed(data)
        for f in frames:
            assert f.version == 2
            got_errors += f.type == MessageType.ERROR
            port.write(to_frame(ErrorMsg(ErrorCode.BAD_VERSION, "agent speaks protocol version 1"), 1000 + sent_errors))
            sent_errors += 1
        return len(frames)

    try:
        t0 = time.monotonic()
        port.write(to_frame(Hello(0, 0, 0, "edge-fl-agent"), 0))
        seq = 1
        while time.monotonic() - t0 < 1.0:  # a keepalive every 5 ms for a second
            port.write(to_frame(Heartbeat(seq), seq))
            seq += 1
            answer(port._read_available(0.005))
        # Quiet: once the emulator has handled everything, a round brings nothing new.
        for _ in range(5):
            if answer(port.replies()) == 0:
                break
        else:
            raise AssertionError("the emulator still answers after 5 rounds: an ERROR storm")
        elapsed = time.monotonic() - t0
        stats = port.emu.stats
        assert got_errors == sent_errors == stats.errors_tx["BAD_VERSION"]  # only ERRORs came, each answered once
        assert ERROR_REPLY_BURST <= got_errors <= ERROR_REPLY_BURST + ERROR_REPLY_RATE * elapsed + 1
        assert stats.errors_unanswered == sent_errors  # not one of the peer's ERRORs was answered
        assert stats.errors_suppressed == seq - got_errors  # the HELLO and keepalives over the rate
        assert stats.errors_rx == sent_errors
    finally:
        port.close()


def test_an_error_frame_of_any_version_is_never_answered(tmp_path: Path) -> None:
    frames = [encode_frame(MessageType.ERROR, k, struct.pack("<BB", code, 0), version=v)
              for k, (v, code) in enumerate((v, c) for v in (0, 1, 2, 7, 255) for c in (1, 2, 9, 200))]
    frames.append(encode_frame(MessageType.ERROR, 99, b"\x01", version=1))  # too short to be an ERROR message
    frames.append(encode_frame(MessageType.ERROR, 98, b"\x01\x05ab", version=2))  # detail_len disagrees
    c = CPeer(build_host(tmp_path))
    try:
        assert [c.feed(f, 0) for f in frames] == [[]] * len(frames)
        # The rejected ones (another version, a bad payload) are counted; the 4 valid v1 ERRORs are messages.
        assert c.stats()["errors_unanswered"] == len(frames) - 4
    finally:
        c.close()
    for version in (1, 2):
        port = EmulatorPort(proto_version=version)
        try:
            port.write(b"".join(frames))
            assert [f for f in FrameDecoder().feed(port.replies())] == []
            assert port.emu.stats.errors_rx == len(frames) and port.emu.stats.errors_tx == {}
        finally:
            port.close()
