"""Coverage-guided fuzzing of the serial decoder (atheris; not collected by pytest).

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_framing.py -max_total_time=60

Invariants: FrameDecoder.feed never raises, its buffer stays bounded, every frame it returns
re-encodes to a frame with a valid CRC, and decode_message raises nothing but MessageError.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

# Run as a script from anywhere: the repo root holds firmware_bridge (the editable install may predate it).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from firmware_bridge.framing import FrameDecoder, decode_body, encode_body, max_encoded_size
    from firmware_bridge.messages import MessageError, decode_message, encode_message


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    decoder = FrameDecoder()
    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 512))
        for frame in decoder.feed(chunk):
            assert decode_body(encode_body(frame.type, frame.seq, frame.payload, version=frame.version)) == frame
            try:
                msg = decode_message(frame)
            except MessageError:
                continue
            assert encode_message(msg) == (frame.type, frame.payload)
        assert decoder.buffered <= max_encoded_size()


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
