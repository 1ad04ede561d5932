"""The backbone as the emulated MCU runs it: one window at a time, under tflite-micro when it imports.

The arithmetic around the interpreter (the sidecar's input statistics, quantizing a window,
dequantizing the embedding, which output is the embedding) is edge_agent.backbone's, the same code
FrozenBackbone runs; only the interpreter differs. Without tflite-micro it is FrozenBackbone itself,
on LiteRT's builtin kernels.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.backbone import (
    DEFAULT_MODEL,
    FrozenBackbone,
    InputStandardization,
    TensorQuantization,
    choose_output,
    dequantize,
    quantize_windows,
    read_sidecar,
    sidecar_outputs,
)

log = logging.getLogger("firmware_bridge.emulator")

DEFAULT_BACKBONE = DEFAULT_MODEL  # models/backbone_int8.tflite
ARENA_SIZE = 64 * 1024  # tflite-micro tensor arena (the backbone needs ~30 KiB; measured with print_allocations)


class _TfliteMicro:
    """The backbone under tflite-micro: one interpreter, one window per invoke."""

    def __init__(self, path: Path, arena_size: int) -> None:
        from tflite_micro import runtime as tfm_runtime

        meta = read_sidecar(path)
        self._interp: Any = tfm_runtime.Interpreter.from_file(str(path), arena_size=arena_size)
        inp = self._interp.get_input_details(0)
        self.input_shape = tuple(int(d) for d in inp["shape"])
        self.input_quant = TensorQuantization.from_details(inp)
        self.standardization = InputStandardization.from_sidecar(meta)
        details: list[dict[str, Any]] = []
        while True:  # tflite-micro does not say how many outputs there are
            try:
                details.append(self._interp.get_output_details(len(details)))
            except IndexError:
                break
        self.feature = choose_output(sidecar_outputs(meta, [d["shape"] for d in details]), None, meta, str(path))
        self.output_quant = TensorQuantization.from_details(details[self.feature.index])

    def embed(self, window: np.ndarray, lock: threading.Lock) -> np.ndarray:
        x = quantize_windows(np.asarray(window)[None], self.standardization, self.input_quant)
        with lock:
            self._interp.set_input(x.reshape(self.input_shape), 0)
            self._interp.invoke()
            y = np.array(self._interp.get_output(self.feature.index))
        return dequantize(y.reshape(1, -1), self.output_quant)


class McuBackbone:
    """int8 backbone as an MCU runs it: one window at a time; tflite-micro when it imports.

    One interpreter, one input and one output buffer: `embed` is serialized by a lock, because the
    stream thread and a caller (tests, benches) may embed at the same time. Without it, a thread
    switch between set_input, invoke and get_output hands one caller the other's window (measured:
    154 of 23994 embeddings wrong while the stream ran and two busy loops loaded the 2 cores).
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_BACKBONE, runtime: str = "auto",
                 arena_size: int = ARENA_SIZE) -> None:
        model = Path(path)
        self._tfm: _TfliteMicro | None = None
        self._fallback: FrozenBackbone | None = None
        self._lock = threading.Lock()  # set_input -> invoke -> get_output must not interleave
        errors = []
        if runtime in ("auto", "tflite-micro"):
            try:
                self._tfm = _TfliteMicro(model, arena_size)
            except Exception as exc:  # not installed, or no wheel for this platform
                errors.append(f"tflite-micro: {exc}")
                if runtime == "tflite-micro":
                    raise
        if self._tfm is not None:
            self.runtime = "tflite-micro"
            self.output_quant, feature = self._tfm.output_quant, self._tfm.feature
        else:
            # The builtin kernels without XNNPACK: closest to an MCU's, yet not bit-identical to tflite-micro
            # (the last FULLY_CONNECTED requantizes ties differently: 1 LSB on ~0.07 % of the values).
            self._fallback = FrozenBackbone(model, reference_kernels=True, batch_size=1)
            self.runtime = f"{self._fallback.runtime} (reference kernels)"
            self.output_quant, feature = self._fallback.output_quant, self._fallback.feature
            log.info("tflite-micro unavailable (%s); using %s", "; ".join(errors), self.runtime)
        self.arena_size = arena_size if self._tfm is not None else 0
        self.embedding_dim = int(np.prod(feature.shape[1:]))  # a head for another width is refused

    @property
    def embedding_lsb(self) -> float:
        """One step of the int8 embedding (its output quantization scale), in embedding units."""
        return self.output_quant.scale

    def embed(self, window: np.ndarray) -> np.ndarray:
        """One float window (n_samples, channels) -> float32 (1, dim), quantized exactly as FrozenBackbone does."""
        if self._tfm is not None:
            return self._tfm.embed(window, self._lock)
        assert self._fallback is not None
        with self._lock:
            return np.asarray(self._fallback.embed(np.asarray(window)[None]))
