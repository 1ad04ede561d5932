"""SHA-256 without OpenSSL, resolved once.

`hashlib` loads OpenSSL's libcrypto: 3.7 MB of resident memory on a device whose whole budget is 50 MB,
to hash a 33 KB model or a 3 KB update. CPython's builtin implementation is enough for that.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol


class Hasher(Protocol):
    """The part of a hashlib object we use."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...


def _resolve() -> Callable[[], Hasher]:
    for module in ("_sha2", "_sha256"):  # CPython >= 3.12, <= 3.11
        try:
            # A private module imported by name has no static type: this annotation states what it is.
            factory: Callable[[], Hasher] = importlib.import_module(module).sha256
            return factory
        except ImportError:
            pass
    import hashlib  # other interpreters

    return hashlib.sha256


sha256: Callable[[], Hasher] = _resolve()


def shake_256(data: bytes, nbytes: int) -> bytes:
    """SHAKE-256 of `data`, `nbytes` long: CPython's builtin _sha3 (no OpenSSL), else hashlib's."""
    out: bytes = _SHAKE(data).digest(nbytes)
    return out


def _resolve_shake() -> Callable[[bytes], Any]:
    try:
        factory: Callable[[bytes], Any] = importlib.import_module("_sha3").shake_256
        return factory
    except (ImportError, AttributeError):
        import hashlib

        return hashlib.shake_256


_SHAKE = _resolve_shake()
