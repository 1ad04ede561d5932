"""`python -m firmware_bridge.emulator`: an emulated MCU on a pty or a TCP port, until killed."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from .runner import EmulatedMcu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m firmware_bridge.emulator", description="An emulated edge-fl MCU.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true", help="create a pty pair and print the path to open")
    where.add_argument("--socket", type=int, metavar="PORT", help="serve socket://127.0.0.1:PORT")
    p.add_argument("--subject", type=int, default=7)
    p.add_argument("--speedup", type=float, default=1.0, help="stream windows this many times faster than real time")
    p.add_argument("--baud", type=int, default=None, help="pace the emulator's bytes at BAUD/10 B/s")
    p.add_argument("--unlabelled", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    kw: dict[str, Any] = dict(subject=args.subject, speedup=args.speedup, baudrate=args.baud,
                              labelled=not args.unlabelled)
    emu = EmulatedMcu.on_pty(**kw) if args.pty else EmulatedMcu.on_socket(args.socket, **kw)
    print(emu.port_url, flush=True)
    print(f"inference: {emu.inference_runtime}", file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
