"""FrozenBackbone: runs a .tflite feature extractor with whichever TFLite interpreter is installed.

The backbone never trains on the device; it turns sensor windows into embeddings once, and the small
personalization head trains on those. Both LiteRT (`ai-edge-litert`) and the older `tflite-runtime`
expose the same `Interpreter` API, so the choice is only about which wheel exists for the platform.

Any .tflite model with one input can be the backbone (docs/backbones.md): any of its tensors can be
the features, intermediate ones included; a model built for batch size 1 runs window by window; a model
that keeps state between invocations (streaming variables) runs every window from its initial state.
`python -m edge_agent.backbone MODEL` lists what a model offers.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .backbone_plan import DEFAULT_BATCH_SIZE, NoWorkingPlan, PlanKey, RunPlan, plan_run, probe_inputs
from .codec.digest import sha256
from .fsutil import atomic_write, file_sha256
from .learning.features import EmbeddingStandardizer
from .resources import backbone_model as bundled_backbone_model

log = logging.getLogger("edge_fl.backbone")

RuntimeName = Literal["auto", "ai-edge-litert", "tflite-runtime"]
_RUNTIME_MODULES: dict[str, str] = {
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
}
# The model the wheel ships (models/ in the repository), found by edge_agent/resources.py.
DEFAULT_MODEL = bundled_backbone_model()
SIDECAR_FORMAT = "edge-fl-backbone/1"  # what models/build_backbone.py writes; other JSON beside a model is not ours
TENSOR_PREFIX = "tensor:"  # feature_output "tensor:N": the tensor with index N (not output position N)
# An intermediate feature tensor needs every tensor kept after invoke (experimental_preserve_all_tensors):
# memory then grows with the batch times all activations of one window. The batch is capped to keep this
# under the budget (measured: openWakeWord's embedding model keeps ~7.8 MiB a window, 500 MiB at batch 64).
PRESERVE_BUDGET_BYTES = 64 << 20
_STATE_OPS = frozenset({"ASSIGN_VARIABLE"})  # writes a resource variable: the next invoke sees another state


class BackboneError(RuntimeError):
    """The backbone model cannot be loaded or run as asked."""


def is_bundled(path: str | os.PathLike[str]) -> bool:
    """Is `path` in the directory of the backbones edge-fl ships (models/ of a checkout, or of the wheel)?"""
    try:
        return Path(path).resolve().parent == DEFAULT_MODEL.resolve().parent
    except OSError:
        return False


def rebuild_hint(path: str | os.PathLike[str]) -> str:
    """How to get a good copy of a model: only a bundled backbone is made by models/build_backbone.py."""
    if is_bundled(path):
        return ("reinstall edge-fl (a source checkout can rebuild it with `python models/build_backbone.py`, "
                "which needs TensorFlow)")
    return "replace it with a good copy of the model (docs/backbones.md)"


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


def open_interpreter(module: Any, path: Path, *, num_threads: int, reference_kernels: bool,
                     preserve_all_tensors: bool = False, model_content: bytes | None = None) -> Any:
    """An interpreter of `module` (LiteRT's or tflite-runtime's) for the model, with the asked op resolver.

    `preserve_all_tensors` keeps every tensor readable after invoke (an intermediate feature tensor needs
    it; see PRESERVE_BUDGET_BYTES). `model_content`: the model's bytes, read once, for an interpreter opened
    per window (a stateful model); `path` then only names it in errors.
    """
    options: dict[str, Any] = {"num_threads": num_threads}
    if reference_kernels:
        options["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if preserve_all_tensors:
        options["experimental_preserve_all_tensors"] = True
    source: dict[str, Any] = {"model_content": model_content} if model_content is not None \
        else {"model_path": str(path)}
    try:
        with warnings.catch_warnings():
            # LiteRT warns at every interpreter that preserving tensors costs memory: measured, and capped.
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
            return module.Interpreter(**source, **options)
    except (ValueError, RuntimeError) as exc:
        raise BackboneError(
            f"{path}: not a loadable TFLite model ({exc}). sha256={file_sha256(path)}; {rebuild_hint(path)}."
        ) from exc


# --- the arithmetic around an interpreter ---------------------------------------------------------
# One implementation for every runner of the backbone: FrozenBackbone (LiteRT / tflite-runtime, batched)
# and the emulated MCU's (tflite-micro, one window at a time, firmware_bridge/emulator/inference.py).
# Pure: no interpreter, no threads; `read_sidecar` reads the sidecar file and nothing else.


def read_sidecar(model_path: str | os.PathLike[str], metadata_path: str | os.PathLike[str] | None = None, *,
                 model_sha256: str | None = None) -> dict[str, Any]:
    """The model's sidecar JSON (``<stem>.json``, or `metadata_path`); {} when there is none.

    A sidecar naming another model's sha256 is refused: its statistics would quantize wrongly. The
    model file is hashed only when the sidecar names a sha256 and `model_sha256` is not given. A
    ``<stem>.json`` without ``"format": "edge-fl-backbone/1"`` belongs to another tool (pymicro-wakeword
    ships one beside each model) and is ignored; one named by `metadata_path` must have it.
    """
    model = Path(model_path)
    path = Path(metadata_path) if metadata_path else model.with_suffix(".json")
    if not path.is_file():
        if metadata_path:
            raise BackboneError(f"{model}: its backbone metadata {path} does not exist")
        return {}
    try:
        meta: Any = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BackboneError(f"{path} (the sidecar of {model}): invalid JSON metadata ({exc}); "
                            f"fix or remove it") from exc
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        if metadata_path:
            raise BackboneError(f"{path}: not backbone metadata for {model} (it has no \"format\": "
                                f"\"{SIDECAR_FORMAT}\"; docs/backbones.md says what it holds)")
        log.info("%s: not an edge-fl sidecar (no \"format\": %r), ignored", path, SIDECAR_FORMAT)
        return {}
    want = meta.get("sha256")
    if want:
        have = model_sha256 or file_sha256(model)
        if want != have:
            fix = "rebuild both with `python models/build_backbone.py`" if is_bundled(model) else \
                "fix the sidecar's sha256 (or remove the key) if the model is the one it describes"
            raise BackboneError(
                f"{path} describes a model with sha256 {want}, but {model} has sha256 {have}: "
                f"the model and its metadata do not belong together ({fix})."
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
    def from_details(cls, details: Mapping[str, Any], where: str = "") -> TensorQuantization:
        """From a tensor's details as LiteRT, tflite-runtime and tflite-micro all give them."""
        params = details["quantization_parameters"]
        scales, zero_points = np.asarray(params["scales"]), np.asarray(params["zero_points"])
        if scales.size > 1:
            raise BackboneError(f"{where + ': ' if where else ''}tensor {details.get('name', '')!r} is quantized "
                                "per channel; the backbone's input and feature tensor must be quantized per tensor")
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
    """The feature tensor: one of the model's outputs, or (index -1) an intermediate tensor."""

    index: int  # position in get_output_details(); -1 for a tensor that is not an output
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


def _describe_outputs(outputs: Sequence[OutputInfo]) -> str:
    return "; ".join(f"{o.index}: key={o.key!r} name={o.name!r} shape={list(o.shape)}"
                     + (f" tensor:{o.tensor_index}" if o.tensor_index >= 0 else "") for o in outputs)


def choose_output(outputs: Sequence[OutputInfo], which: str | int | None, meta: Mapping[str, Any],
                  where: str = "") -> OutputInfo:
    """The embedding output: `which` (a signature key, tensor name or position), else the sidecar's
    ``feature_output``, else output 0. Where no output has a name (tflite-micro with a sidecar that lists
    no outputs) a name cannot match: the sidecar's ``embedding_dim`` picks the output of that size.
    Only outputs: FrozenBackbone also finds intermediate tensors (`find_feature_tensor`).
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
    raise BackboneError(f"{where}: no output tensor {which!r}. Available outputs: {_describe_outputs(outputs)}")


# --- which tensor, and what kind of model --------------------------------------------------------------
# Tensor details and op details as both runtimes give them (`_get_ops_details` is private in both, present
# in LiteRT 2.x and tflite-runtime 2.14: where it is missing, the checks that need it are skipped).


def ops_details(interp: Any) -> list[dict[str, Any]] | None:
    """The interpreter's ops (name, input and output tensor indices), or None where it cannot say."""
    get = getattr(interp, "_get_ops_details", None)
    if get is None:
        return None
    try:
        return list(get())
    except Exception:  # a runtime whose private API changed: behave as if it did not exist
        return None


def _feature_problem(detail: Mapping[str, Any], produced: set[int] | None, input_index: int) -> str | None:
    """Why a tensor cannot be the features, or None: it must be computed from the window, one row a window."""
    index, shape = int(detail["index"]), [int(d) for d in detail["shape"]]
    if index == input_index:
        return "it is the model's input"
    if produced is not None and index not in produced:
        return "it is a constant (weights or a shape), not computed from the window"
    if not np.issubdtype(np.dtype(detail["dtype"]), np.number):
        return f"its type is {np.dtype(detail['dtype']).name}, not a number"
    if len(shape) < 1 or shape[0] != 1:
        return f"its shape {shape} has no batch dimension first (1 at load)"
    return None


def find_feature_tensor(interp: Any, outputs: Sequence[OutputInfo], which: str | int | None,
                        meta: Mapping[str, Any], where: str) -> OutputInfo:
    """The feature tensor `which` names: an output (as `choose_output`), or any tensor by name or index.

    An int is a position among the outputs (as it always was); ``"tensor:N"`` is the tensor with index N,
    the number `get_tensor(N)` takes and Netron shows as the tensor's location; a string is a signature
    output key, an output name, or else the name of any tensor of the model. An output is always returned
    as the output (read without keeping the other tensors); an intermediate tensor comes back with index -1.
    """
    if which is None:
        which = meta.get("feature_output", 0)
    details = {int(d["index"]): d for d in interp.get_tensor_details()}
    if isinstance(which, str) and which.startswith(TENSOR_PREFIX):
        number = which[len(TENSOR_PREFIX):].strip()
        if not number.isdigit() or int(number) not in details:
            raise BackboneError(f"{where}: no tensor {which!r}: the model's tensors are tensor:0 to "
                                f"tensor:{max(details)} (list them with `python -m edge_agent.backbone {where}`)")
        candidates = [int(number)]
    else:
        try:
            return choose_output(outputs, which, meta, where)
        except BackboneError as exc:
            if not isinstance(which, str):
                raise BackboneError(f"{exc}. An integer is a position among the {len(outputs)} outputs; write "
                                    f"\"{TENSOR_PREFIX}{which}\" for the tensor with index {which}") from None
            candidates = [i for i, d in details.items() if d["name"] == which]
            if not candidates:
                raise BackboneError(f"{exc}; nor is {which!r} the name of any other tensor of the model (list them "
                                    f"with `python -m edge_agent.backbone {where}`)") from None
            if len(candidates) > 1:
                raise BackboneError(f"{where}: {len(candidates)} tensors are named {which!r} (tensor:"
                                    f"{', tensor:'.join(map(str, candidates))}): name one by its index") from None
    (index,) = candidates
    for out in outputs:
        if out.tensor_index == index:
            return out
    ops = ops_details(interp)
    produced = None if ops is None else {int(t) for op in ops for t in op["outputs"]}
    problem = _feature_problem(details[index], produced, int(interp.get_input_details()[0]["index"]))
    if problem:
        raise BackboneError(f"{where}: tensor:{index} ({details[index]['name']!r}) cannot be the features: {problem}")
    d = details[index]
    return OutputInfo(-1, index, str(d["name"]), None, tuple(int(s) for s in d["shape"]))


def state_variables(interp: Any) -> list[str] | None:
    """The resource variables the model writes at each invoke (names of their VAR_HANDLE tensors), or
    None where the runtime does not list ops. A model that writes a variable (a streaming model keeping
    its last frames, say) computes a window's features from it and from every window before."""
    ops = ops_details(interp)
    if ops is None:
        return None
    if not any(op["op_name"] in _STATE_OPS for op in ops):
        return []
    details = {int(d["index"]): d for d in interp.get_tensor_details()}
    handles = [int(t) for op in ops if op["op_name"] == "VAR_HANDLE" for t in op["outputs"]]
    return sorted({str(details[t]["name"]) for t in handles if t in details}) or ["(unnamed variables)"]


def changes_with_history(interp: Any, input_details: Mapping[str, Any], tensors: Sequence[int] | None = None) -> bool:
    """Does window A leave other values in `tensors` (default: every numeric tensor it can read) after window
    B than before it? Finds state that no op names (classic variable tensors: LSTM and SVDF state). Opened
    with every tensor kept, the interpreter shows state that the outputs hide: microWakeWord's probability
    stays the same for the random windows used here, its variable reads do not. `interp` is allocated
    for one window; every plan the probe accepts ran batch 1 too, so this invoke is as safe as embedding."""
    a, b = (probe_inputs(dict(input_details), 1, seed) for seed in (0, 1))
    if tensors is None:
        tensors = [int(d["index"]) for d in interp.get_tensor_details() if np.dtype(d["dtype"]) != np.object_]

    def run(x: np.ndarray) -> dict[int, np.ndarray]:
        interp.set_tensor(input_details["index"], x)
        interp.invoke()
        values = {}
        for t in tensors:
            try:
                values[t] = np.array(interp.get_tensor(t))
            except ValueError:  # not readable (a delegate's, or freed): it cannot show anything
                continue
        return values

    first = run(a)
    run(b)
    again = run(a)
    return any(t not in again or not np.array_equal(v, again[t], equal_nan=True) for t, v in first.items())


def fixed_batch(input_details: Mapping[str, Any]) -> int | None:
    """The input's batch size when the model fixes it (its shape signature says so), else None (-1: any)."""
    signature = input_details.get("shape_signature")
    if signature is None or len(signature) == 0 or int(signature[0]) < 0:
        return None
    return int(signature[0])


def preserved_bytes_per_window(interp: Any) -> int:
    """What keeping every tensor costs per window: the tensors ops compute, at batch 1 (weights are not
    per window). Without op details: every tensor with a leading dimension of 1."""
    ops = ops_details(interp)
    produced = None if ops is None else {int(t) for op in ops for t in op["outputs"]}
    total = 0
    for d in interp.get_tensor_details():
        shape = [int(s) for s in d["shape"]]
        if np.dtype(d["dtype"]) == np.object_ or not shape:
            continue
        if (produced is not None and int(d["index"]) in produced) or (produced is None and shape[0] == 1):
            total += int(np.prod(shape)) * np.dtype(d["dtype"]).itemsize
    return total


class FrozenBackbone:
    """A frozen TFLite feature extractor.

    Parameters
    ----------
    model_path:
        The .tflite file: the bundled backbone, or any model with one input (docs/backbones.md). A
        sidecar ``<stem>.json`` (written by models/build_backbone.py, or by hand) is read if present: it
        gives the per-channel input standardization and the default feature tensor.
    feature_output:
        Which tensor is the embedding. An int is a position in the interpreter's output list (as before);
        a str is a signature output key, an output name, or the name of any other tensor of the model;
        ``"tensor:N"`` is the tensor with index N (`get_tensor(N)`, Netron's "location"), output or not.
        Default: the sidecar's ``feature_output``, else output 0. A tensor that is not an output is read
        with every tensor kept after invoke (``experimental_preserve_all_tensors``, both runtimes): more
        memory per window in a batch, so the batch is capped (PRESERVE_BUDGET_BYTES).
    runtime:
        ``auto``, ``ai-edge-litert`` or ``tflite-runtime``.
    batch_size:
        Windows per `invoke()`. ``None`` (default): picked for this machine (see below), 64 where it works.
        A model whose input batch dimension is fixed at 1, or that keeps state, always runs window by window.
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

    A model that keeps state between invocations (it writes resource variables, or gives another result
    for the same window once it has seen others) would embed a window differently depending on the windows
    before it: every window then runs from the model's initial state, in an interpreter opened for it
    (``reset_all_variables()`` does not reset resource variables: measured on both runtimes). A model whose
    features still differ for the same window is refused.
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
            raise BackboneError(_missing_model_message(self.path))
        if (batch_size is not None and batch_size < 1) or num_threads < 1:
            raise BackboneError(f"batch_size and num_threads must be >= 1, got {batch_size} and {num_threads}")
        self.sha256 = file_sha256(self.path)
        self.metadata = read_sidecar(self.path, metadata_path, model_sha256=self.sha256)
        self.runtime, self._module = load_interpreter_module(runtime)
        self.runtime_version = runtime_version(self.runtime)
        self.num_threads = num_threads
        self._model_bytes: bytes | None = None  # set for a stateful model: an interpreter is opened per window
        # Fail on a model the interpreter cannot load here, before any probe child tries it.
        interp = self._open(bool(reference_kernels), preserve=False)
        self._input = self._single_input(interp)
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in self._input["shape"][1:])
        self.outputs = self._list_outputs(interp)
        self.feature = find_feature_tensor(interp, self.outputs, feature_output, self.metadata, str(self.path))
        self.embedding_dim = int(np.prod(self.feature.shape[1:]))
        self.preserves_all_tensors = self.feature.index < 0
        self.state_variables: tuple[str, ...] = tuple(state_variables(interp) or ())
        limit, self.batch_limit = self._batch_limit(interp)
        if batch_size is not None and limit == 1 and batch_size > 1:
            log.info("%s: batch_size %d ignored: %s", self.path.name, batch_size, self.batch_limit)
            batch_size = 1
        key = PlanKey(self.sha256, self.runtime, self.runtime_version, platform.machine(), num_threads,
                      batch_size, reference_kernels, max_batch_size=limit,
                      preserve_all_tensors=self.preserves_all_tensors,
                      feature_tensor=self.feature.tensor_index if self.preserves_all_tensors else None)
        try:
            self.plan: RunPlan = plan_run(self.path, key, Path(plan_dir) if plan_dir else None)
        except NoWorkingPlan as exc:
            raise BackboneError(str(exc)) from exc
        self.batch_size = self.plan.batch_size
        self.reference_kernels = self.plan.reference_kernels
        if self.batch_limit:
            log.info("%s: at most %d window(s) an invoke: %s", self.path.name, limit, self.batch_limit)
        if self.reference_kernels != bool(reference_kernels) or self.preserves_all_tensors:
            interp = self._open(self.reference_kernels, preserve=self.preserves_all_tensors)
        self._interp = interp
        self._allocate(None)
        details = {int(d["index"]): d for d in interp.get_tensor_details()}
        # Read once: tensor details cost microseconds a call, a fifth of embedding one window.
        self.input_quant = TensorQuantization.from_details(self._input, str(self.path))
        self.output_quant = TensorQuantization.from_details(details[self.feature.tensor_index], str(self.path))
        self.standardization = InputStandardization.from_sidecar(self.metadata)
        self._check_state()

    # --- loading ------------------------------------------------------------------------------------

    def _open(self, reference_kernels: bool, *, preserve: bool) -> Any:
        return open_interpreter(self._module, self.path, num_threads=self.num_threads,
                                reference_kernels=reference_kernels, preserve_all_tensors=preserve,
                                model_content=self._model_bytes)

    def _single_input(self, interp: Any) -> dict[str, Any]:
        """The model's one input, checked: a backbone takes one tensor of windows of a fixed shape."""
        inputs = interp.get_input_details()
        if len(inputs) != 1:
            names = ", ".join(repr(str(d["name"])) for d in inputs)
            raise BackboneError(f"{self.path}: the model has {len(inputs)} input tensors ({names or 'none'}); "
                                "a backbone takes exactly one, the windows")
        inp: dict[str, Any] = inputs[0]
        shape = [int(d) for d in inp["shape"]]
        signature = [int(d) for d in inp.get("shape_signature", shape)]
        if len(shape) < 2:
            raise BackboneError(f"{self.path}: the input {inp['name']!r} has shape {shape}: a backbone's input "
                                "is (batch, *window shape)")
        if any(d < 0 for d in signature[1:]):
            raise BackboneError(f"{self.path}: the input {inp['name']!r} has dynamic dimensions (shape signature "
                                f"{signature}): edge-fl embeds windows of one fixed shape; re-export the model "
                                "with that shape")
        batch = fixed_batch(inp)
        if batch is not None and batch != 1:
            raise BackboneError(f"{self.path}: the input's batch dimension is fixed at {batch} (shape signature "
                                f"{signature}): edge-fl runs a backbone one window (batch 1) or any number of "
                                "windows (batch -1) at a time; re-export the model with either")
        return inp

    def _list_outputs(self, interp: Any) -> list[OutputInfo]:
        keys_by_tensor: dict[int, str] = {}
        try:
            for sig in interp.get_signature_list():
                runner = interp.get_signature_runner(sig)
                for key, detail in runner.get_output_details().items():
                    keys_by_tensor[int(detail["index"])] = key
        except Exception:  # models without signatures are fine: names and positions still work
            keys_by_tensor = {}
        return [
            OutputInfo(i, int(d["index"]), str(d["name"]), keys_by_tensor.get(int(d["index"])),
                       tuple(int(s) for s in d["shape"]))
            for i, d in enumerate(interp.get_output_details())
        ]

    def _batch_limit(self, interp: Any) -> tuple[int | None, str]:
        """The largest batch this model may run at (None: no limit) and why."""
        if fixed_batch(self._input) == 1:
            signature = [int(d) for d in self._input["shape_signature"]]
            return 1, f"the model's input batch dimension is fixed at 1 (shape signature {signature})"
        if self.state_variables:
            return 1, f"the model keeps state in variables ({', '.join(self.state_variables)})"
        if self.preserves_all_tensors:
            per_window = max(1, preserved_bytes_per_window(interp))
            limit = max(1, min(DEFAULT_BATCH_SIZE, PRESERVE_BUDGET_BYTES // per_window))
            return limit, (f"the feature tensor is not an output: every tensor is kept, "
                           f"{per_window / 2**20:.2f} MiB a window")
        return None, ""

    def _allocate(self, n: int | None) -> None:
        """Allocate the tensors for n windows an invoke (None: at the input shape the model declares)."""
        try:
            if n is not None:
                self._interp.resize_tensor_input(self._input["index"], [n, *self.input_shape])
            self._interp.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise BackboneError(f"{self.path}: the interpreter cannot run the model on {n or 1} window(s) at a "
                                f"time ({exc}). Leave batch_size unset: the probe finds one that works") from exc
        self._allocated_batch = n if n is not None else int(self._input["shape"][0])

    def _check_state(self) -> None:
        """Find state the op list did not show (classic variable tensors), then make sure a fresh interpreter
        gives the same features for the same window: else no reset can make the features a function of it."""
        if not self.state_variables and self._changes_with_history():
            self.state_variables = ("(unnamed: the same window gave other outputs after another one)",)
        if not self.state_variables:
            return
        self.batch_size = 1
        self.batch_limit = self.batch_limit or f"the model keeps state ({', '.join(self.state_variables)})"
        self._model_bytes = self.path.read_bytes()
        window = probe_inputs(self._input, 1, 0)
        if not np.array_equal(self._embed_fresh(window), self._embed_fresh(window), equal_nan=True):
            raise BackboneError(f"{self.path}: the model keeps state ({', '.join(self.state_variables)}) and gives "
                                "other features for the same window even from a freshly loaded interpreter "
                                "(random ops?): its features are not a function of the window, so it cannot be "
                                "a backbone")
        log.warning("%s keeps state between invocations (%s): every window runs from the model's initial state, "
                    "in an interpreter opened for it", self.path.name, ", ".join(self.state_variables))

    def _changes_with_history(self) -> bool:
        check = self._open(self.reference_kernels, preserve=True)  # one window: a few MiB at most
        try:
            check.allocate_tensors()
            return changes_with_history(check, self._input)
        except (RuntimeError, ValueError) as exc:
            raise BackboneError(f"{self.path}: the interpreter cannot run the model on one window ({exc})") from exc

    # --- what changes the numbers -------------------------------------------------------------------

    @property
    def _out_scale(self) -> float:
        """One int8 step of the embedding (kept for callers that read it under this name)."""
        return self.output_quant.scale

    @property
    def stateful(self) -> bool:
        """Does the model keep state between invocations (then every window runs from its initial state)?"""
        return bool(self.state_variables)

    def numbers_identity(self) -> dict[str, Any]:
        """Everything that changes the embeddings this backbone computes from given windows.

        The model, the interpreter (runtime and version: kernels change between releases), the op
        resolver (the XNNPACK delegate rounds differently on ~14% of the values), the CPU architecture
        (kernels differ per instruction set), the output used and how its values and the inputs are
        (de)quantized and standardized (a sidecar given with `metadata_path` may differ from the
        default one). Batch size and threads are not in it: they do not change a value (tested).
        An intermediate feature tensor (read with every tensor kept, which may change the kernels) and a
        state reset per window add keys; a backbone without either has the keys it always had.
        """
        identity: dict[str, Any] = {
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
        if self.preserves_all_tensors:
            identity["feature_tensor"] = self.feature.tensor_index
            identity["preserve_all_tensors"] = True
        if self.stateful:
            identity["state"] = "reset per window"
        return identity

    def embedding_standardizer(self) -> EmbeddingStandardizer | None:
        """The embedding statistics shipped in the sidecar (fitted on the backbone subjects), if any.

        A device has no access to the backbone subjects' data; this is how it standardizes exactly as
        the simulation does.
        """
        stats = self.metadata.get("embedding_standardization")
        if not stats:
            return None
        return EmbeddingStandardizer(np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32))

    # --- running ------------------------------------------------------------------------------------

    def _ensure_batch(self, n: int) -> None:
        if n != self._allocated_batch:
            self._allocate(n)

    def _invoke(self, interp: Any, x: np.ndarray) -> None:
        try:
            interp.set_tensor(self._input["index"], x)
            interp.invoke()
        except (RuntimeError, ValueError) as exc:
            raise BackboneError(f"{self.path}: the interpreter failed on {x.shape[0]} window(s) of shape "
                                f"{list(x.shape[1:])} ({exc})") from exc

    def _read_feature(self, interp: Any, n: int) -> np.ndarray:
        y = np.asarray(interp.get_tensor(self.feature.tensor_index))
        if y.ndim == 0 or y.shape[0] < n:
            raise BackboneError(f"{self.path}: the feature tensor tensor:{self.feature.tensor_index} "
                                f"({self.feature.name!r}) has shape {list(y.shape)} for {n} window(s): its first "
                                "dimension is not the batch")
        return y

    def _embed_fresh(self, x: np.ndarray) -> np.ndarray:
        """One window (a batch of 1) through an interpreter opened for it: the model's initial state."""
        interp = self._open(self.reference_kernels, preserve=self.preserves_all_tensors)
        try:
            interp.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise BackboneError(f"{self.path}: the interpreter cannot allocate the model ({exc})") from exc
        self._invoke(interp, x)
        return np.array(self._read_feature(interp, 1)[:1])

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
        if self._model_bytes is not None:  # stateful: each window from the initial state
            for i in range(x.shape[0]):
                result[i] = dequantize(self._embed_fresh(x[i: i + 1]).reshape(1, -1), self.output_quant)[0]
            return result
        for lo in range(0, x.shape[0], self.batch_size):
            chunk = x[lo: lo + self.batch_size]
            n = chunk.shape[0]
            if n < self.batch_size and x.shape[0] > self.batch_size:
                # Pad the tail instead of re-allocating the interpreter for one odd batch size.
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
            self._ensure_batch(chunk.shape[0])
            self._invoke(self._interp, chunk)
            y = self._read_feature(self._interp, chunk.shape[0])[:n].reshape(n, -1)
            result[lo: lo + n] = dequantize(y, self.output_quant)
        return result


def _missing_model_message(path: Path) -> str:
    what = "is a directory, not a .tflite file" if path.is_dir() else "does not exist"
    if is_bundled(path):
        return (f"backbone model not found: {path} {what}. It is one edge-fl ships ({DEFAULT_MODEL.name} is the "
                f"default): {rebuild_hint(path)}.")
    return (f"backbone model not found: {path} {what}. Expected a .tflite file: fix the path (edge-fl's own "
            f"backbone is {DEFAULT_MODEL}; docs/backbones.md says how to bring your own).")


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


# --- what a model offers: `python -m edge_agent.backbone MODEL` -----------------------------------------


def describe_model(path: str | os.PathLike[str], runtime: RuntimeName = "auto") -> str:
    """The input, the outputs and every tensor that could be the features, as `feature_output` names them."""
    model = Path(path)
    if not model.is_file():
        raise BackboneError(_missing_model_message(model))
    name, module = load_interpreter_module(runtime)
    interp = open_interpreter(module, model, num_threads=1, reference_kernels=False)
    lines = [f"{model} ({name} {runtime_version(name)})"]
    for d in interp.get_input_details():
        signature = [int(s) for s in d.get("shape_signature", d["shape"])]
        batch = "fixed at 1: runs window by window" if fixed_batch(d) == 1 else "any"
        lines.append(f"input tensor:{d['index']} {d['name']!r} shape {signature} {np.dtype(d['dtype']).name} "
                     f"(batch: {batch})")
    variables = state_variables(interp)
    if variables:
        lines.append(f"state: writes variables {', '.join(variables)}: every window runs from the initial state")
    outputs = {int(d["index"]): i for i, d in enumerate(interp.get_output_details())}
    ops = ops_details(interp)
    produced = None if ops is None else {int(t) for op in ops for t in op["outputs"]}
    input_index = int(interp.get_input_details()[0]["index"])
    lines.append("feature tensors (feature_output = output position N, \"tensor:N\" or the name):")
    for d in sorted(interp.get_tensor_details(), key=lambda d: int(d["index"])):
        index = int(d["index"])
        if index not in outputs and _feature_problem(d, produced, input_index):
            continue
        where = f"output {outputs[index]}" if index in outputs else "intermediate"
        dim = int(np.prod([int(s) for s in d["shape"]][1:]))
        lines.append(f"  tensor:{index:<4} {where:<12} dim {dim:<6} {np.dtype(d['dtype']).name:<7} {d['name']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent.backbone",
                                     description="List a .tflite model's input and the tensors that can be its "
                                                 "features (docs/backbones.md).")
    parser.add_argument("model", type=Path)
    parser.add_argument("--runtime", default="auto", choices=["auto", *_RUNTIME_MODULES])
    args = parser.parse_args(argv)
    try:
        print(describe_model(args.model, args.runtime))
    except BackboneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
