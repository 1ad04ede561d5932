"""The C99 firmware library (firmware_bridge/firmware/) against the Python side, byte for byte.

gcc builds `edgefl_proto.c` + `test_host.c` into a line-oriented driver (modes decode / encode / head /
device, documented at the top of test_host.c); every check runs the same bytes through both sides:

- Python frames -> C decoder -> canonical text lines == what Python expects;
- canonical lines -> C encoder -> bytes == Python's own encoding, and Python decodes them to the message;
- garbage, resync, bad CRC / COBS / header / length, overruns: both decoders keep and drop the same
  frames and count the drops the same way;
- the head-push state machine in C (a simulated MCU): a complete, CRC-correct push switches the head,
  a missing chunk or a wrong CRC keeps the old one;
- int8 head inference in C == head_blob.HeadBlob.predict == Int8Head.predict on real embeddings.

Shared vectors live in firmware_bridge/firmware/test_vectors.txt ("<canonical line> | <hex frame>");
regenerate them after a deliberate protocol change with:

    .venv/bin/python tests/unit/test_firmware_c.py --write-vectors
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # when run as a script to write the vectors
    sys.path.insert(0, str(ROOT))

from firmware_bridge.framing import (  # noqa: E402
    FrameDecoder,
    cobs_encode,
    crc16_ccitt,
    crc32,
    decode_frame,
    encode_body,
    encode_frame,
    max_encoded_size,
)
from firmware_bridge.head_blob import HeadBlobError, decode_head, encode_head  # noqa: E402
from firmware_bridge.messages import (  # noqa: E402
    Ack,
    ErrorCode,
    ErrorMsg,
    HeadBegin,
    HeadChunk,
    HeadCommit,
    Heartbeat,
    Hello,
    InferResult,
    Message,
    MessageError,
    SensorWindow,
    decode_message,
    head_push,
    to_frame,
)

FIRMWARE = ROOT / "firmware_bridge" / "firmware"
VECTORS = FIRMWARE / "test_vectors.txt"
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-O2", "-ffp-contract=off"]
# Stricter warnings the library itself (not the test driver) is kept clean of.
LIB_EXTRA = ["-Wconversion", "-Wshadow", "-Wcast-qual", "-Wstrict-prototypes", "-Wmissing-prototypes"]
DEVICE_HELLO = Hello(50, 20480, 16384, "host-test")  # what test_host's device mode announces


# --- canonical text: the format test_host.c prints and parses ----------------------------------------

def esc(text: str) -> str:
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode("utf-8"))


def f32hex(x: float) -> str:
    return f"0x{struct.unpack('<I', struct.pack('<f', x))[0]:08x}"


def canonical(msg: Message, seq: int) -> str:
    if isinstance(msg, Hello):
        return (f"HELLO seq={seq} proto={msg.proto_version} rate={msg.sensor_rate_hz} ram={msg.free_ram} "
                f"arena={msg.arena_size} board={esc(msg.board)}")
    if isinstance(msg, SensorWindow):
        return (f"SENSOR_WINDOW seq={seq} id={msg.window_id} n={msg.n_samples} ch={msg.n_channels} label={msg.label} "
                f"scale={f32hex(msg.scale)} samples={','.join(str(int(v)) for v in msg.samples.ravel())}")
    if isinstance(msg, HeadBegin):
        return (f"HEAD_BEGIN seq={seq} head={msg.head_id} total={msg.total_len} chunks={msg.n_chunks} "
                f"crc=0x{msg.head_crc32:08x}")
    if isinstance(msg, HeadChunk):
        return f"HEAD_CHUNK seq={seq} head={msg.head_id} index={msg.index} data={msg.data.hex()}"
    if isinstance(msg, HeadCommit):
        return f"HEAD_COMMIT seq={seq} head={msg.head_id}"
    if isinstance(msg, Ack):
        return f"ACK seq={seq} type={msg.acked_type} acked_seq={msg.acked_seq} status={msg.status} index={msg.index}"
    if isinstance(msg, InferResult):
        return (f"INFER_RESULT seq={seq} window={msg.window_id} class={msg.class_id} score={f32hex(msg.score)} "
                f"head={msg.head_id}")
    if isinstance(msg, Heartbeat):
        return f"HEARTBEAT seq={seq} uptime={msg.uptime_ms}"
    if isinstance(msg, ErrorMsg):
        return f"ERROR seq={seq} code={int(msg.code)} detail={esc(msg.detail)}"
    raise TypeError(type(msg).__name__)


def expected_line(frame) -> str:  # type: ignore[no-untyped-def]
    """What test_host's decode mode prints for an intact frame (Python's view of it)."""
    if frame.version != 1:
        return f"BAD_VERSION seq={frame.seq} version={frame.version} type={frame.type}"
    try:
        return canonical(decode_message(frame), frame.seq)
    except MessageError as exc:
        if exc.code == ErrorCode.UNKNOWN_TYPE:
            return f"UNKNOWN seq={frame.seq} type={frame.type}"
        return f"BADMSG seq={frame.seq} type={frame.type} code={int(exc.code)}"


# --- shared vectors -----------------------------------------------------------------------------------

def vector_messages() -> list[tuple[int, Message]]:
    """Deterministic (seq, message) pairs covering every type and the framing edge cases."""
    pattern = (np.arange(600, dtype=np.int64) * 2654435761 % 65536 - 32768).astype(np.int16).reshape(100, 6)
    pattern[0, :3] = (-32768, 32767, 0)
    maxed = (np.arange(1018, dtype=np.int64) * 7919 % 65536 - 32768).astype(np.int16).reshape(509, 2)  # payload 2048
    return [
        (3, Hello(50, 20480, 16384, "nano33")),
        (0, Hello(0, 0, 0, "edge-fl-agent")),
        (65535, Hello(100, 0xFFFFFFFF, 1, "Nano 33 BLE Sense µ%")),
        (1, SensorWindow(7, pattern, 0.0005985504, -1)),
        (2, SensorWindow(8, np.zeros((1, 1), np.int16), 1.0, 3)),
        (4, SensorWindow(0xFFFFFFFF, maxed, 9.80665 / 16384, 127)),
        (5, HeadBegin(0xDEADBEEF, 4000, 8, 0x12345678)),
        (6, HeadChunk(1, 0, bytes(range(1, 255)))),  # a 254-byte non-zero run inside the body
        (7, HeadChunk(2, 3, bytes(i % 7 for i in range(250)))),  # payload 256: the last CRC-16 size
        (8, HeadChunk(2, 4, bytes(i % 7 for i in range(251)))),  # payload 257: the first CRC-32 size
        (9, HeadChunk(0x01010101, 0x0101, b"\x01" * 1024)),  # long runs crossing 254-byte COBS blocks
        (10, HeadCommit(0)),
        (11, Ack(4, 9, 0, 2)),
        (12, Ack(5, 10, int(ErrorCode.HEAD_CRC), 0)),
        (13, InferResult(7, 2, 0.875, 1)),
        (14, InferResult(0, 255, 1 / 3, 0xFFFFFFFF)),
        (15, Heartbeat(0)),
        (16, Heartbeat(0xFFFFFFFF)),
        (17, ErrorMsg(ErrorCode.HEAD_INCOMPLETE, "chunks missing")),
        (18, ErrorMsg(ErrorCode.BAD_VERSION, "")),
        (19, ErrorMsg(ErrorCode.BAD_MESSAGE, "100% bad\tpayload é")),
    ]


def render_vectors() -> str:
    lines = [
        "# edge-fl serial protocol v1: shared test vectors for firmware_bridge (Python) and firmware/ (C).",
        "# <canonical message line (format: firmware/test_host.c)> | <hex of the wire frame, 0x00 included>",
        "# Generated; regenerate with: .venv/bin/python tests/unit/test_firmware_c.py --write-vectors",
        "# CRC check values: CRC-16/CCITT-FALSE(\"123456789\") = 0x29b1, CRC-32(\"123456789\") = 0xcbf43926",
    ]
    lines += [f"{canonical(m, seq)} | {to_frame(m, seq).hex()}" for seq, m in vector_messages()]
    return "\n".join(lines) + "\n"


def read_vectors() -> list[tuple[str, bytes]]:
    out = []
    for line in VECTORS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            text, hexed = line.rsplit(" | ", 1)
            out.append((text, bytes.fromhex(hexed)))
    return out


# --- the C driver ---------------------------------------------------------------------------------------

def build_host(out: Path, *defines: str, name: str = "test_host") -> Path:
    """gcc test_host.c + the library into out/name (skips the test without gcc); defines: "-D..." flags."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: the C firmware library cannot be built here (CI has gcc)")
    exe = out / name
    build = subprocess.run([gcc, *CFLAGS, *defines, "-o", str(exe), str(FIRMWARE / "test_host.c"),
                            str(FIRMWARE / "edgefl_proto.c")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return exe


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fw")
    exe = build_host(out)
    # The library alone, with stricter warnings and overridden buffer macros (a small MCU build).
    small = subprocess.run(["gcc", *CFLAGS, *LIB_EXTRA, "-DEDGEFL_HEAD_MAX_LEN=1024u", "-DEDGEFL_HEAD_MAX_CHUNKS=16u",
                            "-c", str(FIRMWARE / "edgefl_proto.c"), "-o", str(out / "small.o")],
                           capture_output=True, text=True)
    assert small.returncode == 0, small.stderr
    return exe


def run(exe: Path, mode: str, lines: list[str]) -> list[str]:
    proc = subprocess.run([str(exe), mode], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def hex_lines(data: bytes, rng: random.Random) -> list[str]:
    """Split a byte stream into random-length hex lines (the C decoder is fed byte by byte anyway)."""
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 700)
        out.append(data[i:i + n].hex())
        i += n
    return out


def py_stats(dec: FrameDecoder) -> str:
    s = dec.stats
    return (f"STATS frames={s.frames} bad_crc={s.bad_crc} bad_length={s.bad_length} bad_cobs={s.bad_cobs} "
            f"bad_header={s.bad_header} overruns={s.overruns} version_mismatches={s.version_mismatches}")


# --- vectors ------------------------------------------------------------------------------------------------

def test_vector_file_is_current_and_python_agrees() -> None:
    assert VECTORS.read_text(encoding="utf-8") == render_vectors(), (
        "test_vectors.txt is stale: regenerate with .venv/bin/python tests/unit/test_firmware_c.py --write-vectors")
    assert crc16_ccitt(b"123456789") == 0x29B1 and crc32(b"123456789") == 0xCBF43926
    for text, wire in read_vectors():
        assert expected_line(decode_frame(wire)) == text


def test_c_decodes_and_encodes_the_vectors(host: Path) -> None:
    vectors = read_vectors()
    stream = b"".join(w for _, w in vectors)
    decoded = run(host, "decode", hex_lines(stream, random.Random(0)))
    assert decoded[:-1] == [t for t, _ in vectors]
    assert decoded[-1] == (f"STATS frames={len(vectors)} bad_crc=0 bad_length=0 bad_cobs=0 bad_header=0 overruns=0 "
                           "version_mismatches=0")
    encoded = run(host, "encode", [t for t, _ in vectors])
    for (text, wire), got in zip(vectors, encoded, strict=True):
        assert got == wire.hex(), text[:60]


# --- (a) Python -> C, (b) C -> Python ----------------------------------------------------------------------

def random_messages(rng: np.random.Generator, n: int) -> list[Message]:
    out: list[Message] = []
    for i in range(n):
        k = i % 9
        u32 = int(rng.integers(0, 2**32))
        if k == 0:
            out.append(Hello(int(rng.integers(0, 65536)), u32, int(rng.integers(0, 2**32)), f"board-{i}-ü"))
        elif k == 1:
            shape = (int(rng.integers(1, 120)), int(rng.integers(1, 8)))
            out.append(SensorWindow(u32, rng.integers(-32768, 32768, shape).astype(np.int16),
                                    float(rng.uniform(1e-6, 10.0)), int(rng.integers(-128, 128))))
        elif k == 2:
            out.append(HeadBegin(u32, int(rng.integers(0, 2**32)), int(rng.integers(0, 65536)),
                                 int(rng.integers(0, 2**32))))
        elif k == 3:
            data = rng.integers(0, 256, int(rng.integers(1, 1025))).astype(np.uint8).tobytes()
            out.append(HeadChunk(u32, int(rng.integers(0, 65536)), data))
        elif k == 4:
            out.append(HeadCommit(u32))
        elif k == 5:
            out.append(Ack(int(rng.integers(0, 256)), int(rng.integers(0, 65536)), int(rng.integers(0, 256)),
                           int(rng.integers(0, 65536))))
        elif k == 6:
            out.append(InferResult(u32, int(rng.integers(0, 256)), float(rng.random()), int(rng.integers(0, 2**32))))
        elif k == 7:
            out.append(Heartbeat(u32))
        else:
            out.append(ErrorMsg(int(rng.integers(0, 256)), f"detail {i}: x=%{i} \u2713"))
    return out


def test_python_frames_decode_in_c_to_the_same_messages(host: Path) -> None:
    msgs = random_messages(np.random.default_rng(1), 180)
    seqs = [(i * 7919) % 65536 for i in range(len(msgs))]
    stream = b"".join(to_frame(m, s) for m, s in zip(msgs, seqs, strict=True))
    out = run(host, "decode", hex_lines(stream, random.Random(1)))
    assert out[:-1] == [canonical(m, s) for m, s in zip(msgs, seqs, strict=True)]
    assert out[-1].startswith(f"STATS frames={len(msgs)} bad_crc=0 ")


def test_c_encodes_byte_for_byte_what_python_encodes(host: Path) -> None:
    msgs = random_messages(np.random.default_rng(2), 180)
    seqs = [(i * 104729) % 65536 for i in range(len(msgs))]
    out = run(host, "encode", [canonical(m, s) for m, s in zip(msgs, seqs, strict=True)])
    for m, s, got in zip(msgs, seqs, out, strict=True):
        wire = bytes.fromhex(got)
        frame = decode_frame(wire)
        assert (frame.seq, decode_message(frame)) == (s, m)
        assert wire == to_frame(m, s)


# --- (c) garbage, resync, every drop reason --------------------------------------------------------------

def _raw(version: int, type_: int, seq: int, length: int, flags: int, reserved: int, payload: bytes,
         crc32_: bool) -> bytes:
    """A body with a *valid* CRC over arbitrary header fields, COBS-framed."""
    covered = struct.pack("<BBHHBB", version, type_, seq, length, flags, reserved) + payload
    crc = struct.pack("<I", crc32(covered)) if crc32_ else struct.pack("<H", crc16_ccitt(covered))
    return cobs_encode(covered + crc) + b"\x00"


def hostile_stream(rng: random.Random) -> bytes:
    good = [to_frame(m, 100 + i) for i, m in enumerate(random_messages(np.random.default_rng(3), 18))]
    bad_crc = bytearray(encode_body(8, 5, struct.pack("<I", 99)))
    bad_crc[-1] ^= 0x55
    flipped = bytearray(encode_body(2, 6, bytes(300)))
    flipped[20] ^= 0x08
    wire_flip = bytearray(to_frame(Heartbeat(5), 7))
    wire_flip[3] ^= 0x40
    pieces = [
        b"\x00\x00",  # leading delimiters: flush, ignored
        good[0],
        b"noise\xff\x13\x00",  # garbage then 0x00: one dropped frame, then resync
        good[1],
        b"\x17\x22\x99",  # garbage glued to the next frame: that frame is lost with it
        good[2], good[3],
        cobs_encode(bytes(bad_crc)) + b"\x00",  # CRC-16 mismatch
        cobs_encode(bytes(flipped)) + b"\x00",  # bit flip in a CRC-32 frame
        bytes(wire_flip),  # byte flip on the wire
        b"\x05\x01\x02\x00",  # bad COBS (run past the end)
        cobs_encode(b"\x01\x02\x03") + b"\x00",  # shorter than a header
        _raw(1, 8, 1, 4, 0, 1, bytes(4), False),  # reserved byte set
        _raw(1, 8, 2, 4, 0x02, 0, bytes(4), False),  # unknown flag bit
        _raw(1, 8, 3, 5, 0, 0, bytes(4), False),  # length field disagrees with the body
        _raw(1, 8, 4, 4, 0x01, 0, bytes(4), True),  # CRC-32 on a small payload
        _raw(1, 3, 5, 300, 0, 0, bytes(300), False),  # CRC-16 on a large payload
        good[4],
        encode_frame(8, 9, struct.pack("<I", 1), version=2),  # another version: BAD_VERSION
        encode_frame(0x42, 10, b"?"),  # unknown type
        encode_frame(8, 11, b"\x01\x02\x03"),  # HEARTBEAT of 3 bytes: BAD_LENGTH
        encode_frame(1, 12, struct.pack("<BHIIB", 1, 50, 0, 0, 2) + b"\xc3\x28"),  # invalid UTF-8 board
        encode_frame(2, 13, struct.pack("<IHBbf", 1, 0, 6, -1, 1.0)),  # 0-sample window
        encode_frame(2, 14, struct.pack("<IHBbf", 1, 1, 1, -1, float("inf")) + b"\x00\x00"),  # bad scale
        good[5],
        b"\x01" * 3000 + b"\x00",  # overrun: longer than any frame
        good[6],
        b"\x01" * 2069 + b"\x00",  # exactly the buffer: not an overrun, a bad frame
        b"\x01" * 2070 + b"\x00",  # one more: an overrun
        good[7],
        _raw(1, 4, 15, 2049, 1, 0, bytes(2049), True),  # payload over 2048 (its encoding also overruns)
        *good[8:],
        b"trailing partial frame without delimiter",
    ]
    return b"".join(pieces)


def test_garbage_and_corruption_are_dropped_and_counted_alike(host: Path) -> None:
    rng = random.Random(4)
    stream = hostile_stream(rng)
    dec = FrameDecoder()
    frames = []
    i = 0
    while i < len(stream):  # random chunking on the Python side too
        n = rng.randint(1, 300)
        frames += dec.feed(stream[i:i + n])
        i += n
    expected = [expected_line(f) for f in frames]
    out = run(host, "decode", hex_lines(stream, rng))
    assert out[:-1] == expected
    assert out[-1] == py_stats(dec)
    s = dec.stats  # and the stream really exercises every counter
    assert min(s.bad_crc, s.bad_length, s.bad_cobs, s.bad_header, s.overruns, s.version_mismatches) >= 1, s
    assert any(x.startswith("BADMSG") for x in expected) and any(x.startswith("UNKNOWN") for x in expected)


def test_the_decoder_buffer_holds_exactly_the_largest_frame(host: Path) -> None:
    # 2060 body bytes (8 header + 2048 payload + 4 CRC-32) + 9 COBS code bytes: PROTOCOL.md says 2069.
    assert max_encoded_size() == 2069
    for run_len, overruns in ((2069, 0), (2070, 1)):
        stream = b"\x01" * run_len + b"\x00" + encode_frame(8, 1, bytes(4))
        dec = FrameDecoder()
        frames = dec.feed(stream)
        assert [f.seq for f in frames] == [1] and dec.stats.overruns == overruns
        assert dec.stats.dropped == 1  # 2069 bytes: one bad frame; 2070: one overrun
        assert run(host, "decode", [stream.hex()])[-1] == py_stats(dec)


# --- (d) the head-push state machine in C (test_host's device mode) -----------------------------------------

def synthetic_blob(seed: int, dim: int = 16, hidden: int = 12, classes: int = 5) -> bytes:
    from edge_agent.learning.head import HeadConfig, PersonalizationHead

    rng = np.random.default_rng(seed)
    head = PersonalizationHead.initial(HeadConfig(dim, classes, hidden), rng)
    params = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in head.params.items()}
    int8 = PersonalizationHead(head.config, params).quantized()
    return encode_head(int8, rng.normal(0, 1, dim).astype(np.float32), rng.uniform(0.5, 2, dim).astype(np.float32))


class Device:
    """test_host's device mode driven as an agent would: frames in, reply frames decoded by Python.

    Each `run()` replays the whole script so far in a fresh process (the device is deterministic)
    and returns only the output the new lines produced.
    """

    def __init__(self, exe: Path) -> None:
        self.exe, self.seq, self.seen = exe, 0, 0
        self.script: list[str] = []

    def send(self, msg: Message, *, seq: int | None = None) -> int:
        s = self.seq if seq is None else seq
        self.script.append("RX " + to_frame(msg, s).hex())
        self.seq += 1
        return s

    def raw(self, wire: bytes) -> None:
        self.script.append("RX " + wire.hex())

    def cmd(self, line: str) -> None:
        self.script.append(line)

    def run(self) -> list[object]:
        """Replies (decoded messages) and STATE / CLASS / NO_HEAD lines, in order."""
        out: list[object] = []
        dec = FrameDecoder()
        for line in run(self.exe, "device", self.script):
            if line.startswith("TX "):
                (frame,) = dec.feed(bytes.fromhex(line[3:]))
                out.append(decode_message(frame))
            else:
                out.append(line)
        assert dec.stats.dropped == 0
        new, self.seen = out[self.seen:], len(out)
        return new


def push(dev: Device, head_id: int, blob: bytes, chunk: int, *, skip: set[int] = frozenset(),  # type: ignore[assignment]
         crc: int | None = None) -> list[tuple[int, int]]:
    begin, chunks, commit = head_push(head_id, blob, chunk)
    if crc is not None:
        begin = HeadBegin(begin.head_id, begin.total_len, begin.n_chunks, crc)
    sent = [(3, dev.send(begin))]
    sent += [(4, dev.send(c)) for c in chunks if c.index not in skip]
    sent.append((5, dev.send(commit)))
    return sent


def emb_line(x: np.ndarray) -> str:
    return "PREDICT " + np.asarray(x, "<f4").tobytes().hex()


def test_head_push_commits_only_complete_correct_heads(host: Path) -> None:
    blob_a, blob_b = synthetic_blob(10), synthetic_blob(11)
    xs = np.random.default_rng(12).normal(0, 1.5, (40, 16)).astype(np.float32)
    cls_a, cls_b = decode_head(blob_a).predict(xs)[0], decode_head(blob_b).predict(xs)[0]
    assert not np.array_equal(cls_a, cls_b)  # the heads are told apart by their predictions
    dev = Device(host)

    # No head yet; HELLO and HEARTBEAT are answered.
    dev.cmd("STATE")
    dev.cmd(emb_line(xs[0]))
    dev.send(Hello(0, 0, 0, "edge-fl-agent"))
    dev.cmd("UPTIME 777")
    dev.send(Heartbeat(1))
    assert dev.run() == ["STATE head=none len=0", "NO_HEAD", DEVICE_HELLO, Heartbeat(777)]

    # A complete push: every message ACKed (chunks by index), the head switches.
    sent = push(dev, 1, blob_a, 100)
    dev.cmd("STATE")
    for x in xs:
        dev.cmd(emb_line(x))
    out = dev.run()
    n = -(-len(blob_a) // 100)
    acks = [Ack(t, s, 0, (i - 1) if t == 4 else 0) for i, (t, s) in enumerate(sent)]
    assert out[:n + 2] == acks
    assert out[n + 2] == f"STATE head=1 len={len(blob_a)}"
    assert [int(str(line).split()[1]) for line in out[n + 3:]] == list(cls_a)

    # Head 2 with chunk 1 missing: COMMIT -> HEAD_INCOMPLETE, head 1 still runs.
    push(dev, 2, blob_b, 64, skip={1})
    dev.cmd("STATE")
    dev.cmd(emb_line(xs[0]))
    out = dev.run()
    err = out[-3]
    assert isinstance(err, ErrorMsg) and err.code == ErrorCode.HEAD_INCOMPLETE
    assert out[-2] == f"STATE head=1 len={len(blob_a)}" and str(out[-1]).startswith(f"CLASS {cls_a[0]} ")
    assert all(isinstance(m, Ack) and m.ok for m in out[:-3])
    # ... the agent resends the missing chunk (and a duplicate) and commits again: now it switches.
    _, chunks, commit = head_push(2, blob_b, 64)
    s1 = dev.send(chunks[1])
    s2 = dev.send(chunks[1])
    s3 = dev.send(commit)
    dev.cmd("STATE")
    assert dev.run() == [Ack(4, s1, 0, 1), Ack(4, s2, 0, 1), Ack(5, s3, 0, 0), f"STATE head=2 len={len(blob_b)}"]

    # Head 3 whose bytes do not match head_crc32: HEAD_CRC, head 2 stays; a repeated COMMIT of head 2 is ACKed.
    push(dev, 3, blob_a, 256, crc=crc32(blob_a) ^ 1)
    dev.cmd("STATE")
    for x in xs:
        dev.cmd(emb_line(x))
    out = dev.run()
    n = -(-len(blob_a) // 256)
    assert all(isinstance(m, Ack) and m.ok for m in out[:n + 1])
    err = out[n + 1]
    assert isinstance(err, ErrorMsg) and err.code == ErrorCode.HEAD_CRC
    assert out[n + 2] == f"STATE head=2 len={len(blob_b)}"
    assert [int(str(line).split()[1]) for line in out[n + 3:]] == list(cls_b)

    # Protocol errors around a push: all answered (ten seconds later: the ERROR-reply bucket is full
    # again), none changes the head.
    dev.cmd("UPTIME 10777")
    s = dev.send(HeadCommit(2))  # repeated commit of the active head (its ACK was lost)
    dev.send(HeadChunk(99, 0, b"x"))  # no such push
    dev.send(HeadBegin(4, 100_000, 100, 0))  # larger than the device's staging buffer
    dev.send(HeadBegin(5, 10, 20, 0))  # more chunks than bytes
    dev.send(HeadBegin(6, 300, 3, crc32(bytes(300))))
    dev.send(HeadChunk(6, 0, bytes(100)))
    dev.send(HeadChunk(6, 1, bytes(99)))  # not the chunk size the first chunk fixed
    dev.send(HeadChunk(6, 7, bytes(100)))  # index out of range
    dev.send(HeadCommit(6))  # incomplete
    dev.raw(encode_frame(5, 1, struct.pack("<I", 6), version=2))
    dev.raw(encode_frame(0x42, 2, b""))
    dev.raw(encode_frame(5, 3, b"\x01"))
    dev.cmd("STATE")
    out = dev.run()
    codes = [m.code if isinstance(m, ErrorMsg) else m for m in out]
    assert codes == [
        Ack(5, s, 0, 0), ErrorCode.BAD_MESSAGE, ErrorCode.OUT_OF_MEMORY, ErrorCode.BAD_MESSAGE, Ack(3, s + 4, 0, 0),
        Ack(4, s + 5, 0, 0), ErrorCode.BAD_LENGTH, ErrorCode.BAD_MESSAGE, ErrorCode.HEAD_INCOMPLETE,
        ErrorCode.BAD_VERSION, ErrorCode.UNKNOWN_TYPE, ErrorCode.BAD_LENGTH, f"STATE head=2 len={len(blob_b)}",
    ]


def patch_f32(blob: bytes, offset: int, value: float) -> bytes:
    return blob[:offset] + struct.pack("<f", value) + blob[offset + 4:]


def test_head_values_must_be_finite_and_extreme_inputs_are_not_undefined_behaviour(tmp_path: Path) -> None:
    """The same value rules as head_blob.decode_head, and no float-to-int conversion of NaN/Inf/huge
    values: built with UBSan (float-cast-overflow included), any undefined behaviour aborts the run."""
    if subprocess.run(["gcc", "-fsanitize=undefined", "-x", "c", "-o", str(tmp_path / "probe"), "-"],
                      input="int main(void){return 0;}", capture_output=True, text=True).returncode != 0:
        pytest.skip("gcc has no UBSan runtime here")
    exe = build_host(tmp_path, "-fsanitize=undefined,float-cast-overflow,float-divide-by-zero",
                     "-fno-sanitize-recover=all", name="test_host_ubsan")
    blob = synthetic_blob(10)  # 16 -> 12 (ReLU) -> 5
    dim, std0 = 16, 8 + 4 * 16
    scales0 = 8 + 8 * dim + 5 + dim * 12
    bias1 = scales0 + 8 * 12 + 5 + 12 * 5 + 4 * 5
    bad = [patch_f32(blob, std0 + 4, 0.0), patch_f32(blob, std0, float("nan")), patch_f32(blob, std0 + 8, -2.0),
           patch_f32(blob, std0, float("inf")), patch_f32(blob, 8, float("nan")), patch_f32(blob, 12, float("-inf")),
           patch_f32(blob, scales0, 0.0), patch_f32(blob, scales0 + 4, -0.5), patch_f32(blob, scales0, float("nan")),
           patch_f32(blob, bias1, float("inf")), patch_f32(blob, bias1 + 8, float("nan"))]
    emb = np.ones(dim, "<f4").tobytes().hex()
    for b in bad:
        with pytest.raises(HeadBlobError, match="must be finite"):
            decode_head(b)
        assert run(exe, "head", ["HEAD " + b.hex(), "EMB " + emb]) == ["ERR 9"]
    # Valid heads fed embeddings no MCU should produce (a broken sensor, a backbone bug) and a head
    # with a subnormal std: every value path through the int8 quantization stays defined.
    tiny_std = patch_f32(blob, std0, 1e-45)
    assert decode_head(tiny_std).std[0] > 0
    weird = [np.full(dim, v, np.float32) for v in (np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0)]
    weird.append(np.where(np.arange(dim) % 2 == 0, np.float32(np.nan), np.float32(1.0)))
    for head in (blob, tiny_std):
        lines = ["HEAD " + head.hex()] + ["EMB " + w.astype("<f4").tobytes().hex() for w in weird]
        proc = subprocess.run([str(exe), "head"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and "runtime error" not in proc.stderr, proc.stderr
        assert len(proc.stdout.splitlines()) == len(weird)
        assert all(line.startswith("CLASS ") for line in proc.stdout.splitlines())


# --- (e) int8 head inference on real embeddings ----------------------------------------------------------

def test_c_head_inference_matches_python_on_real_embeddings(host: Path, embedded) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.data.partition import PartitionConfig
    from edge_agent.learning.head import FitConfig, HeadConfig, PersonalizationHead
    from edge_agent.data.federated import federate

    data = federate(embedded, PartitionConfig("natural", seed=0))
    x = np.concatenate([c.x_train for c in data.clients])
    y = np.concatenate([c.y_train for c in data.clients])
    rng = np.random.default_rng(0)
    head = PersonalizationHead.initial(HeadConfig(data.embedding_dim, data.num_classes), rng)
    head = head.fit(x, y, FitConfig(epochs=5), rng)
    int8 = head.quantized()
    std = embedded.standardizer
    blob = encode_head(int8, std.mean, std.std)

    raw = np.concatenate([embedded.train_emb, embedded.test_emb]).astype(np.float32)  # not standardized
    ref_classes, ref_scores = decode_head(blob).predict(raw)
    int8_classes = int8.predict(std(raw))
    assert np.mean(ref_classes == int8_classes) >= 0.999  # head_blob's reference == Int8Head

    out = run(host, "head", ["HEAD " + blob.hex()] + ["EMB " + r.astype("<f4").tobytes().hex() for r in raw])
    c_classes = np.array([int(line.split()[1]) for line in out])
    c_scores = np.array([int(line.split("=0x")[1], 16) for line in out], np.uint32).view(np.float32)
    mismatch = np.flatnonzero(c_classes != ref_classes)
    agree = 1 - len(mismatch) / len(raw)
    print(f"C vs Python head: {len(raw) - len(mismatch)}/{len(raw)} windows agree ({agree:.4%}); "
          f"C vs Int8Head: {np.mean(c_classes == int8_classes):.4%}; mismatching windows: {mismatch[:20].tolist()}")
    assert agree >= 0.99, f"{len(mismatch)} mismatches, first: {mismatch[:20].tolist()}"
    same = c_classes == ref_classes
    np.testing.assert_allclose(c_scores[same], ref_scores[same], rtol=1e-5, atol=1e-6)
    assert np.mean(c_classes == y_all(embedded)) > 1.0 / data.num_classes  # a trained head, not noise


def y_all(embedded) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.concatenate([embedded.train.y, embedded.test.y])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-vectors"]:
        VECTORS.write_text(render_vectors(), encoding="utf-8")
        print(f"wrote {VECTORS} ({len(vector_messages())} vectors)")
    else:
        print(__doc__)
