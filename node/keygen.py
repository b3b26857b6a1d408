"""A site's key pair for Flower SuperNode authentication: EC P-384 in OpenSSH format, the form
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lsdm.atomic import atomic_path
from node.errors import UserError

PRIVATE_NAME = "site_key"


def make_site_key(folder: Path) -> tuple[Path, Path]:
    """Write ``folder/site_key`` (private, mode 600) and ``folder/site_key.pub``; never
    overwrite an existing key."""
    folder = Path(folder)
    private_path, public_path = folder / PRIVATE_NAME, folder / f"{PRIVATE_NAME}.pub"
    if private_path.exists() or public_path.exists():
        raise UserError(
            f"a site key exists already (remove it first to replace it): {private_path}"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(private_path) as tmp:
        tmp.write_bytes(private)
        tmp.chmod(0o600)
    with atomic_path(public_path) as tmp:
        tmp.write_bytes(public + b"\n")
        tmp.chmod(0o644)
    return private_path, public_path
