"""Lossy codecs for model updates and global-model deltas: numpy in, bytes out, and back.

Every byte a device sends costs money on a metered link, so the codecs below trade precision for size,
from the float32 reference down to a fraction of a bit per coordinate. What travels is ONE tensor's bytes:
the tensor's shape is known to both sides (the round's task names the head's tensors and their shapes) and is
never repeated on the wire, nor is the codec (the envelope's header names it once per update).

Codecs (`CodecSpec.parse` text in brackets; `+sr` = stochastic rounding, `+rot` = random rotation):

=================  ===============================================================================================
``float32``        the reference: 4 bytes per value, exact.
``float16``        2 bytes per value; values beyond float16's range (|x| >= 65520 rounds to inf) are REFUSED with
                   CodecError rather than clipped: clipping would silently change an update by an unbounded amount,
                   and a delta that large means a diverged client whose update the aggregator should not get anyway.
``int8[+sr]``      one int8 per value and one float32 scale per output channel.
``int4[+sr]``      two values per byte (levels -7..7) and one float32 scale per output channel.
``sign1[+rot][+sr]``  one bit per value and one float32 scale per output channel. Plain: the scaled sign,
                   mean(|x|) * sign(x), the MSE-optimal scale for given signs. ``+rot``: DRIVE / EDEN
                   (Vargaftik et al., NeurIPS 2021 / ICML 2022): each channel is padded with zeros to a power of
                   two p and rotated, y = R x, the signs of y are sent with the scale S = ||x||^2 / ||y||_1, and the
                   receiver computes S R^T sign(y). DRIVE shows that this scale makes the estimate unbiased for a
                   uniformly random rotation, with an error of about (pi/2 - 1) ||x||^2 whatever the shape of x
                   (the plain sign's error depends on how uneven x is); it is what lets many clients' errors
                   average out. R = H D2 H D1 is two randomized Hadamard rounds (H the orthonormal Walsh-Hadamard
                   transform, D1, D2 random signs from the seed): O(p log p) instead of a dense rotation, and,
                   measured, unbiased to within the sampling noise for channels of 32 values and more (one round is
                   not: see `_rotate`). ``sign1+rot+sr`` rounds the rotated values to +-max|y| stochastically
                   instead, which is unbiased for any rotation, at a larger variance.
``topk:F``         the ceil(F n) largest |x| of the whole tensor: their positions (a bitmap or delta-coded varints,
                   whichever is smaller) and their values as float16 relative to a float32 scale.
``subsample:F[+sr]``  ceil(F n) coordinates drawn from the shared seed, so no position is sent: only their values,
                   int8 relative to one float32 scale.
=================  ===============================================================================================

Scales are per output channel (the last axis) for tensors of 2 or more dimensions, and per tensor for 1-D ones
(a bias vector has no channels to separate); topk and subsample use one scale per tensor, since at their fractions
per-channel scales would cost more than the values they describe. Every scale is computed in float64 from the
float32 tensor and stored so that no value up to float32's maximum overflows: the int8/int4/subsample scale is the
channel's max |x| itself (decoded as q * max / QMAX in float64), so the largest value round-trips exactly. Scales
are float32, not float16: float16 overflows at 65504 and loses precision below 6e-5, both within the range of
real deltas, and the 2 bytes a float16 scale would save per channel (82 of sign1's 457 bytes for the default head)
do not change which codec reaches a given ratio.

Rounding. Deterministic (round to nearest) is the default: it has the smallest error, and its bias is what error
feedback (`ErrorFeedback`) removes over rounds. ``+sr`` rounds stochastically (up with probability equal to the
fractional part), which makes the decoded value unbiased, E[decoded] = x, so that the mean of many clients
converges without error feedback; its variance is larger, and for sign1 larger than the signal itself, which is
why error feedback is NOT applied to ``+sr`` codecs (see `CodecSpec.error_feedback`).

Randomness. The ``seed`` (bytes shared by sender and receiver, derived by the caller from fleet, device, round and
tensor) drives three independent streams, each the SHAKE-256 of b"edge-fl/", the purpose, a zero byte and the
seed, so that a receiver in another language or on another numpy version derives exactly the same mask and
rotation: "subsample-mask" (one 64-bit little-endian key per flat index; the ceil(F n) smallest keys are sent,
ties by index), "rotation-signs" (2 p c bits in np.unpackbits order: D1 then D2, each (p, c) row-major, bit 1 =
-1) and "rounding-noise" (a 64-bit key per value; its top 53 bits make a uniform number in [0, 1)). The decoder
never needs the rounding noise. Different devices must use different seeds, or their rounding noise and subsample
masks coincide and stop averaging out.

Byte layout of one tensor (all little-endian; n values, c channels, "mode" is one byte):

- size 0: no bytes at all, for every codec.
- float32: n x float32, nothing else (no mode byte).
- every other codec starts with the mode byte:
  MODE_ZERO (1): an all-zero tensor, nothing follows (exact, 1 byte).
  MODE_CONSTANT (2): all values equal, one float32 follows (exact, 5 bytes).
  MODE_CODED (0) / MODE_VARINT (3, topk only), then the codec's body:

  - float16: n x float16.
  - int8: c x float32 max|x| | n x int8 in -127..127 (row-major).
  - int4: c x float32 max|x| | ceil(n/2) bytes: level q in -7..7 stored as q + 8 (never 0), value 2i in the
    low nibble and 2i+1 in the high nibble of byte i; an odd count leaves a zero high nibble.
  - sign1: c x float32 scale | np.packbits of n bits (1 = positive or zero; the first value in the most
    significant bit; zero padding bits). With +rot: c x float32 T | packbits of the (p, c) matrix of rotated
    signs, row-major, where T = S / sqrt(p) (T <= ||x|| / sqrt(p) <= max|x|, so it fits float32 whenever x
    does) and the decoded channel is the first rows of R^T (T sqrt(p) sign), clipped to float32's range.
  - topk: float32 max|x| | indices | k x float16 value / max|x|. MODE_CODED: a bitmap of n bits (packbits order,
    exactly k set, zero padding). MODE_VARINT: k LEB128 varints, the first index then each gap minus one, in
    canonical (shortest) form. The encoder picks the shorter (the bitmap on a tie); among equal magnitudes it keeps
    the lower indices.
  - subsample: float32 max|x| over the sent values | m x int8 in -127..127, in ascending index order.

`decode_tensor` refuses, with a CodecError naming the codec, any byte string whose length, mode byte, padding,
levels, scales or indices do not match the shape and codec; it never returns NaN or inf.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from .digest import shake_256
from .tensor_pack import CodecError

CODECS: tuple[str, ...] = ("float32", "float16", "int8", "int4", "sign1", "topk", "subsample")
VALID_FORMS = ("float32, float16, int8[+sr], int4[+sr], sign1[+rot][+sr], topk:F, subsample:F[+sr] "
               "(F a fraction, 0 < F <= 1)")
_FRACTION_CODECS = frozenset({"topk", "subsample"})
_STOCHASTIC_CODECS = frozenset({"int8", "int4", "sign1", "subsample"})
_FLAGS = ("rot", "sr")

MODE_CODED = 0
MODE_ZERO = 1
MODE_CONSTANT = 2
MODE_VARINT = 3  # topk whose indices are delta-coded varints rather than a bitmap

INT8_LEVELS = 127
INT4_LEVELS = 7
FLOAT16_MAX = 65504.0
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Rounding of float32 scales and of float64 -> float32 products, and the subnormal floor: what every bound adds.
_RELATIVE_SLACK = 2.0**-20
_ABSOLUTE_SLACK = 2.0**-140

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SPEC_TEXT = re.compile(rf"(?P<name>[a-z0-9]+)(?::(?P<fraction>{_NUMBER}))?(?P<flags>(?:\+[a-z]+)*)")
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CodecSpec:
    """A codec and its parameters, as the aggregator announces it in a round's task.

    `fraction` is the share of coordinates sent by topk and subsample (0 < fraction <= 1, required for them and
    refused for the others); `rotate` is sign1's random rotation; `stochastic` is stochastic rounding (int8, int4,
    sign1, subsample). The text form, `CodecSpec.parse(str(spec)) == spec`, is "name[:fraction][+rot][+sr]".
    """

    name: str
    fraction: float | None = None
    rotate: bool = False
    stochastic: bool = False

    def __post_init__(self) -> None:
        problem = _spec_problem(self.name, self.fraction, self.rotate, self.stochastic)
        if problem:
            raise CodecError(f"codec {self._text()!r}: {problem}; valid forms: {VALID_FORMS}")

    def _text(self) -> str:
        fraction = "" if self.fraction is None else f":{float(self.fraction)!r}"
        return self.name + fraction + ("+rot" if self.rotate else "") + ("+sr" if self.stochastic else "")

    def __str__(self) -> str:
        return self._text()

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """"topk:0.05", "int4+sr", "sign1+rot", "subsample:0.1" ...; CodecError naming `text` otherwise."""
        match = _SPEC_TEXT.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise CodecError(f"codec {text!r} is not of the form name[:fraction][+flag]; valid forms: {VALID_FORMS}")
        flags = [f for f in match["flags"].split("+") if f]
        unknown = [f for f in flags if f not in _FLAGS]
        if unknown or len(set(flags)) != len(flags):
            what = f"unknown flag +{unknown[0]}" if unknown else "a repeated flag"
            raise CodecError(f"codec {text!r} has {what}; valid forms: {VALID_FORMS}")
        fraction = float(match["fraction"]) if match["fraction"] is not None else None
        rotate, stochastic = "rot" in flags, "sr" in flags
        problem = _spec_problem(match["name"], fraction, rotate, stochastic)
        if problem:
            raise CodecError(f"codec {text!r}: {problem}; valid forms: {VALID_FORMS}")
        return cls(match["name"], fraction, rotate, stochastic)

    @property
    def lossless(self) -> bool:
        return self.name == "float32"

    @property
    def seeded(self) -> bool:
        """Does the codec draw from its seed (a subsample mask, a rotation, rounding noise)? The others ignore it,
        so a caller may pass b"" and skip deriving one."""
        return self.name == "subsample" or self.rotate or self.stochastic

    @property
    def fixed_size(self) -> bool:
        """Does every non-constant tensor of a shape encode to exactly `tensor_bytes` bytes? (topk: at most.)"""
        return self.name != "topk"

    @property
    def error_feedback(self) -> bool:
        """Should a sender keep an error-feedback residual for this codec?

        Deterministic codecs are biased (they round the same way every round) and error feedback corrects that:
        each of them errs by less than the tensor it encodes (||x - x^|| < ||x||; sign1+rot by about 0.75 ||x||
        on typical inputs, not for every x), so the residual stays bounded. Stochastic (+sr)
        codecs are unbiased already, and their variance can exceed the signal (sign1+sr: n max|x|^2 against
        ||x||^2), which error feedback would feed back and amplify round after round: they go without it. Except
        subsample: its +sr rounds only the values it sends; the coordinates it does not send (1 - F of them) are
        lost for good without the residual (measured: fedavg lost 32 to 62 points at F = 0.1 to 0.01).
        """
        return self.name == "subsample" or not self.stochastic


def _spec_problem(name: str, fraction: float | None, rotate: bool, stochastic: bool) -> str | None:
    """What is wrong with these codec parameters, or None."""
    if name not in CODECS:
        return f"unknown codec name {name!r}"
    if name in _FRACTION_CODECS:
        if fraction is None or isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            return f"{name} needs a fraction, e.g. {name}:0.05"
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            return f"fraction {fraction!r} is not in (0, 1]"
    elif fraction is not None:
        return f"{name} takes no fraction"
    if rotate and name != "sign1":
        return "+rot applies to sign1 only"
    if stochastic and name not in _STOCHASTIC_CODECS:
        return f"+sr applies to {', '.join(sorted(_STOCHASTIC_CODECS))} only"
    return None


def _count(fraction: float, size: int) -> int:
    """ceil(fraction * size), at least 1; the product is rounded to 9 decimals first so 0.1 * 30 is 3, not 4."""
    return max(1, min(size, math.ceil(round(fraction * size, 9))))


def _channels(shape: Sequence[int]) -> int:
    return int(shape[-1]) if len(shape) >= 2 else 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _bitmap_bytes(size: int) -> int:
    return (size + 7) // 8


def _body_bytes(shape: tuple[int, ...], spec: CodecSpec) -> int:
    """Bytes after the mode byte of a non-constant tensor (topk: its bitmap form, its largest)."""
    n, c = math.prod(shape), _channels(shape)
    if spec.name == "float16":
        return 2 * n
    if spec.name == "int8":
        return 4 * c + n
    if spec.name == "int4":
        return 4 * c + (n + 1) // 2
    if spec.name == "sign1":
        bits = c * _next_pow2(n // c) if spec.rotate else n
        return 4 * c + _bitmap_bytes(bits)
    assert spec.fraction is not None  # checked by CodecSpec
    k = _count(spec.fraction, n)
    if spec.name == "topk":
        return 4 + min(_bitmap_bytes(n), k * _varint_len(n)) + 2 * k
    return 4 + k  # subsample


def tensor_bytes(shape: Sequence[int], spec: CodecSpec) -> int:
    """Encoded size of one non-constant tensor of `shape`: exact for fixed-size codecs, an upper bound for topk.

    A constant tensor takes 5 bytes (all zero: 1) whatever the codec, except float32, which is always 4 n."""
    dims = _shape(shape, spec)
    n = math.prod(dims)
    if n == 0:
        return 0
    if spec.name == "float32":
        return 4 * n
    return 1 + _body_bytes(dims, spec)


def payload_bytes(shapes: Mapping[str, Sequence[int]], spec: CodecSpec) -> int:
    """Encoded size of a whole update of non-constant tensors (see `tensor_bytes`), without encoding anything."""
    return sum(tensor_bytes(shape, spec) for shape in shapes.values())


# --- helpers shared by the codecs ------------------------------------------------------------------------------


def _shape(shape: Sequence[int], spec: CodecSpec) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise CodecError(f"{spec}: shape {shape!r:.60} is not a sequence of integers") from None
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise CodecError(f"{spec}: shape {dims!r:.60} must be non-negative integers")
    return tuple(int(d) for d in dims)


def _as_float32(x: npt.ArrayLike) -> Float32Array:
    """The float32 tensor every codec works on (the wire's precision); refuses non-numbers, NaN and inf."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise CodecError(f"tensor of dtype {arr.dtype} cannot be encoded (floats or integers only)")
    with np.errstate(over="ignore", invalid="ignore"):  # a float64 beyond float32's range becomes inf: refused next
        x32 = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(x32)):
        raise CodecError("tensor contains NaN or inf (after conversion to float32)")
    return x32


def _matrix(x32: Float32Array) -> Float32Array:
    """(rows, channels) view: the last axis for 2-D and up, one channel for a vector or scalar."""
    return x32.reshape(-1, x32.shape[-1]) if x32.ndim >= 2 else x32.reshape(-1, 1)


def _stream(purpose: bytes, seed: bytes, nbytes: int) -> npt.NDArray[np.uint8]:
    digest = shake_256(b"edge-fl/" + purpose + b"\0" + bytes(seed), nbytes)
    return np.frombuffer(digest, np.uint8)


def _keys(purpose: bytes, seed: bytes, count: int) -> npt.NDArray[np.uint64]:
    return _stream(purpose, seed, 8 * count).view("<u8").astype(np.uint64)


def _uniform(seed: bytes, shape: tuple[int, ...]) -> Float64Array:
    """Rounding noise in [0, 1): only the sender draws it."""
    keys = _keys(b"rounding-noise", seed, math.prod(shape))
    noise: Float64Array = (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return noise.reshape(shape)


def _rotation_signs(seed: bytes, p: int, c: int) -> tuple[Float64Array, Float64Array]:
    """The two random sign matrices D1, D2 (p, c) of the rotation; bit 1 = negative."""
    count = p * c
    bits = np.unpackbits(_stream(b"rotation-signs", seed, _bitmap_bytes(2 * count)))[:2 * count]
    signs = (1.0 - 2.0 * bits.astype(np.float64)).reshape(2, p, c)
    return signs[0], signs[1]


def subsample_indices(size: int, spec: CodecSpec, seed: bytes) -> npt.NDArray[np.int64]:
    """The flat (row-major) indices subsample sends for a tensor of `size` values, ascending.

    Public so the aggregator can average each coordinate over the clients that actually sent it."""
    if spec.name != "subsample" or spec.fraction is None:
        raise CodecError(f"{spec}: only subsample has a seeded mask")
    if size == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(_keys(b"subsample-mask", seed, size), kind="stable")
    return np.sort(order[:_count(spec.fraction, size)]).astype(np.int64)


def _round(v: Float64Array, stochastic: bool, seed: bytes, levels: int) -> npt.NDArray[np.int64]:
    """Levels in -levels..levels of `v` (already in that range): nearest, or stochastic (unbiased)."""
    q = np.floor(v + _uniform(seed, v.shape)) if stochastic else np.rint(v)
    return np.clip(q, -levels, levels).astype(np.int64)


def _levels(x: Float64Array, peak: Float64Array, levels: int) -> Float64Array:
    """x scaled so that +-peak maps to +-levels (0 where the peak is 0)."""
    safe = np.where(peak > 0, peak, 1.0)
    scaled: Float64Array = x * levels / safe
    return scaled


def _dequantize(q: npt.NDArray[np.int64], peak: Float64Array, levels: int) -> Float64Array:
    # q * peak is exact in float64 (8 + 24 bits), so +-levels gives back +-peak exactly
    out: Float64Array = q.astype(np.float64) * peak / levels
    return out


def _to_float32(values: Float64Array) -> Float32Array:
    """Clip to float32's range (never further from x, which lies within it) and convert."""
    out: Float32Array = np.clip(values, -FLOAT32_MAX, FLOAT32_MAX).astype(np.float32)
    return out


class _Reader:
    """Walks a tensor's bytes; every read checks its length against what is left."""

    def __init__(self, data: bytes, spec: CodecSpec, shape: tuple[int, ...], expected: int | None) -> None:
        self.data, self.spec, self.shape, self.pos = data, spec, shape, 1  # the mode byte is read already
        if expected is not None and len(data) != expected:
            self.fail(f"expected {expected} bytes, got {len(data)}")

    def fail(self, problem: str) -> NoReturn:
        raise CodecError(f"{self.spec}: tensor of shape {self.shape}: {problem}")

    def take(self, nbytes: int) -> bytes:
        if self.pos + nbytes > len(self.data):
            self.fail(f"truncated: needs {self.pos + nbytes} bytes at least, got {len(self.data)}")
        chunk = self.data[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return chunk

    def scales(self, count: int) -> Float64Array:
        scales = np.frombuffer(self.take(4 * count), _F32).astype(np.float64)
        if not np.all(np.isfinite(scales) & (scales >= 0)):
            self.fail("a scale is negative, NaN or inf")
        return scales

    def bits(self, count: int) -> npt.NDArray[np.uint8]:
        raw = np.frombuffer(self.take(_bitmap_bytes(count)), np.uint8)
        bits = np.unpackbits(raw)
        if np.any(bits[count:]):
            self.fail("padding bits after the last value are not zero")
        return bits[:count]

    def end(self) -> None:
        if self.pos != len(self.data):
            self.fail(f"{len(self.data) - self.pos} bytes left over after the last value")


# --- the codecs: encoders return the bytes after the mode byte, decoders read them -------------------------------


def _encode_float16(x32: Float32Array, spec: CodecSpec, seed: bytes) -> tuple[int, bytes]:
    with np.errstate(over="ignore"):
        half = x32.astype(_F16)
    if not np.all(np.isfinite(half)):
        peak = float(np.max(np.abs(x32)))
        raise CodecError(f"{spec}: |x| up to {peak:.6g} exceeds float16's range (largest {FLOAT16_MAX:g}); "
                         f"use int8 or float32 for this tensor")
    return MODE_CODED, half.tobytes()


def _decode_float16(r: _Reader, n: int) -> Float32Array:
    values = np.frombuffer(r.take(2 * n), _F16)
    if not np.all(np.isfinite(values)):
        r.fail("a float16 value is NaN or inf")
    return values.astype(np.float32)


def _encode_int(x32: Float32Array, spec: CodecSpec, seed: bytes) -> tuple[int, bytes]:
    levels = INT8_LEVELS if spec.name == "int8" else INT4_LEVELS
    m = _matrix(x32).astype(np.float64)
    peak = np.max(np.abs(m), axis=0)
    q = _round(_levels(m, peak, levels), spec.stochastic, seed, levels).ravel()
    if spec.name == "int8":
        packed = q.astype(np.int8).tobytes()
    else:
        nibbles = (q + 8).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    return MODE_CODED, peak.astype(_F32).tobytes() + packed


def _decode_int(r: _Reader, shape: tuple[int, ...], spec: CodecSpec) -> Float32Array:
    n, c = math.prod(shape), _channels(shape)
    peak = r.scales(c)
    if spec.name == "int8":
        q = np.frombuffer(r.take(n), np.int8).astype(np.int64)
        if np.any(q < -INT8_LEVELS):
            r.fail("int8 level -128 is not used by this codec (levels are -127..127)")
        levels = INT8_LEVELS
    else:
        packed = np.frombuffer(r.take((n + 1) // 2), np.uint8)
        nibbles = np.stack((packed & 0x0F, packed >> 4), axis=1).ravel()
        if n % 2 and nibbles[-1]:
            r.fail("the padding nibble after the last value is not zero")
        q = nibbles[:n].astype(np.int64) - 8
        if np.any(q < -INT4_LEVELS):
            r.fail("int4 nibble 0 (level -8) is not used by this codec (levels are -7..7, stored as 1..15)")
        levels = INT4_LEVELS
    return _to_float32(_dequantize(q.reshape(-1, c), peak, levels))


def _hadamard(a: Float64Array) -> Float64Array:
    """Orthonormal Walsh-Hadamard transform along axis 0 (a power-of-two length p): symmetric, its own inverse."""
    p, c = a.shape
    out = a
    half = 1
    while half < p:
        pairs = out.reshape(p // (2 * half), 2, half, c)
        out = np.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), axis=1).reshape(p, c)
        half *= 2
    scaled: Float64Array = out / math.sqrt(p)
    return scaled


def _rotate(a: Float64Array, seed: bytes) -> Float64Array:
    """R a with R = H D2 H D1: two randomized Hadamard rounds. One round leaves DRIVE's scale biased for sparse or
    heavy-tailed channels (a channel with two non-zero values: half its norm, measured over 4000 seeds); two bring
    the bias down to the sampling noise for channels of 32 values and more."""
    d1, d2 = _rotation_signs(seed, *a.shape)
    return _hadamard(d2 * _hadamard(d1 * a))


def _unrotate(a: Float64Array, seed: bytes) -> Float64Array:
    """R^T a = D1 H D2 H a."""
    d1, d2 = _rotation_signs(seed, *a.shape)
    return d1 * _hadamard(d2 * _hadamard(a))


def _encode_sign1(x32: Float32Array, spec: CodecSpec, seed: bytes) -> tuple[int, bytes]:
    m = _matrix(x32).astype(np.float64)
    if spec.rotate:
        rows, c = m.shape
        p = _next_pow2(rows)
        padded = np.zeros((p, c))
        padded[:rows] = m
        y = _rotate(padded, seed)
        bits, scale = _sign_bits(y, spec.stochastic, seed)
        if not spec.stochastic:  # DRIVE's unbiased scale ||x||^2 / ||y||_1 (||x|| = ||y||: R is orthonormal)
            l1 = np.sum(np.abs(y), axis=0)
            scale = np.where(l1 > 0, np.sum(y * y, axis=0) / np.where(l1 > 0, l1, 1.0), 0.0)
        scale = scale / math.sqrt(p)  # T = S / sqrt(p) <= ||x|| / sqrt(p) <= max|x|: always fits float32
    else:
        bits, scale = _sign_bits(m, spec.stochastic, seed)
        if not spec.stochastic:  # the MSE-optimal scale for fixed signs
            scale = np.mean(np.abs(m), axis=0)
    return MODE_CODED, scale.astype(_F32).tobytes() + np.packbits(bits.ravel()).tobytes()


def _sign_bits(v: Float64Array, stochastic: bool, seed: bytes) -> tuple[npt.NDArray[np.bool_], Float64Array]:
    """(bits, per-column scale): nearest sign with no scale yet, or unbiased stochastic signs scaled by max|v|."""
    if not stochastic:
        return v >= 0, np.zeros(v.shape[1])
    peak = np.max(np.abs(v), axis=0)
    up = 0.5 * (1.0 + _levels(v, peak, 1))  # P(+peak) makes E[decoded] = v
    return _uniform(seed, v.shape) < up, peak


def _decode_sign1(r: _Reader, shape: tuple[int, ...], spec: CodecSpec, seed: bytes) -> Float32Array:
    n, c = math.prod(shape), _channels(shape)
    scale = r.scales(c)
    rows = n // c
    p = _next_pow2(rows) if spec.rotate else rows
    signs = 2.0 * r.bits(p * c).reshape(p, c).astype(np.float64) - 1.0
    if spec.rotate:  # S R^T sign(y), with S = T sqrt(p)
        return _to_float32(_unrotate(signs * (scale * math.sqrt(p)), seed)[:rows])
    return _to_float32(signs * scale)


def _encode_varints(values: npt.NDArray[np.int64]) -> bytes:
    """LEB128: 7 bits per byte, low bits first, the high bit set on every byte but a value's last."""
    v = values.astype(np.uint64)
    width = _varint_len(int(values.max()))
    groups = np.stack([(v >> np.uint64(7 * j)) & np.uint64(0x7F) for j in range(width)], axis=1).astype(np.uint8)
    lengths = np.ones(v.size, np.int64)
    for j in range(1, width):
        lengths += (v >> np.uint64(7 * j)) > 0
    column = np.arange(width)[None, :]
    groups |= ((column < (lengths - 1)[:, None]).astype(np.uint8) << 7).astype(np.uint8)
    return groups[column < lengths[:, None]].tobytes()


def _decode_varints(r: _Reader, count: int, limit: int) -> npt.NDArray[np.int64]:
    """`count` canonical varints, each < `limit`, read from the reader's position."""
    rest = np.frombuffer(r.data, np.uint8, offset=r.pos)
    ends = np.flatnonzero(rest < 0x80)[:count]
    if ends.size < count:
        r.fail(f"truncated: {count} varint indices expected, {ends.size} found")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > _varint_len(limit):
        r.fail(f"a varint index is longer than {_varint_len(limit)} bytes")
    if np.any((lengths > 1) & (rest[ends] == 0)):
        r.fail("a varint index is not in its shortest form")
    values = np.zeros(count, np.int64)
    for j in range(int(lengths.max())):
        has = lengths > j
        values[has] |= (rest[starts[has] + j] & 0x7F).astype(np.int64) << (7 * j)
    r.pos += int(ends[-1]) + 1
    return values


def _encode_topk(x32: Float32Array, spec: CodecSpec, seed: bytes) -> tuple[int, bytes]:
    assert spec.fraction is not None
    flat = x32.ravel()
    k = _count(spec.fraction, flat.size)
    magnitude = np.abs(flat)
    top = np.sort(np.argsort(-magnitude, kind="stable")[:k])  # ties: the lower index, so the bytes are stable
    peak = float(magnitude.max())
    values = (flat[top].astype(np.float64) / peak).astype(_F16)
    bitmap = np.zeros(flat.size, bool)
    bitmap[top] = True
    bitmap_bytes = np.packbits(bitmap).tobytes()
    varints = _encode_varints(np.diff(top, prepend=-1) - 1)
    mode, index = (MODE_VARINT, varints) if len(varints) < len(bitmap_bytes) else (MODE_CODED, bitmap_bytes)
    return mode, struct.pack("<f", peak) + index + values.tobytes()


def _decode_topk(r: _Reader, n: int, spec: CodecSpec, mode: int) -> Float32Array:
    assert spec.fraction is not None
    k = _count(spec.fraction, n)
    peak = r.scales(1)[0]
    if mode == MODE_CODED:
        bitmap = r.bits(n)
        if int(bitmap.sum()) != k:
            r.fail(f"the bitmap marks {int(bitmap.sum())} positions, {k} expected")
        top = np.flatnonzero(bitmap)
    else:
        top = np.cumsum(_decode_varints(r, k, n) + 1) - 1
        if top[-1] >= n:
            r.fail(f"a varint index reaches {int(top[-1])}, beyond the tensor's {n} values")
    values = np.frombuffer(r.take(2 * k), _F16).astype(np.float64)
    if not np.all(np.abs(values) <= 1):  # NaN fails this too
        r.fail("a value is beyond the scale (|value| > 1), NaN or inf")
    out = np.zeros(n)
    out[top] = values * peak
    return _to_float32(out)


def _encode_subsample(x32: Float32Array, spec: CodecSpec, seed: bytes) -> tuple[int, bytes]:
    picked = x32.ravel()[subsample_indices(x32.size, spec, seed)].astype(np.float64)
    peak = np.max(np.abs(picked), keepdims=True)
    q = _round(_levels(picked, peak, INT8_LEVELS), spec.stochastic, seed, INT8_LEVELS)
    return MODE_CODED, peak.astype(_F32).tobytes() + q.astype(np.int8).tobytes()


def _decode_subsample(r: _Reader, n: int, spec: CodecSpec, seed: bytes) -> Float32Array:
    index = subsample_indices(n, spec, seed)
    peak = r.scales(1)
    q = np.frombuffer(r.take(index.size), np.int8).astype(np.int64)
    if np.any(q < -INT8_LEVELS):
        r.fail("int8 level -128 is not used by this codec (levels are -127..127)")
    out = np.zeros(n)
    out[index] = _dequantize(q, peak, INT8_LEVELS)
    return _to_float32(out)


_Encoder = Callable[[Float32Array, CodecSpec, bytes], tuple[int, bytes]]
_ENCODERS: dict[str, _Encoder] = {"float16": _encode_float16, "int8": _encode_int, "int4": _encode_int,
                                  "sign1": _encode_sign1, "topk": _encode_topk, "subsample": _encode_subsample}


def encode_tensor(x: npt.ArrayLike, spec: CodecSpec, seed: bytes) -> bytes:
    """The bytes of one tensor (layout in the module docstring); the shape is not among them.

    `x` is converted to float32 first. CodecError for NaN or inf ("tensor contains NaN or inf"), for a dtype
    that is not a number, and for float16 values beyond its range."""
    x32 = _as_float32(x)
    if x32.size == 0:
        return b""
    if spec.name == "float32":
        return x32.astype(_F32).tobytes()
    first = x32.flat[0]
    if np.all(x32 == first):  # exact, and 5 bytes whatever the codec and size
        return bytes([MODE_ZERO]) if first == 0 else bytes([MODE_CONSTANT]) + struct.pack("<f", first)
    mode, body = _ENCODERS[spec.name](x32, spec, bytes(seed))
    return bytes([mode]) + body


def decode_tensor(data: bytes | bytearray | memoryview, shape: tuple[int, ...], spec: CodecSpec,
                  seed: bytes) -> Float32Array:
    """Inverse of `encode_tensor` for a tensor of `shape`: finite float32 values, or CodecError naming the codec
    and what does not match (length, mode byte, padding, levels, scales, indices)."""
    dims = _shape(shape, spec)
    raw = bytes(data)
    n = math.prod(dims)
    if n == 0 or spec.name == "float32":
        expected = 4 * n
        if len(raw) != expected:
            raise CodecError(f"{spec}: tensor of shape {dims}: expected {expected} bytes, got {len(raw)}")
        values = np.frombuffer(raw, _F32).astype(np.float32).reshape(dims)
        if not np.all(np.isfinite(values)):
            raise CodecError(f"{spec}: tensor of shape {dims}: a float32 value is NaN or inf")
        return values
    if not raw:
        raise CodecError(f"{spec}: tensor of shape {dims}: expected at least 1 byte, got 0")
    with np.errstate(all="ignore"):  # a NaN or huge scale in hostile bytes shows as the finiteness error, not a warning
        return _decode_modes(raw, dims, spec, bytes(seed)).reshape(dims)


def _decode_modes(raw: bytes, dims: tuple[int, ...], spec: CodecSpec, seed: bytes) -> Float32Array:
    n, mode = math.prod(dims), raw[0]
    if mode == MODE_ZERO:
        _Reader(raw, spec, dims, 1)
        return np.zeros(n, np.float32)
    if mode == MODE_CONSTANT:
        r = _Reader(raw, spec, dims, 5)
        value = np.frombuffer(raw, _F32, offset=1)[0]
        if not np.isfinite(value):
            r.fail("the constant is NaN or inf")
        return np.full(n, value, np.float32)
    if mode not in (MODE_CODED, MODE_VARINT) or (mode == MODE_VARINT and spec.name != "topk"):
        raise CodecError(f"{spec}: tensor of shape {dims}: unknown mode byte {mode} (known: {MODE_CODED} coded, "
                         f"{MODE_ZERO} zero, {MODE_CONSTANT} constant" + (f", {MODE_VARINT} varint indices)"
                                                                           if spec.name == "topk" else ")"))
    # varint indices have no fixed length: their reader checks every read and that nothing is left over
    r = _Reader(raw, spec, dims, None if mode == MODE_VARINT else 1 + _body_bytes(dims, spec))
    if spec.name == "float16":
        out = _decode_float16(r, n)
    elif spec.name in ("int8", "int4"):
        out = _decode_int(r, dims, spec)
    elif spec.name == "sign1":
        out = _decode_sign1(r, dims, spec, seed)
    elif spec.name == "topk":
        out = _decode_topk(r, n, spec, mode)
    else:
        out = _decode_subsample(r, n, spec, seed)
    r.end()
    return out.ravel()


# --- stated error bounds ------------------------------------------------------------------------------------------


def error_bound(x: npt.ArrayLike, spec: CodecSpec) -> float:
    """A bound on max |x - decode(encode(x))| over all seeds, for the float32 version of `x`.

    Per channel c with peak M_c = max|x_c| (M the tensor's): float32 0; float16 M 2^-11 + 2^-25 (half an ulp,
    relative, or absolute in float16's subnormal range); int8 / int4 half a step M_c / (2 QMAX), a whole step with
    +sr; sign1 M_c (2 M_c with +sr); topk the largest magnitude not sent plus M 2^-11 (float16 relative to M);
    subsample M when some values are not sent, else int8's bound with one scale. sign1+rot is naturally an L2
    statement, used here as a max bound: ||x_c - x^_c||^2 = S^2 p - ||x_c||^2 <= (p - 1) ||x_c||^2 since
    S <= max|y| <= ||x_c||, and with +sr ||y - y^|| <= 2 max|y| sqrt(p). Constant tensors: 0 (sent exactly).
    Each bound adds 2^-20 M + 2^-140 for the rounding of float32 scales and products.
    """
    x32 = _as_float32(x)
    if x32.size == 0 or spec.name == "float32" or np.all(x32 == x32.flat[0]):
        return 0.0
    m = _matrix(x32).astype(np.float64)
    peaks = np.max(np.abs(m), axis=0)
    peak = float(peaks.max())
    slack = _RELATIVE_SLACK * peak + _ABSOLUTE_SLACK
    return _raw_bound(m, peaks, spec) + slack


def _raw_bound(m: Float64Array, peaks: Float64Array, spec: CodecSpec) -> float:
    step = 1.0 if spec.stochastic else 0.5  # in quantization steps
    peak = float(peaks.max())
    if spec.name == "float16":
        return peak * 2.0**-11 + 2.0**-25
    if spec.name in ("int8", "int4"):
        levels = INT8_LEVELS if spec.name == "int8" else INT4_LEVELS
        return float(peaks.max()) * step / levels
    if spec.name == "sign1" and not spec.rotate:
        return peak * (2.0 if spec.stochastic else 1.0)
    if spec.name == "sign1":
        p = _next_pow2(m.shape[0])
        norms = np.sqrt(np.sum(m * m, axis=0))
        factor = 2.0 * math.sqrt(p) if spec.stochastic else math.sqrt(p - 1)
        return float(norms.max()) * factor * (1 + _RELATIVE_SLACK)
    assert spec.fraction is not None
    k = _count(spec.fraction, m.size)
    if spec.name == "topk":
        dropped = float(np.sort(np.abs(m.ravel()))[::-1][k]) if k < m.size else 0.0
        return dropped + peak * (2.0**-11 + 2.0**-24)
    return peak if k < m.size else peak * step / INT8_LEVELS


# --- error feedback -------------------------------------------------------------------------------------------------


class ErrorFeedback:
    """The sender's memory of what compression has not delivered yet: one residual per tensor name.

    Each round sends compress(delta + residual) and keeps residual = (delta + residual) - decoded, so nothing is
    lost for good: the sum of everything decoded equals the sum of the deltas minus the current residual, which
    stays bounded because every deterministic codec errs by less than the value it encodes. Codecs without error
    feedback (`CodecSpec.error_feedback` false: the unbiased +sr ones) send the delta as is and leave the
    residuals untouched, so they still apply when the next round's codec uses them again.

    Pure state: `to_arrays` / `from_arrays` let the agent persist it with the update it belongs to, in the same
    transaction. When the model the deltas refer to is replaced (a new head shape, a resync to a global model the
    residual was not computed against), `reset` it.
    """

    def __init__(self, residuals: Mapping[str, npt.ArrayLike] | None = None) -> None:
        self._residuals: dict[str, Float32Array] = {}
        for name, value in (residuals or {}).items():
            arr = np.asarray(value)
            if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
                raise ValueError(f"residual {name!r} must be finite floats, got dtype {arr.dtype}")
            self._residuals[str(name)] = arr.astype(np.float32, copy=True)

    def compress(self, delta: Mapping[str, npt.ArrayLike], spec: CodecSpec,
                 seeds: Mapping[str, bytes]) -> tuple[dict[str, bytes], dict[str, Float32Array]]:
        """(encoded bytes, what the receiver decodes) per tensor of `delta`; the residuals change only when every
        tensor was encoded, so a CodecError leaves this object as it was."""
        encoded: dict[str, bytes] = {}
        decoded: dict[str, Float32Array] = {}
        updated: dict[str, Float32Array] = {}
        for name in sorted(delta):
            if name not in seeds:
                raise ValueError(f"no seed for tensor {name!r}")
            x = _as_float32(delta[name])
            corrected = self._corrected(name, x) if spec.error_feedback else x
            encoded[name] = encode_tensor(corrected, spec, seeds[name])
            decoded[name] = decode_tensor(encoded[name], corrected.shape, spec, seeds[name])
            if spec.error_feedback:
                updated[name] = (corrected.astype(np.float64) - decoded[name]).astype(np.float32)
        self._residuals.update(updated)
        return encoded, decoded

    def _corrected(self, name: str, x: Float32Array) -> Float32Array:
        residual = self._residuals.get(name)
        if residual is None:
            return x
        if residual.shape != x.shape:
            raise ValueError(f"residual of {name!r} has shape {residual.shape}, the delta {x.shape}: "
                             f"reset the error feedback when the model's shapes change")
        return _as_float32(x.astype(np.float64) + residual)

    def reset(self) -> None:
        self._residuals.clear()

    def residual_norm(self) -> float:
        """L2 norm of all residuals together."""
        return math.sqrt(sum(float(np.sum(r.astype(np.float64) ** 2)) for r in self._residuals.values()))

    def to_arrays(self) -> dict[str, Float32Array]:
        return {name: r.copy() for name, r in sorted(self._residuals.items())}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, npt.ArrayLike]) -> ErrorFeedback:
        return cls(arrays)
