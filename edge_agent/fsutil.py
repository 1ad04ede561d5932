"""File helpers: atomic replacement (a reader sees the old file or the new one, never half of either), and
the SHA-256 of a file read in blocks."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .codec.digest import sha256

_counter = itertools.count()


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, durable: bool = True) -> None:
    """Write via a temp file in the same directory, fsync it, rename over `path`, fsync the directory.

    `durable=False` skips the fsyncs, for caches that can be recomputed after a power cut.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with O_EXCL; `tempfile` would import random, shutil, bz2 and lzma for this.
    tmp = str(target.parent / f".{target.name}.{os.getpid()}.{next(_counter)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read 1 MiB at a time (a model or a wheel never sits in memory whole)."""
    digest = sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
