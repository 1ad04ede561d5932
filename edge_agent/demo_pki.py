"""The secure demo's throwaway identities: a fleet CA with TLS certificates, and Ed25519 signing keys.

`edge-fl demo` (without `--plain`) runs its fleet the way SECURITY.md says a production fleet runs: mutual TLS
against broker_config/mosquitto-prod.conf with broker_config/acl.example, and every update, task and model
signed. This module makes what that needs, in one directory of the demo's work directory (mode 0700, kept or
removed with the logs):

    ca.crt, ca.key, crl.pem                 the fleet CA and its (empty) revocation list
    broker.crt, broker.key                  the broker's certificate, for the address clients connect to
    clients/NAME.crt, clients/NAME.key      one per process: the aggregator, each agent, the demo's watcher
    fleet.key, fleet.pub                    the aggregator's signing key (tasks, models) and what agents trust
    devices/DEVICE.pub, keys/DEVICE.key     the registry of enrolled devices, and each device's signing key
    mosquitto.conf, acl                     the production config and ACL with these paths filled in

Certificates carry the extensions scripts/fleet-ca gives them (same CN = identity rule, EC P-256 keys) and are
made with the `cryptography` package edge-fl already depends on for signatures: the demo must run from an
installed wheel, which has neither scripts/ nor necessarily openssl. They are valid for one day.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import keys
from .messaging import TlsOptions
from .protocol import check_name
from .resources import broker_config

#: The demo's watcher: reads telemetry and status, writes nothing (its ACL block is added to the shipped ACL).
MONITOR = "demo-monitor"
AGGREGATOR = "aggregator"  # the identity acl.example grants the aggregator's topics to
_VALIDITY = dt.timedelta(days=1)
_CLOCK_SKEW = dt.timedelta(minutes=5)

# Appended to acl.example: the watcher may read per-device telemetry and the fleet status, nothing else. The
# shipped patterns would let it write as a device named "demo-monitor": deny those topics (deny wins).
MONITOR_ACL = f"""
# --- edge-fl demo (rendered by edge_agent.demo_pki): the demo's watcher only reads telemetry and status ---
user {MONITOR}
topic read edgefl/+/telemetry/+
topic read edgefl/+/status
topic deny edgefl/+/update/#
topic deny edgefl/+/presence/#
topic deny edgefl/+/telemetry/{MONITOR}
"""


@dataclass(frozen=True)
class DemoPki:
    directory: Path
    host: str

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def tls(self, name: str) -> TlsOptions:
        """What `name`'s broker link takes: the fleet CA, and its own certificate and key."""
        d = self.directory / "clients"
        return TlsOptions(str(self.ca_file), str(d / f"{name}.crt"), str(d / f"{name}.key"))

    @property
    def fleet_key(self) -> Path:
        return self.directory / "fleet.key"

    @property
    def fleet_pub(self) -> Path:
        return self.directory / "fleet.pub"

    @property
    def registry(self) -> Path:
        return self.directory / "devices"

    def device_key(self, device: str) -> Path:
        return self.directory / "keys" / f"{device}.key"

    @property
    def broker_config(self) -> Path:
        return self.directory / "mosquitto.conf"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from the first byte
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class _Ca:
    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.now = dt.datetime.now(dt.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        self.name = _name("edge-fl demo fleet CA (throwaway)")
        self.cert = (self._builder(self.name, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                    critical=True)
                     .add_extension(ski, critical=False)
                     .sign(self.key, hashes.SHA256()))
        _write_key(self.key, directory / "ca.key")
        _write_cert(self.cert, directory / "ca.crt")
        crl = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
               .last_update(self.now - _CLOCK_SKEW).next_update(self.now + _VALIDITY)
               .add_extension(self.aki, critical=False)
               .sign(self.key, hashes.SHA256()))
        (directory / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(self.now - _CLOCK_SKEW).not_valid_after(self.now + _VALIDITY))

    def issue(self, cn: str, crt: Path, key_path: Path, *, server_ip: str | None = None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = (x509.KeyUsage(True, False, server_ip is not None, False, False, False, False, False, False))
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server_ip is not None else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (self._builder(_name(cn), key.public_key())
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(usage, critical=True)
             .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(self.aki, critical=False))
        if server_ip is not None:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(server_ip))]),
                                critical=False)
        _write_key(key, key_path)
        _write_cert(b.sign(self.key, hashes.SHA256()), crt)


def make_demo_pki(directory: Path, devices: list[str], host: str = "127.0.0.1", *,
                  extra_clients: tuple[str, ...] = (), extra_acl: str = "") -> DemoPki:
    """Create everything the module docstring lists for `devices` (device ids) on a broker at `host` (an IP).

    `extra_clients` get a certificate only (no signing key); `extra_acl` is appended to the ACL for them (the
    benchmarks' publishers, which speak for many simulated devices)."""
    for d in (*devices, *extra_clients):
        check_name("identity", d)
    directory.mkdir(mode=0o700, parents=True)
    for sub in ("clients", "devices", "keys"):
        (directory / sub).mkdir(mode=0o700)
    ca = _Ca(directory)
    ca.issue(host, directory / "broker.crt", directory / "broker.key", server_ip=host)
    for name in (AGGREGATOR, MONITOR, *devices, *extra_clients):
        ca.issue(name, directory / "clients" / f"{name}.crt", directory / "clients" / f"{name}.key")
    pki = DemoPki(directory, host)
    fleet = keys.new_private_key()
    keys.write_private_key(fleet, pki.fleet_key)
    pki.fleet_pub.write_bytes(keys.public_pem(fleet.public_key()))
    for d in devices:
        device_key = keys.new_private_key()
        keys.write_private_key(device_key, pki.device_key(d))
        keys.register(pki.registry, d, keys.public_pem(device_key.public_key()))
    _render_broker_config(pki, extra_acl)
    return pki


def _render_broker_config(pki: DemoPki, extra_acl: str) -> None:
    """mosquitto-prod.conf and acl.example as shipped, with the paths of this PKI (LocalBroker then replaces the
    listener, persistence and log lines)."""
    acl = pki.directory / "acl"
    acl.write_text(broker_config("acl.example").read_text() + MONITOR_ACL + extra_acl)
    d = pki.directory
    paths = {"cafile": d / "ca.crt", "certfile": d / "broker.crt", "keyfile": d / "broker.key",
             "crlfile": d / "crl.pem", "acl_file": acl}
    lines = []
    for line in broker_config("mosquitto-prod.conf").read_text().splitlines():
        words = line.split(maxsplit=1)
        lines.append(f"{words[0]} {paths[words[0]]}" if words and words[0] in paths else line)
    missing = set(paths) - {line.split(maxsplit=1)[0] for line in lines if line.strip()}
    if missing:  # the shipped config changed: a demo without these would not be the production setup
        raise RuntimeError(f"{broker_config('mosquitto-prod.conf')} no longer sets {sorted(missing)}")
    pki.broker_config.write_text("\n".join(lines) + "\n")
