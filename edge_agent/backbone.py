"""FrozenBackbone: runs a .tflite feature extractor with whichever TFLite interpreter is installed.

The backbone never trains on the device; it turns sensor windows into embeddings once, and the small
personalization head trains on those. Both LiteRT (`ai-edge-litert`) and the older `tflite-runtime`
expose the same `Interpreter` API, so the choice is only about which wheel exists for the platform.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .backbone_plan import NoWorkingPlan, PlanKey, RunPlan, plan_run
from .codec.digest import sha256
from .fsutil import atomic_write, file_sha256
from .learning.features import EmbeddingStandardizer
from .resources import backbone_model as bundled_backbone_model

RuntimeName = Literal["auto", "ai-edge-litert", "tflite-runtime"]
_RUNTIME_MODULES: dict[str, str] = {
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
}
# The model the wheel ships (models/ in the repository), found by edge_agent/resources.py.
DEFAULT_MODEL = bundled_backbone_model()


class BackboneError(RuntimeError):
    """The backbone model cannot be loaded or run as asked."""


def load_interpreter_module(runtime: RuntimeName = "auto") -> tuple[str, Any]:
    """Return (runtime name, its `interpreter` module). `auto` prefers LiteRT, then tflite-runtime."""
    names = list(_RUNTIME_MODULES) if runtime == "auto" else [runtime]
    errors = []
    for name in names:
        if name not in _RUNTIME_MODULES:
            raise BackboneError(f"unknown TFLite runtime {name!r}; choose auto, ai-edge-litert or tflite-runtime")
        try:
            module = importlib.import_module(_RUNTIME_MODULES[name])
            return name, module
        except Exception as exc:  # ImportError, or numpy ABI errors from tflite-runtime under numpy 2
            errors.append(f"{name}: {exc}")
    raise BackboneError(
        "no TFLite interpreter could be imported (" + "; ".join(errors) + "). "
        "Install `ai-edge-litert` (x86_64/aarch64) or `tflite-runtime` with numpy<2 (pip install 'edge-fl[tflite]')."
    )


def runtime_version(runtime: str) -> str:
    """The installed version of a runtime (its wheel's: runtime names are distribution names), or "unknown"."""
    try:
        return importlib.metadata.version(runtime)
    except importlib.metadata.PackageNotFoundError:
        top = _RUNTIME_MODULES.get(runtime, runtime).split(".")[0]
        try:
            return str(getattr(importlib.import_module(top), "__version__", "unknown"))
        except ImportError:
            return "unknown"


def open_interpreter(module: Any, path: Path, *, num_threads: int, reference_kernels: bool) -> Any:
    """An interpreter of `module` (LiteRT's or tflite-runtime's) for the model, with the asked op resolver."""
    options: dict[str, Any] = {"num_threads": num_threads}
    if reference_kernels:
        options["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        return module.Interpreter(model_path=str(path), **options)
    except (ValueError, RuntimeError) as exc:
        raise BackboneError(
            f"{path}: not a loadable TFLite model ({exc}). sha256={file_sha256(path)}; "
            "replace the file or rebuild it with `python models/build_backbone.py`."
        ) from exc


# --- the arithmetic around an interpreter ---------------------------------------------------------
# One implementation for every runner of the backbone: FrozenBackbone (LiteRT / tflite-runtime, batched)
# and the emulated MCU's (tflite-micro, one window at a time, firmware_bridge/emulator/inference.py).
# Pure: no interpreter, no threads; `read_sidecar` reads the sidecar file and nothing else.


def read_sidecar(model_path: str | os.PathLike[str], metadata_path: str | os.PathLike[str] | None = None, *,
                 model_sha256: str | None = None) -> dict[str, Any]:
    """The model's sidecar JSON (``<stem>.json``, or `metadata_path`); {} when there is none.

    A sidecar naming another model's sha256 is refused: its statistics would quantize wrongly. The
    model file is hashed only when the sidecar names a sha256 and `model_sha256` is not given.
    """
    model = Path(model_path)
    path = Path(metadata_path) if metadata_path else model.with_suffix(".json")
    if not path.is_file():
        if metadata_path:
            raise BackboneError(f"backbone metadata not found: {path}")
        return {}
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BackboneError(f"{path}: invalid JSON metadata ({exc})") from exc
    want = meta.get("sha256")
    if want:
        have = model_sha256 or file_sha256(model)
        if want != have:
            raise BackboneError(
                f"{path} describes a model with sha256 {want}, but {model} has sha256 {have}: "
                "the model and its metadata do not belong together (rebuild both with models/build_backbone.py)."
            )
    return meta


@dataclass(frozen=True)
class InputStandardization:
    """Per-channel input statistics from the sidecar: windows enter the model as (x - mean) / std."""

    mean: np.ndarray  # float32, broadcast over the channels
    std: np.ndarray

    @classmethod
    def from_sidecar(cls, meta: Mapping[str, Any]) -> InputStandardization:
        stats = meta.get("input", {})
        return cls(np.asarray(stats.get("channel_mean", 0.0), np.float32),
                   np.asarray(stats.get("channel_std", 1.0), np.float32))


@dataclass(frozen=True)
class TensorQuantization:
    """A tensor's affine quantization: real = (q - zero_point) * scale; scale 0 = a float tensor."""

    scale: float
    zero_point: int
    dtype: Any  # the tensor's numpy dtype

    @classmethod
    def from_details(cls, details: Mapping[str, Any]) -> TensorQuantization:
        """From a tensor's details as LiteRT, tflite-runtime and tflite-micro all give them."""
        params = details["quantization_parameters"]
        scales, zero_points = np.asarray(params["scales"]), np.asarray(params["zero_points"])
        if scales.size > 1:
            raise BackboneError(f"tensor {details.get('name', '')!r} is quantized per channel; "
                                "the backbone's input and outputs must be quantized per tensor")
        if scales.size == 0:
            return cls(0.0, 0, details["dtype"])
        return cls(float(scales[0]), int(zero_points[0]), details["dtype"])


def quantize_windows(windows: np.ndarray, standardization: InputStandardization,
                     quant: TensorQuantization) -> np.ndarray:
    """Float windows (n, *input_shape) -> the model's input tensor: standardized, then quantized."""
    x = (np.asarray(windows, dtype=np.float32) - standardization.mean) / standardization.std
    if not quant.scale:
        unquantized: np.ndarray = x.astype(quant.dtype)
        return unquantized
    info = np.iinfo(quant.dtype)
    q: np.ndarray = np.clip(np.round(x / quant.scale) + quant.zero_point, info.min, info.max).astype(quant.dtype)
    return q


def dequantize(y: np.ndarray, quant: TensorQuantization) -> np.ndarray:
    """An output tensor -> float32 values."""
    yf = np.asarray(y).astype(np.float32)
    if not quant.scale:
        return yf
    out: np.ndarray = (yf - quant.zero_point) * quant.scale  # python scalars: stays float32
    return out


@dataclass(frozen=True)
class OutputInfo:
    index: int  # position in get_output_details()
    tensor_index: int  # -1 where the interpreter does not say (tflite-micro addresses outputs by position)
    name: str
    key: str | None  # signature output key, when the model has a signature
    shape: tuple[int, ...]


def sidecar_outputs(meta: Mapping[str, Any], shapes: Sequence[Sequence[int]]) -> list[OutputInfo]:
    """Outputs of an interpreter that names none (tflite-micro): shapes from it, names from the sidecar."""
    listed = {int(o["index"]): o for o in meta.get("outputs", []) if "index" in o}
    return [OutputInfo(i, -1, str(listed.get(i, {}).get("name", "")), listed.get(i, {}).get("key"),
                       tuple(int(d) for d in shape))
            for i, shape in enumerate(shapes)]


def choose_output(outputs: Sequence[OutputInfo], which: str | int | None, meta: Mapping[str, Any],
                  where: str = "") -> OutputInfo:
    """The embedding output: `which` (a signature key, tensor name or position), else the sidecar's
    ``feature_output``, else output 0. Where no output has a name (tflite-micro with a sidecar that lists
    no outputs) a name cannot match: the sidecar's ``embedding_dim`` picks the output of that size.
    """
    if which is None:
        which = meta.get("feature_output", 0)
    if isinstance(which, str) and not any(o.key or o.name for o in outputs) and "embedding_dim" in meta:
        dim = int(meta["embedding_dim"])
        sized = [o for o in outputs if int(np.prod(o.shape[1:])) == dim]
        if len(sized) == 1:
            return sized[0]
    for out in outputs:
        if (isinstance(which, int) and out.index == which) or which in (out.key, out.name):
            return out
    available = "; ".join(f"{o.index}: key={o.key!r} name={o.name!r} shape={list(o.shape)}" for o in outputs)
    raise BackboneError(f"{where}: no output tensor {which!r}. Available outputs: {available}")


class FrozenBackbone:
    """A frozen TFLite feature extractor.

    Parameters
    ----------
    model_path:
        The .tflite file. A sidecar ``<stem>.json`` (written by models/build_backbone.py) is read if
        present: it gives the per-channel input standardization and the default feature output.
    feature_output:
        Which output is the embedding: a signature output key or tensor name (str), or a position in
        the interpreter's output list (int). Default: the sidecar's ``feature_output``, else output 0.
    runtime:
        ``auto``, ``ai-edge-litert`` or ``tflite-runtime``.
    batch_size:
        Windows per `invoke()`. ``None`` (default): picked for this machine (see below), 64 where it works.
    reference_kernels:
        Run the builtin kernels without the default XNNPACK delegate. LiteRT uses XNNPACK for int8
        models and tflite-runtime 2.14 does not; their outputs then differ by one int8 step on ~14% of
        the values. With this flag both runtimes give bit-identical embeddings (at some speed cost).
        ``None`` (default): picked for this machine.
    plan_dir:
        Where the verdict of the runner probe is remembered (default ``~/.cache/edge-fl/backbone-runner``).

    Whatever of `batch_size` and `reference_kernels` is not given is picked by a probe in a child
    process, once per model, runtime version and machine (edge_agent/backbone_plan.py): on armv7l
    tflite-runtime 2.14 segfaults at batch > 1, with and without the default delegates. ``self.plan`` says
    what was picked and why; it is logged.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        feature_output: str | int | None = None,
        runtime: RuntimeName = "auto",
        num_threads: int = 1,
        batch_size: int | None = None,
        metadata_path: str | os.PathLike[str] | None = None,
        reference_kernels: bool | None = None,
        plan_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(model_path)
        if not self.path.is_file():
            raise BackboneError(
                f"backbone model not found: {self.path}. Expected a .tflite file. edge-fl ships its backbone at "
                f"{DEFAULT_MODEL}: if that is the one missing, reinstall edge-fl (a source checkout can rebuild it "
                "with `python models/build_backbone.py`, which needs TensorFlow); for your own model, fix the path."
            )
        if (batch_size is not None and batch_size < 1) or num_threads < 1:
            raise BackboneError(f"batch_size and num_threads must be >= 1, got {batch_size} and {num_threads}")
        self.sha256 = file_sha256(self.path)
        self.metadata = read_sidecar(self.path, metadata_path, model_sha256=self.sha256)
        self.runtime, module = load_interpreter_module(runtime)
        self.runtime_version = runtime_version(self.runtime)
        self.num_threads = num_threads
        # Fail on a model the interpreter cannot load here, before any probe child tries it.
        self._interp = open_interpreter(module, self.path, num_threads=num_threads,
                                        reference_kernels=bool(reference_kernels))
        key = PlanKey(self.sha256, self.runtime, self.runtime_version, platform.machine(), num_threads,
                      batch_size, reference_kernels)
        try:
            self.plan: RunPlan = plan_run(self.path, key, Path(plan_dir) if plan_dir else None)
        except NoWorkingPlan as exc:
            raise BackboneError(str(exc)) from exc
        self.batch_size = self.plan.batch_size
        self.reference_kernels = self.plan.reference_kernels
        if self.reference_kernels != bool(reference_kernels):
            self._interp = open_interpreter(module, self.path, num_threads=num_threads,
                                            reference_kernels=self.reference_kernels)
        (inp,) = self._interp.get_input_details()[:1] or [None]
        if inp is None:
            raise BackboneError(f"{self.path}: the model has no input tensor")
        self._input = inp
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in inp["shape"][1:])
        self.outputs = self._list_outputs()
        self.feature = choose_output(self.outputs, feature_output, self.metadata, str(self.path))
        self.embedding_dim = int(np.prod(self.feature.shape[1:]))
        # Read once: get_output_details() costs ~6 us, a fifth of embedding one window.
        self.input_quant = TensorQuantization.from_details(inp)
        self.output_quant = TensorQuantization.from_details(self._interp.get_output_details()[self.feature.index])
        self.standardization = InputStandardization.from_sidecar(self.metadata)
        self._allocated_batch = 0

    @property
    def _out_scale(self) -> float:
        """One int8 step of the embedding (kept for callers that read it under this name)."""
        return self.output_quant.scale

    def numbers_identity(self) -> dict[str, Any]:
        """Everything that changes the embeddings this backbone computes from given windows.

        The model, the interpreter (runtime and version: kernels change between releases), the op
        resolver (the XNNPACK delegate rounds differently on ~14% of the values), the CPU architecture
        (kernels differ per instruction set), the output used and how its values and the inputs are
        (de)quantized and standardized (a sidecar given with `metadata_path` may differ from the
        default one). Batch size and threads are not in it: they do not change a value (tested).
        """
        return {
            "model_sha256": self.sha256,
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "reference_kernels": self.reference_kernels,
            "machine": platform.machine(),
            "feature_output": [self.feature.index, self.feature.name, self.embedding_dim],
            "input_quantization": [self.input_quant.scale, self.input_quant.zero_point, str(self.input_quant.dtype)],
            "output_quantization": [self.output_quant.scale, self.output_quant.zero_point,
                                    str(self.output_quant.dtype)],
            "input_standardization": [self.standardization.mean.tolist(), self.standardization.std.tolist()],
        }

    def embedding_standardizer(self) -> EmbeddingStandardizer | None:
        """The embedding statistics shipped in the sidecar (fitted on the backbone subjects), if any.

        A device has no access to the backbone subjects' data; this is how it standardizes exactly as
        the simulation does.
        """
        stats = self.metadata.get("embedding_standardization")
        if not stats:
            return None
        return EmbeddingStandardizer(np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32))

    def _list_outputs(self) -> list[OutputInfo]:
        keys_by_tensor: dict[int, str] = {}
        try:
            for sig in self._interp.get_signature_list():
                runner = self._interp.get_signature_runner(sig)
                for key, detail in runner.get_output_details().items():
                    keys_by_tensor[int(detail["index"])] = key
        except Exception:  # models without signatures are fine: names and positions still work
            keys_by_tensor = {}
        return [
            OutputInfo(i, int(d["index"]), str(d["name"]), keys_by_tensor.get(int(d["index"])),
                       tuple(int(s) for s in d["shape"]))
            for i, d in enumerate(self._interp.get_output_details())
        ]

    def _ensure_batch(self, n: int) -> None:
        if n != self._allocated_batch:
            self._interp.resize_tensor_input(self._input["index"], [n, *self.input_shape])
            self._interp.allocate_tensors()
            self._allocated_batch = n

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """Embed float windows of shape (n, *input_shape); returns float32 (n, embedding_dim)."""
        x = np.asarray(windows, dtype=np.float32)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise BackboneError(
                f"{self.path}: expects windows of shape (n, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        x = quantize_windows(x, self.standardization, self.input_quant)
        result = np.empty((x.shape[0], self.embedding_dim), np.float32)
        for lo in range(0, x.shape[0], self.batch_size):
            chunk = x[lo: lo + self.batch_size]
            n = chunk.shape[0]
            if n < self.batch_size and x.shape[0] > self.batch_size:
                # Pad the tail instead of re-allocating the interpreter for one odd batch size.
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
            self._ensure_batch(chunk.shape[0])
            self._interp.set_tensor(self._input["index"], chunk)
            self._interp.invoke()
            y = self._interp.get_tensor(self.feature.tensor_index)[:n].reshape(n, -1)
            result[lo: lo + n] = dequantize(y, self.output_quant)
        return result


class EmbeddingCache:
    """Embeddings on disk, keyed by the model's sha256, everything else that changes the numbers
    (`FrozenBackbone.numbers_identity`: runtime and version, op resolver, machine, output, quantization)
    and a digest of the windows they came from.

    A different model, runtime or resolver, or different windows (other window length, stride or split),
    is a different key: embeddings computed one way are never served for a backbone that runs another.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def key(self, backbone: FrozenBackbone, windows: np.ndarray) -> str:
        h = sha256()
        h.update(np.ascontiguousarray(windows, dtype=np.float32).tobytes())
        data = h.hexdigest()
        h = sha256()
        h.update(json.dumps(backbone.numbers_identity(), sort_keys=True).encode())
        return f"{backbone.sha256[:16]}-{h.hexdigest()[:16]}-{data[:16]}"

    def embed(self, backbone: FrozenBackbone, windows: np.ndarray) -> np.ndarray:
        path = self.directory / f"{self.key(backbone, windows)}.npy"
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                # np.load returns whatever the file holds; only an array of the right shape is ours.
                if isinstance(cached, np.ndarray) and cached.shape == (len(windows), backbone.embedding_dim):
                    return cached
            except (OSError, ValueError):
                pass  # a torn or foreign file: recompute and overwrite it
        emb = backbone.embed(windows)
        atomic_write(path, lambda fh: np.save(fh, emb, allow_pickle=False), durable=False)
        return emb
