"""SHA-256 without OpenSSL, resolved once.

`hashlib` loads OpenSSL's libcrypto: 3.7 MB of resident memory on a device whose whole budget is 50 MB,
to hash a 33 KB model or a 3 KB update. CPython's builtin implementation is enough for that.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def _resolve() -> Callable[[], Any]:
    for module in ("_sha2", "_sha256"):  # CPython >= 3.12, <= 3.11
        try:
            return importlib.import_module(module).sha256  # type: ignore[no-any-return]
        except ImportError:
            pass
    import hashlib  # other interpreters

    return hashlib.sha256


sha256: Callable[[], Any] = _resolve()
