"""Key material of a coordinator and of a site, made with ``cryptography``.

- A certificate authority (self-signed, EC P-384) whose certificate sites are given as ``ca.pem``.
- A server certificate for the names and addresses the coordinator serves (always including
  ``localhost`` and ``127.0.0.1``, where the SuperLink itself listens behind the fleet gateway).
- An Ed25519 key for signing generator bundles.
- Checking a site's public key (made by ``lsdm-node keygen``) before it is registered.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lsdm.atomic import atomic_path
from lsdm.errors import InputError

CERT_DAYS = 825  # the longest lifetime clients commonly accept for a server certificate


def _write_private(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        tmp.chmod(0o600)


def _write_public(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        tmp.chmod(0o644)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        try:
            names.append(x509.DNSName(host))
        except ValueError:  # cryptography takes ASCII (A-label) names only
            raise InputError(f"host {host!r}: not an IP address or an ASCII host name") from None
    return names


def make_tls(folder: Path, federation: str, hosts: list[str]) -> None:
    """Write ``ca.pem``, ``ca.key``, ``server.pem`` and ``server.key`` into ``folder``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Med-LSDM CA {federation}")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(folder / "ca.key", _pem_key(ca_key))
    _write_public(folder / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / "server.key", _pem_key(server_key))
    _write_public(folder / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))


def make_signing_key(path: Path) -> None:
    """An Ed25519 key (PKCS#8 PEM) for signing generator bundles; its public half beside it."""
    key = ed25519.Ed25519PrivateKey.generate()
    _write_private(path, _pem_key(key))
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_public(path.with_suffix(".pub.pem"), public)


def read_site_public_key(path: Path) -> bytes:
    """The OpenSSH public key in ``path``, checked to be an EC key; raises :class:`InputError`."""
    data = Path(path).read_bytes().strip()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise InputError(f"{path}: not an OpenSSH public key (see lsdm-node keygen)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InputError(f"{path}: a site key must be an EC key in OpenSSH format")
    return data + b"\n"
