"""Serial link throughput and head-push time at 115200 baud, against the emulated MCU on a pty.

The emulator paces its own writes and reads at 115200/10 = 11,520 B/s per direction (8N1, full duplex),
so the numbers are those of a UART at that rate, not of the pty. Measured with the real `SerialLink`:

1. stream: the emulator sends windows back to back (realtime=False) for --seconds; windows/s and
   bytes/s received vs the 11,520 B/s line rate (one window = 100x6 int16 = a 1,230-byte frame).
2. realtime: the sensor rate (a window every 0.5 s stride) with a committed head, windows and
   INFER_RESULTs per second and the share of the line it uses.
3. head push: our head blob (adapter 64->32 + classifier 32->7, trained on real embeddings) pushed with
   512-byte chunks (each ACKed), --pushes times, while windows stream (realtime) as they would on a device.
4. unpaced receive: how fast the link itself takes frames off a pty and off a `socket://` URL (ser2net, an
   ESP32 WiFi bridge) when nothing limits the line: 2,000 window frames written as fast as the peer can.

    .venv/bin/python bench/serial_link.py [--seconds 6] [--pushes 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib  # noqa: E402

BAUD = 115200
LINE_RATE = BAUD / 10


def head_blob() -> bytes:
    from edge_agent.backbone import FrozenBackbone
    from edge_agent.data.partition import PartitionConfig
    from edge_agent.data.watch import load_watch_dataset
    from edge_agent.learning.head import FitConfig, HeadConfig, PersonalizationHead, quantize_head
    from edge_agent.data.federated import embed_dataset, federate
    from firmware_bridge.head_blob import encode_head

    emb = embed_dataset(load_watch_dataset(), FrozenBackbone())
    data = federate(emb, PartitionConfig())
    c = data.clients[data.client_ids.index("subject-07")]
    head = PersonalizationHead.initial(HeadConfig(data.embedding_dim, data.num_classes), np.random.default_rng(0))
    head = head.fit(c.x_train, c.y_train, FitConfig(epochs=10), np.random.default_rng(1))
    return encode_head(quantize_head(head.params), emb.standardizer.mean, emb.standardizer.std)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--pushes", type=int, default=5)
    args = p.parse_args()
    from firmware_bridge.emulator import EmulatedMcu
    from firmware_bridge.link import SerialLink

    blob = head_blob()
    doc: dict = {"baudrate": BAUD, "line_rate_Bps": LINE_RATE, "head_blob_bytes": len(blob), "environment": benchlib.environment()}

    # 1. saturated stream
    with EmulatedMcu.on_pty(subject=7, realtime=False, baudrate=BAUD) as emu, SerialLink(emu.port_url, baudrate=BAUD) as link:
        link.wait_peer_hello(5.0)
        link.get_window(5.0)
        link.drain()
        b0, w0, t0 = link.stats.bytes_rx, link.stats.windows, time.monotonic()
        time.sleep(args.seconds)
        dt = time.monotonic() - t0
        nbytes, nwin = link.stats.bytes_rx - b0, link.stats.windows - w0
        doc["stream"] = {"seconds": dt, "windows": nwin, "windows_per_s": nwin / dt, "bytes_per_s": nbytes / dt,
                         "line_utilisation": nbytes / dt / LINE_RATE, "frame_bytes": nbytes / max(nwin, 1),
                         "dropped_frames": link.decoder.stats.dropped, "inference_runtime": emu.inference_runtime}

    # 2 + 3. real time with a head, and head pushes while streaming
    with EmulatedMcu.on_pty(subject=7, realtime=True, baudrate=BAUD) as emu, SerialLink(emu.port_url, baudrate=BAUD) as link:
        link.wait_peer_hello(5.0)
        times = []
        for _ in range(args.pushes):
            t = time.monotonic()
            link.push_head(blob, chunk_size=512)
            times.append(time.monotonic() - t)
        n_chunks = -(-len(blob) // 512)
        wire = sum(len(f) for f in _push_frames(blob))
        doc["head_push"] = {"chunk_size": 512, "chunks": n_chunks, "agent_to_mcu_wire_bytes": wire,
                            "seconds": benchlib.summarize(times), "samples": times,
                            "line_limited_floor_s": wire / LINE_RATE, "retries": link.stats.retries}
        link.drain()
        b0, w0, r0, t0 = link.stats.bytes_rx, link.stats.windows, link.stats.infer_results, time.monotonic()
        time.sleep(args.seconds)
        dt = time.monotonic() - t0
        doc["realtime"] = {"seconds": dt, "windows_per_s": (link.stats.windows - w0) / dt,
                           "results_per_s": (link.stats.infer_results - r0) / dt,
                           "bytes_per_s": (link.stats.bytes_rx - b0) / dt,
                           "line_utilisation": (link.stats.bytes_rx - b0) / dt / LINE_RATE}

    doc["unpaced_receive"] = {f"{kind} {reader}": unpaced_receive(kind, reader=reader)
                              for kind in ("pty", "socket") for reader in ("SerialLink", "pyserial")}

    s, r, h = doc["stream"], doc["realtime"], doc["head_push"]
    u = doc["unpaced_receive"]
    md = "\n".join([
        "# Serial link at 115200 baud (emulated MCU, pty, both directions paced at 11,520 B/s)",
        "",
        benchlib.md_table(["measurement", "value"], [
            ["saturated stream: windows/s", round(s["windows_per_s"], 2)],
            ["saturated stream: bytes/s (of 11,520)", f"{s['bytes_per_s']:.0f} ({100 * s['line_utilisation']:.1f} %)"],
            ["bytes per window frame", round(s["frame_bytes"], 1)],
            ["real time (0.5 s stride) + head: windows/s, results/s", f"{r['windows_per_s']:.2f}, {r['results_per_s']:.2f}"],
            ["real time: line use", f"{r['bytes_per_s']:.0f} B/s ({100 * r['line_utilisation']:.1f} %)"],
            [f"head push ({h['chunks']} x 512-byte chunks, {len(blob)} B blob), median s",
             f"{h['seconds']['median']:.3f} (line floor {h['line_limited_floor_s']:.3f})"],
            *[[f"unpaced receive, {kind}: MB/s, SerialLink vs pyserial ReaderThread (ratio)", _vs(u, kind)]
              for kind in ("pty", "socket")],
        ]),
        "",
        f"Inference on the emulator: {s['inference_runtime']}. Reproduce: `.venv/bin/python bench/serial_link.py`.",
        "",
        benchlib.env_summary_md(doc["environment"]),
    ])
    benchlib.write_results("serial_link", doc, md)
    print(md)
    return 0


def _vs(u: dict[str, dict[str, float]], kind: str) -> str:
    ours, theirs = u[f"{kind} SerialLink"], u[f"{kind} pyserial"]
    if not (ours["complete"] and theirs["complete"]):
        return (f"incomplete: SerialLink {ours['frames']:.0f}, ReaderThread {theirs['frames']:.0f} of 2000 frames "
                "within 120 s")
    return f"{ours['MB_per_s']:.2f} vs {theirs['MB_per_s']:.2f} ({ours['MB_per_s'] / theirs['MB_per_s']:.1f}x)"


def unpaced_receive(kind: str, frames: int = 2000, *, reader: str = "SerialLink") -> dict[str, float]:
    """Seconds to receive `frames` window frames written back to back by a peer, with the real SerialLink
    or (reader="pyserial") with pyserial's own ReaderThread feeding the same decoder: the usual choice."""
    import os
    import socket
    import threading
    import tty

    from firmware_bridge.link import SerialLink
    from firmware_bridge.messages import SensorWindow, to_frame

    rng = np.random.default_rng(0)
    frame = to_frame(SensorWindow(1, rng.integers(-2000, 2000, (100, 6)).astype(np.int16), 0.01, 3), 1)
    data = frame * frames
    conns: list[socket.socket] = []
    if kind == "pty":
        master, slave = os.openpty()
        tty.setraw(slave)
        url = os.ttyname(slave)

        def write() -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(master, view):]
    else:
        server = socket.create_server(("127.0.0.1", 0))
        url = f"socket://127.0.0.1:{server.getsockname()[1]}"

        def write() -> None:
            conn, _ = server.accept()
            conns.append(conn)
            conn.sendall(data)
    writer = threading.Thread(target=write, daemon=True)
    if kind == "socket":
        writer.start()
    if reader == "SerialLink":
        with SerialLink(url, heartbeat_s=0, liveness_s=0, announce=False) as link:
            t0 = time.monotonic()
            if kind == "pty":
                writer.start()
            while link.stats.windows < frames and time.monotonic() - t0 < 120:
                time.sleep(0.005)
            dt = time.monotonic() - t0
            got, reads = link.stats.windows, link.stats.reads
    else:
        import serial
        import serial.threaded

        from firmware_bridge.framing import FrameDecoder
        from firmware_bridge.messages import decode_message

        counted = {"frames": 0, "reads": 0}

        class Count(serial.threaded.Protocol):  # type: ignore[misc]
            decoder = FrameDecoder()

            def data_received(self, chunk: bytes) -> None:
                counted["reads"] += 1
                for frame in self.decoder.feed(chunk):  # the same work per frame as the link: decode the message
                    decode_message(frame)
                    counted["frames"] += 1

        port = serial.serial_for_url(url, timeout=0.05)
        with serial.threaded.ReaderThread(port, Count):
            t0 = time.monotonic()
            if kind == "pty":
                writer.start()
            while counted["frames"] < frames and time.monotonic() - t0 < 120:
                time.sleep(0.005)
            dt = time.monotonic() - t0
        got, reads = counted["frames"], counted["reads"]
    writer.join(5)
    if kind == "pty":
        os.close(master)
        os.close(slave)
    else:
        for c in conns:
            c.close()
        server.close()
    return {"frames": got, "complete": got == frames, "seconds": dt, "MB_per_s": len(frame) * got / dt / 1e6,
            "reads": reads}


def _push_frames(blob: bytes) -> list[bytes]:
    from firmware_bridge.messages import head_push, to_frame

    begin, chunks, commit = head_push(1, blob, 512)
    return [to_frame(m, i) for i, m in enumerate([begin, *chunks, commit])]


if __name__ == "__main__":
    sys.exit(main())
