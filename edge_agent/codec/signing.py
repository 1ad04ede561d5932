"""Ed25519 signatures of envelopes and update frames, as pure functions: bytes and keys in, bytes or a verdict out.

No files, no clock, no registry: key files and the device registry are `edge_agent.keys`; the services
decide what to require. The crypto is the `cryptography` package's (no hand-written primitives).

What is signed: a context string, then every byte of the envelope before its signature trailer (prefix with
the FLAG_SIGNED bit, digest, header, payload; see `codec.envelope`), or of the update frame before its trailer
(header with the FLAG_SIGNED bit, digest, body; see `codec.update_frame`). `verify` tells the two formats apart
by their magic (b"EFLE" or b"EU") and gives the same verdicts for both. The context names the purpose and the
fleet, so a signature cannot be moved between purposes (a global model replayed as a round task, an update
as a model) or between fleets that share a key::

    b"edge-fl/v1 " + purpose + b"\\0" + fleet name + b"\\0"
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import envelope
from .digest import sha256
from .envelope import EnvelopeError


class Purpose(str, enum.Enum):
    UPDATE = "update"  # device -> aggregator, signed with the device's key
    TASK = "task"  # aggregator -> devices (round/current), signed with the fleet key
    MODEL = "model"  # aggregator -> devices (model/current), signed with the fleet key


def context(purpose: Purpose, fleet: str) -> bytes:
    """The domain-separation prefix of a signature (see the module docstring)."""
    return b"edge-fl/v1 " + purpose.value.encode() + b"\0" + fleet.encode() + b"\0"


def signer(key: Ed25519PrivateKey, ctx: bytes) -> Callable[[bytes], bytes]:
    """The `sign` argument of `codec.envelope.encode_envelope` and `codec.update_frame.encode_update_frame`:
    signs ctx + the bytes before the trailer."""
    return lambda body: key.sign(ctx + body)


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint for logs and listings: the first 8 bytes of SHA-256 of the raw public key, hex."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    h = sha256()
    h.update(key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    return bytes(h.digest()[:8]).hex()


class Refusal(str, enum.Enum):
    """Why a signature check failed; the values are the aggregator's rejection metric labels."""

    MALFORMED = "malformed"  # not even an envelope prefix
    UNSIGNED = "unsigned"  # no signature trailer
    UNKNOWN_SIGNER = "unknown_device"  # no public key to check it with (not enrolled, or revoked)
    WRONG_KEY = "wrong_key"  # intact (the digest matches) but not signed by any of the keys
    TAMPERED = "tampered"  # the bytes changed after signing (the digest does not match either)


@dataclass(frozen=True)
class SignatureVerdict:
    refusal: Refusal | None  # None: the signature verified
    key_index: int = -1  # which of the keys verified it (rotation: 0 current, 1 next)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.refusal is None


def _readable(ctx: bytes) -> str:
    return ctx.rstrip(b"\0").replace(b"\0", b" for fleet ").decode(errors="replace")


def _is_frame(data: bytes | bytearray | memoryview) -> bool:
    view = memoryview(data).cast("B")
    if bytes(view[:len(envelope.MAGIC)]) == envelope.MAGIC:
        return False
    # imported only for what is not an envelope: update_frame pulls in the lossy codecs and their hashing, which
    # a process that only ever sees envelopes need not hold in memory
    from . import update_frame

    return update_frame.is_update_frame(view)


def _parts(data: bytes | bytearray | memoryview, frame: bool) -> tuple[memoryview, bytes | None]:
    if not frame:
        return envelope.signed_parts(data)
    from . import update_frame

    return update_frame.signed_parts(data)


def _intact(body: memoryview, frame: bool) -> bool:
    if not frame:
        return envelope.digest_matches(body)
    from . import update_frame

    return update_frame.digest_matches(body)


def verify(data: bytes | bytearray | memoryview, keys: Sequence[Ed25519PublicKey], ctx: bytes) -> SignatureVerdict:
    """Check the signature of an envelope or an update frame against each of `keys` (at most a few: rotation
    overlaps two).

    Only the fixed prefix is parsed before the signature is checked, so a forgery costs the receiver one hash
    and at most len(keys) verifications, never a JSON or tensor parse."""
    frame = _is_frame(data)
    try:
        body, signature = _parts(data, frame)
    except EnvelopeError as exc:
        return SignatureVerdict(Refusal.MALFORMED, detail=str(exc))
    if signature is None:
        what = "update frame" if frame else "envelope"
        return SignatureVerdict(Refusal.UNSIGNED, detail=f"the {what} carries no signature")
    if not keys:
        return SignatureVerdict(Refusal.UNKNOWN_SIGNER, detail="no public key is enrolled to check it with")
    message = ctx + bytes(body)
    for i, key in enumerate(keys):
        try:
            key.verify(signature, message)
            return SignatureVerdict(None, key_index=i)
        except InvalidSignature:
            continue
    if _intact(body, frame):
        return SignatureVerdict(Refusal.WRONG_KEY, detail=f"intact, but signed by none of the {len(keys)} enrolled "
                                                          f"key(s) for {_readable(ctx)}")
    return SignatureVerdict(Refusal.TAMPERED, detail="its bytes changed after signing (signature and SHA-256 fail)")
