"""`edge-fl enrol`: a device's TLS identity, made on the device so that its private key never travels.

    edge-fl enrol DEVICE_ID --dir /etc/edge-fl/tls      # writes DEVICE_ID.key (0600) and DEVICE_ID.csr

The CSR (certificate signing request) names only ``CN=<device id>``: the broker takes the certificate's CN as
the MQTT username and client id, and the ACL grants topics by it. Copy the CSR to the fleet CA, sign it there
(``scripts/fleet-ca sign DEVICE_ID.csr``), and bring back ``DEVICE_ID.crt`` and ``ca.crt``; then point
``[broker.tls]`` at the three files. Renewing: enrol again with ``--force`` (a new key) and sign the new CSR.

Exit codes: 0 done, 1 a file could not be written (or exists without --force), 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .protocol import check_name


class EnrolError(RuntimeError):
    """The key or the CSR could not be written."""


def make_key_and_csr(device_id: str, directory: str | Path, *, password: bytes | None = None,
                     force: bool = False) -> tuple[Path, Path]:
    """Create ``DEVICE_ID.key`` (EC P-256, PKCS#8 PEM, mode 0600) and ``DEVICE_ID.csr`` in ``directory``.

    Parameters
    ----------
    device_id
        The identity: letters, digits, ``.``, ``_`` and ``-`` (it becomes a topic level).
    password
        Encrypt the key with it (then set ``[broker.tls] key_password_file``).
    force
        Replace an existing key (the old certificate then no longer matches it).

    Raises
    ------
    ValueError
        ``device_id`` is not a valid identity.
    EnrolError
        A file exists (without ``force``) or cannot be written.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    check_name("device id", device_id)
    folder = Path(directory)
    key_path, csr_path = folder / f"{device_id}.key", folder / f"{device_id}.csr"
    key = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
        # 0600 from the first byte: the key is never readable by others, not even for a moment.
        fd = os.open(key_path, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # an existing file replaced with --force keeps its old mode otherwise
            f.write(pem)
        csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    except FileExistsError:
        raise EnrolError(f"{key_path} exists: this device already has a key; use --force to replace it (its "
                         f"certificate then has to be signed again)") from None
    except OSError as exc:
        raise EnrolError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    return key_path, csr_path


def cmd_enrol(args: argparse.Namespace) -> int:
    try:
        check_name("device id", args.device_id)
    except ValueError as exc:
        print(f"edge-fl enrol: {exc}", file=sys.stderr)
        return 2
    password: bytes | None = None
    if args.key_password_file:
        try:
            password = Path(args.key_password_file).read_text().rstrip("\r\n").encode()
        except OSError as exc:
            raise EnrolError(f"cannot read {args.key_password_file}: {exc.strerror or exc}") from None
        if not password:
            raise EnrolError(f"{args.key_password_file} is empty: write the key's passphrase into it")
    key_path, csr_path = make_key_and_csr(args.device_id, args.dir, password=password, force=args.force)
    print(f"wrote {key_path} (private: stays on this device, mode 0600) and {csr_path}")
    print(f"next: on the fleet CA, `scripts/fleet-ca sign {csr_path.name}`; bring back {args.device_id}.crt and "
          f"ca.crt, and set [broker.tls] ca_file, cert_file = \"{csr_path.with_suffix('.crt')}\", "
          f"key_file = \"{key_path}\"")
    return 0


def add_parser(sub: Any) -> None:
    """`edge-fl enrol DEVICE_ID [--dir DIR] [--key-password-file FILE] [--force]`."""
    p = sub.add_parser("enrol", help="create this device's TLS key and a certificate signing request (CSR)",
                       description="Create this device's private key (never leaves the device) and a CSR for "
                                   "scripts/fleet-ca sign. See SECURITY.md.")
    p.add_argument("device_id", metavar="DEVICE_ID", help="the device id: the certificate's CN and MQTT identity")
    p.add_argument("--dir", default=".", metavar="DIR", help="where to write DEVICE_ID.key and DEVICE_ID.csr "
                                                             "(default: the current directory)")
    p.add_argument("--key-password-file", metavar="FILE", help="encrypt the key with the passphrase in FILE")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_enrol)
