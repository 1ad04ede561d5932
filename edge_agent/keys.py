"""Signing keys on disk: a device's or the fleet's private key, public keys, and the aggregator's registry of
enrolled devices. The I/O half of signing; the pure half (sign, verify) is `codec.signing`.

Files are PEM: a private key is PKCS#8 (`-----BEGIN PRIVATE KEY-----`, mode 0600), a public key is
SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`). Both are what `openssl genpkey -algorithm ed25519` and
`openssl pkey -pubout` write, so operators can use either tool.

The registry is a directory with one `<device id>.pub` per enrolled device. A file may hold several public
keys (PEM blocks one after another): all of them are accepted, which is how a device's key is rotated
without a gap. Revoking a device moves its file to `revoked/` (kept for the record, never read). The
aggregator rescans the directory when a file in it changes (checked at most once a second) and on SIGHUP,
so enrolment and revocation take effect without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from .codec.signing import key_id
from .fsutil import atomic_write
from .protocol import check_name

log = logging.getLogger("edge_fl.keys")
PUBLIC_SUFFIX = ".pub"
REVOKED_DIR = "revoked"
_PEM_END = b"-----END PUBLIC KEY-----"


class KeyFileError(ValueError):
    """A key file that is missing, unreadable, or not an Ed25519 key of the expected kind."""


def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def write_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write `key` readable by its owner only; an existing file is kept unless `force` (a lost key is a lost
    identity: the device must be enrolled again)."""
    target = Path(path)
    if target.exists() and not force:
        raise KeyFileError(f"{target} already exists; choose another path, or pass --force to replace the key it holds")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable, not even briefly
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_pem(key))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {p} not found; fix the path, or create it (`edge-fl keys new --out FILE` "
                           "writes FILE and FILE.pub)") from None
    except OSError as exc:
        raise KeyFileError(f"{what} {p}: cannot read it ({exc.strerror or exc}); it must be readable by this "
                           "service's user") from None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    data = _read(path, "private key")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"private key {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path}: a {type(key).__name__}, edge-fl signs with Ed25519 keys "
                           "(`edge-fl keys new`)")
    if os.name == "posix" and Path(path).stat().st_mode & 0o077:
        log.warning("private key %s is readable by other users: chmod 600 it", path)
    return key


def parse_public_keys(data: bytes, where: str) -> list[Ed25519PublicKey]:
    """Every PEM public key in `data` (one or more blocks), each Ed25519; KeyFileError otherwise."""
    blocks = [b + _PEM_END for b in data.split(_PEM_END) if b.strip()]
    if not blocks or not data.strip().endswith(_PEM_END):
        raise KeyFileError(f"{where}: no PEM public key (expected -----BEGIN PUBLIC KEY----- blocks; "
                           "`edge-fl keys public KEYFILE` prints one)")
    keys = []
    for i, block in enumerate(blocks):
        try:
            key = load_pem_public_key(block.strip())
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{where}: public key #{i + 1} is not valid PEM ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{where}: public key #{i + 1} is a {type(key).__name__}, not Ed25519")
        keys.append(key)
    return keys


def load_public_keys(path: str | os.PathLike[str]) -> list[Ed25519PublicKey]:
    return parse_public_keys(_read(path, "public key file"), str(path))


def load_fleet_keys(paths: list[str]) -> list[Ed25519PublicKey]:
    """The fleet public keys an agent accepts: every key of every file, in order (current, then next)."""
    return [k for p in paths for k in load_public_keys(p)]


# --- the aggregator's registry -------------------------------------------------------------------------------

def _device_file(directory: Path, device: str) -> Path:
    return directory / f"{check_name('device id', device)}{PUBLIC_SUFFIX}"


def register(directory: str | os.PathLike[str], device: str, public: bytes, *, keep_old: bool = False) -> Path:
    """Enrol `device` with the public key(s) in `public` (PEM). `keep_old` adds them to the keys it already has
    (the overlap of a key rotation); otherwise they replace them (the end of a rotation, or a new device)."""
    d = Path(directory)
    keys = parse_public_keys(public, f"public key for {device}")
    target = _device_file(d, device)
    have: list[Ed25519PublicKey] = []
    if keep_old and target.exists():
        have = load_public_keys(target)
    ids = {key_id(k) for k in have}
    merged = have + [k for k in keys if key_id(k) not in ids]
    text = b"".join(public_pem(k) for k in merged)

    def write(fh: BinaryIO) -> None:
        fh.write(text)

    atomic_write(target, write)
    return target


def revoke(directory: str | os.PathLike[str], device: str, *, now: Callable[[], float] = time.time) -> Path:
    """Stop accepting `device`'s updates: move its file to revoked/ (kept for the record). KeyFileError when
    the device is not enrolled."""
    d = Path(directory)
    source = _device_file(d, device)
    if not source.exists():
        raise KeyFileError(f"device {device!r} is not enrolled in {d} (no {source.name}); nothing to revoke")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now()))
    target = d / REVOKED_DIR / f"{device}.{stamp}{PUBLIC_SUFFIX}"
    target.parent.mkdir(exist_ok=True)
    os.replace(source, target)
    return target


def enrolled(directory: str | os.PathLike[str]) -> dict[str, list[Ed25519PublicKey]]:
    """Every enrolled device's keys; a file that does not parse is logged and skipped (one bad file must not
    lock the whole fleet out)."""
    out: dict[str, list[Ed25519PublicKey]] = {}
    for path in sorted(Path(directory).glob(f"*{PUBLIC_SUFFIX}")):
        device = path.name[: -len(PUBLIC_SUFFIX)]
        try:
            check_name("device id", device)
            out[device] = load_public_keys(path)
        except (KeyFileError, ValueError) as exc:
            log.error("device key registry: skipped %s: %s", path, exc)
    return out


class KeyRegistry:
    """The enrolled devices' public keys, rescanned when the directory changes or on `request_reload()`."""

    def __init__(self, directory: str | os.PathLike[str], *, clock: Callable[[], float] = time.monotonic,
                 min_interval_s: float = 1.0) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise KeyFileError(f"device key registry {self.directory} is not a directory; create it and enrol "
                               f"devices with `edge-fl keys register DEVICE PUBFILE --registry {self.directory}`")
        self.clock, self.min_interval_s = clock, min_interval_s
        self._reload = threading.Event()
        self._keys: dict[str, tuple[Ed25519PublicKey, ...]] = {}
        self._snapshot: tuple[tuple[str, int, int, int], ...] | None = None
        self._checked_at = -float("inf")
        self.refresh(force=True)

    def keys_for(self, device: str) -> tuple[Ed25519PublicKey, ...]:
        return self._keys.get(device, ())

    def __len__(self) -> int:
        return len(self._keys)

    def request_reload(self) -> None:
        """Rescan at the next `refresh()`: safe to call from a signal handler or another thread."""
        self._reload.set()

    def _scan(self) -> tuple[tuple[str, int, int, int], ...]:
        out = []
        for path in self.directory.glob(f"*{PUBLIC_SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:  # removed while we looked
                continue
            out.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(sorted(out))

    def refresh(self, *, force: bool = False) -> bool:
        """Reload if a reload was requested or a file changed (looked at once per `min_interval_s`); True if
        the keys were reloaded."""
        now = self.clock()
        requested = self._reload.is_set()
        if not (force or requested or now - self._checked_at >= self.min_interval_s):
            return False
        self._checked_at = now
        self._reload.clear()
        snapshot = self._scan()
        if snapshot == self._snapshot and not requested and not force:
            return False
        before = set(self._keys)
        self._keys = {d: tuple(k) for d, k in enrolled(self.directory).items()}
        self._snapshot = snapshot
        added, removed = sorted(set(self._keys) - before), sorted(before - set(self._keys))
        log.info("device key registry %s: %d device(s) enrolled%s%s", self.directory, len(self._keys),
                 f"; added {', '.join(added)}" if added and before else "",
                 f"; removed {', '.join(removed)}" if removed else "")
        return True
