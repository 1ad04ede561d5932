"""`edge-fl bridge`: a live view of a serial link to an MCU (or the emulator).

    edge-fl bridge --port /dev/ttyACM0 [--baud 115200] [--push-head head_state.npz | head.efhd]

One line per frame as it arrives (HELLO, windows, predictions, errors), a stats line every few seconds,
exit 0 on Ctrl-C or SIGTERM, exit 2 with a clear message when the port cannot be opened.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .link import HeadPushError, LinkError, LinkOpenError, SerialLink
from .messages import Ack, ErrorMsg, Heartbeat, Hello, InferResult, Message, SensorWindow


def describe(msg: Message) -> str:
    if isinstance(msg, SensorWindow):
        label = f" label={msg.label}" if msg.label >= 0 else ""
        return f"WINDOW  id={msg.window_id} {msg.n_samples}x{msg.n_channels} scale={msg.scale:.3g}{label}"
    if isinstance(msg, InferResult):
        return f"PREDICT window={msg.window_id} class={msg.class_id} p={msg.score:.2f} head={msg.head_id:#010x}"
    if isinstance(msg, Hello):
        return (f"HELLO   board={msg.board!r} proto={msg.proto_version} rate={msg.sensor_rate_hz} Hz "
                f"free_ram={msg.free_ram} arena={msg.arena_size}")
    if isinstance(msg, ErrorMsg):
        return f"ERROR   {getattr(msg.code, 'name', msg.code)}: {msg.detail}"
    if isinstance(msg, Ack):
        return f"ACK     type={msg.acked_type} seq={msg.acked_seq} status={msg.status} index={msg.index}"
    if isinstance(msg, Heartbeat):
        return f"BEAT    uptime={msg.uptime_ms / 1000:.1f} s"
    return type(msg).__name__


def load_head_blob(path: str) -> bytes:
    """A head blob file (EFHD...) as is, or an edge-fl head state (.npz) quantized and encoded behind the
    embedding standardization the backbone's sidecar ships (the statistics the agent itself uses)."""
    raw = Path(path).read_bytes()
    if raw[:4] == b"EFHD":
        return raw
    from edge_agent.backbone import FrozenBackbone
    from edge_agent.learning.head import quantize_head
    from edge_agent.state_io import load_head_state

    from .head_blob import encode_head

    params, _meta = load_head_state(path)
    backbone = FrozenBackbone()
    std = backbone.embedding_standardizer()
    if std is None:
        raise ValueError(f"{backbone.path}: its sidecar has no embedding_standardization; rebuild it with "
                         "models/build_backbone.py")
    return encode_head(quantize_head(params), std.mean, std.std)


def main(argv: Sequence[str] | None = None, *, out: TextIO = sys.stdout, stats_every: float = 5.0) -> int:
    p = argparse.ArgumentParser(prog="edge-fl bridge", description="Live view of the serial link to an MCU.")
    p.add_argument("--port", required=True, help="pyserial URL: /dev/ttyACM0, a pty path, socket://host:port, loop://")
    p.add_argument("--baud", type=int, default=115200)
    p.add_argument("--push-head", metavar="STATE_OR_BLOB", default=None,
                   help="push this head (edge-fl head state .npz, or an EFHD blob) after the handshake")
    p.add_argument("--no-windows", action="store_true", help="do not print SENSOR_WINDOW lines")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    # SIGTERM (systemd, kill) ends the view like Ctrl-C does: a stats line, the port closed, exit 0.
    signal.signal(signal.SIGTERM, _interrupt)
    inbox: queue.Queue[Message | str] = queue.Queue()

    def on_state(up: bool, detail: str) -> None:
        inbox.put(f"LINK    {'up' if up else 'DOWN'}: {detail}")

    try:
        link = SerialLink(args.port, baudrate=args.baud, on_message=inbox.put, on_state=on_state)
    except LinkOpenError as exc:
        print(f"edge-fl bridge: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            hello = link.hello(timeout=3.0)
            print(f"connected to {args.port}: {hello.board} (protocol {hello.proto_version})", file=out, flush=True)
        except LinkError as exc:
            print(f"edge-fl bridge: {exc}", file=sys.stderr)
        if args.push_head:
            t = time.monotonic()
            try:
                blob = load_head_blob(args.push_head)
                head_id = link.push_head(blob)
                print(f"pushed head {head_id:#010x} ({len(blob)} bytes) in {time.monotonic() - t:.2f} s", file=out,
                      flush=True)
            except (HeadPushError, OSError, ValueError, RuntimeError) as exc:
                print(f"edge-fl bridge: head push failed: {exc}", file=sys.stderr)
        last = time.monotonic()
        while True:
            try:
                item = inbox.get(timeout=0.5)
                if isinstance(item, str):
                    print(item, file=out, flush=True)
                elif not (args.no_windows and isinstance(item, SensorWindow)):
                    print(describe(item), file=out, flush=True)
            except queue.Empty:
                pass
            if time.monotonic() - last >= stats_every:
                last = time.monotonic()
                print(stats_line(link), file=out, flush=True)
    except KeyboardInterrupt:
        print(stats_line(link), file=out, flush=True)
        return 0
    finally:
        link.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stats_line(link: SerialLink) -> str:
    s: dict[str, Any] = link.snapshot()
    state = ("up" if link.peer_alive else "open, device silent") if link.connected else "DOWN (reconnecting)"
    return (f"STATS   link {state}, frames rx {s['frames_rx']} tx {s['frames_tx']}, bytes rx {s['bytes_rx']}, "
            f"windows {s['windows']}, predictions {s['infer_results']}, dropped {link.decoder.stats.dropped}, "
            f"errors rx {s['errors_rx']}, reconnects {max(0, s['connects'] - 1)}, "
            f"silent drops {s['liveness_timeouts']}")


if __name__ == "__main__":
    sys.exit(main())
