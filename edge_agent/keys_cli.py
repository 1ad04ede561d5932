"""`edge-fl keys ...`: make signing keys and keep the aggregator's registry of enrolled devices.

    edge-fl keys new --out /etc/edge-fl/device.key      # on the device: the private key never leaves it
    edge-fl keys public /etc/edge-fl/device.key         # its public key (also written as device.key.pub)
    edge-fl keys register DEVICE device.pub --registry /etc/edge-fl/devices [--keep-old]
    edge-fl keys revoke DEVICE --registry /etc/edge-fl/devices
    edge-fl keys list --registry /etc/edge-fl/devices

Failures (a missing file, a key that does not parse) exit 1 with one line; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REGISTRY_HELP = "the aggregator's device key registry: a directory of <device id>.pub ([signing] registry)"


def cmd_keys(args: argparse.Namespace) -> int:
    from . import keys
    from .codec.signing import key_id

    if args.keys_command == "new":
        key = keys.new_private_key()
        keys.write_private_key(key, args.out, force=args.force)
        pub = Path(f"{args.out}.pub")
        pub.write_bytes(keys.public_pem(key.public_key()))
        print(f"wrote {args.out} (private: keep it on this machine, mode 0600) and {pub} (public); key id "
              f"{key_id(key.public_key())}")
        print(f"enrol a device on the aggregator with: edge-fl keys register DEVICE {pub.name} --registry DIR")
    elif args.keys_command == "public":
        data = Path(args.file).read_bytes()
        if b"PRIVATE KEY" in data:
            sys.stdout.write(keys.public_pem(keys.load_private_key(args.file).public_key()).decode())
        else:
            for k in keys.load_public_keys(args.file):
                sys.stdout.write(keys.public_pem(k).decode())
    elif args.keys_command == "register":
        target = keys.register(args.registry, args.device, Path(args.pubfile).read_bytes(), keep_old=args.keep_old)
        ids = ", ".join(key_id(k) for k in keys.load_public_keys(target))
        print(f"enrolled {args.device} in {target} (accepted key(s): {ids}); a running aggregator picks it up "
              "within a second")
    elif args.keys_command == "revoke":
        moved = keys.revoke(args.registry, args.device)
        print(f"revoked {args.device}: its updates are refused from now on (the key is kept in {moved})")
    else:
        for device, ks in keys.enrolled(args.registry).items():
            print(f"{device}\t{', '.join(key_id(k) for k in ks)}")
    return 0


def add_parsers(sub: Any) -> None:
    """`edge-fl keys new|public|register|revoke|list`."""
    p = sub.add_parser("keys", help="signing keys of devices and the fleet, and the registry of enrolled devices",
                       description="Ed25519 keys that sign updates (each device's) and round tasks and global "
                                   "models (the fleet's). See deploy/README.md, 'Keys', for enrolment and rotation.")
    p.set_defaults(func=cmd_keys)
    kinds = p.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    new = kinds.add_parser("new", help="create a private key (and FILE.pub, its public key)")
    new.add_argument("--out", required=True, metavar="FILE", help="where to write the private key (mode 0600)")
    new.add_argument("--force", action="store_true", help="replace an existing key (its identity is lost)")
    public = kinds.add_parser("public", help="print the public key of a private (or public) key file")
    public.add_argument("file", metavar="FILE")
    register = kinds.add_parser("register", help="enrol a device's public key (replaces its keys unless --keep-old)")
    register.add_argument("device", metavar="DEVICE", help="the device id (its [signing]'d updates name it)")
    register.add_argument("pubfile", metavar="PUBFILE", help="the device's public key, PEM")
    register.add_argument("--registry", required=True, metavar="DIR", help=REGISTRY_HELP)
    register.add_argument("--keep-old", action="store_true",
                          help="add the key beside the device's current one(s): the overlap of a key rotation")
    revoke = kinds.add_parser("revoke", help="stop accepting a device's updates (its key file moves to revoked/)")
    revoke.add_argument("device", metavar="DEVICE")
    revoke.add_argument("--registry", required=True, metavar="DIR", help=REGISTRY_HELP)
    listing = kinds.add_parser("list", help="the enrolled devices and their key ids")
    listing.add_argument("--registry", required=True, metavar="DIR", help=REGISTRY_HELP)
