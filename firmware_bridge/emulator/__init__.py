"""An emulated MCU that speaks PROTOCOL.md: the other end of the link for tests, benches and demos.

It does what the firmware does: answers HELLO, streams a subject's real IMU windows (int16 + scale) at
the sensor rate, receives head pushes into a staging buffer (ACK per chunk, atomic commit only when
complete and CRC-32-correct), and for every window streamed after a commit runs backbone + head and
sends INFER_RESULT. The backbone runs under TensorFlow Lite Micro (`tflite-micro`) when it imports,
as on an MCU; otherwise under the regular interpreter with reference kernels. `inference_runtime` (and
the HELLO board string suffix) says which.

Its rules are the C firmware's, checked against the same conformance scenarios
(firmware_bridge/firmware/conformance/mcu.txt): head-push staging and chunk sizes, head validation, and
the ERROR-reply rule of `error_replies` (an ERROR is never answered; ERROR replies are rate-limited).
`freeze()` / `thaw()` make the firmware hang and resume with the port left open.

Ports: `EmulatedMcu.on_pty()` (a pty pair; agents open `port_url`, a stable symlink to the slave, so
`unplug()`/`replug()` can swap the pty under it), `EmulatedMcu.on_socket(port)` (serves
`socket://127.0.0.1:PORT`, one agent at a time), or an fd / pyserial URL given to the constructor.

One module per job:

- `ports`: the byte pipes (fd, pty behind a stable symlink, TCP server, pyserial) and UART pacing;
- `staging`: the head-push receiver, pure (messages in, replies and the committed head out), the twin of
  the C firmware's `edgefl_head_rx_*`;
- `stream`: the sensor: which windows, their ids and labels, when;
- `inference`: the backbone as the MCU runs it (tflite-micro), on edge_agent.backbone's arithmetic;
- `runner`: `EmulatedMcu`, the tasks that run all of it (threads, sessions, ERROR replies, freeze, unplug);
- `__main__`: `python -m firmware_bridge.emulator`.

    python -m firmware_bridge.emulator --pty            # prints the pty path, runs until killed
    python -m firmware_bridge.emulator --socket 5555    # serves socket://127.0.0.1:5555
"""

from __future__ import annotations

from .inference import ARENA_SIZE, DEFAULT_BACKBONE, McuBackbone
from .runner import BOARD, TOTAL_RAM, EmulatedMcu, EmulatorStats
from .staging import MAX_HEAD_BYTES, HeadReceiver, HeadReply

__all__ = ["EmulatedMcu", "EmulatorStats", "HeadReceiver", "HeadReply", "McuBackbone", "BOARD", "TOTAL_RAM",
           "ARENA_SIZE", "MAX_HEAD_BYTES", "DEFAULT_BACKBONE"]
