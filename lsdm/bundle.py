"""The generator bundle: one signed file holding what generation needs, and where it came from.

Format (``med-lsdm-generator-bundle``, version 1): a standard safetensors file.

- Tensors: ``vqgan/codebook`` (the quantiser's code vectors), ``vqgan/latent_low`` and
  ``vqgan/latent_high`` (the latent scaling), ``vqgan/decoder/<param>`` (the VQ-GAN decoder),
  ``unet/<param>`` (the diffusion UNet's EMA weights). Nothing else: no encoder, no
  discriminator, no training-time UNet, no optimiser state.
- Header metadata: ``manifest``, a JSON document (format, configuration, label vocabulary,
  provenance, the signer's key fingerprint), and ``signature``, 128 hex digits.
- The signature is Ed25519 by the coordinator's key over
  ``b"med-lsdm generator bundle v1\\n" + SHA-256(file)``, where ``file`` is the whole file with
  the 128 signature digits replaced by 128 ``0`` characters. Every byte of the file other than
  the signature itself (header length, header, padding, manifest, every weight, anything appended)
  is therefore covered, and a change to the signature digits breaks the signature.

No pickle anywhere: safetensors and JSON only. A bundle is checked completely before any of it is
used; every problem is a :class:`BundleError` (an :class:`~lsdm.errors.InputError`: one line).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from lsdm.atomic import atomic_path
from lsdm.checkpoint import file_sha256
from lsdm.config import LSDMConfig
from lsdm.diffusion import build_ldm, load_ldm
from lsdm.errors import InputError
from lsdm.generate import Generator, generation_tensors
from lsdm.phases import PerPhase
from lsdm.vqgan import VQGAN, load_vqgan

FORMAT = "med-lsdm-generator-bundle"
FORMAT_VERSION = 1
DOMAIN = b"med-lsdm generator bundle v1\n"
SIGNATURE_HEX = 128  # an Ed25519 signature is 64 bytes
PLACEHOLDER = "0" * SIGNATURE_HEX
BUNDLE_NAME = "generator.lsdm"  # what the coordinator (in state/) and sites store it as


class BundleError(InputError):
    """A bundle that must not be used: unreadable, unsigned, modified, or signed by another key."""


class DPBudget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(ge=0)
    delta: float = Field(ge=0, lt=1)


class Provenance(BaseModel):
    """Where the generator came from. ``dp``: per site its (ε, δ), or ``"none"`` for a site that
    trained without differential privacy; ``"none"`` alone when no site did (or nothing says)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: str = Field(min_length=1)
    sites: int = Field(ge=1, description="sites that contributed to the shared models")
    site_names: list[str] = Field(default_factory=list)
    rounds: PerPhase
    dp: dict[str, DPBudget | Literal["none"]] | Literal["none"] = "none"
    dp_accounting: Literal["site-reported"] = Field(
        "site-reported",
        description="every (ε, δ) in dp is what its site reported: the coordinator checked it "
        "against the federation's max_epsilon, the budget the site planned its noise for and "
        "the site's earlier reports, but cannot recompute it (that needs the site's data)",
    )
    software_version: str = Field(default_factory=lambda: software_version())
    created_at: str = Field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["med-lsdm-generator-bundle"] = FORMAT
    format_version: int = FORMAT_VERSION
    config: LSDMConfig
    labels: dict[int, str]
    provenance: Provenance
    source: dict[str, Any] = Field(
        default_factory=dict, description="SHA-256 and steps of the checkpoints it was made from"
    )
    signer: dict[str, str]

    @property
    def worst_epsilon(self) -> float:
        """The largest ε of any site; infinite when any site trained without DP."""
        dp = self.provenance.dp
        if dp == "none" or not dp or any(b == "none" for b in dp.values()):
            return float("inf")
        return max(b.epsilon for b in dp.values())


def software_version() -> str:
    try:
        return f"med-lsdm {version('med-lsdm')}"
    except PackageNotFoundError:
        return "med-lsdm (not installed)"


# -- keys ------------------------------------------------------------------------------------------
def _load_ed25519_key(path: Path, private: bool, what: str):
    kind = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror}") from None
    except (ValueError, TypeError):
        raise InputError(f"not a PEM {kind} key: {path}") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise InputError(f"{what} must be an Ed25519 {kind} key: {path}")
    return key


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    return _load_ed25519_key(path, True, "the signing key")


def load_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    return _load_ed25519_key(path, False, "the coordinator key")


def key_fingerprint(key: ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey) -> str:
    """SHA-256 of the raw 32-byte public key, hex."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _as_public(key) -> ed25519.Ed25519PublicKey:
    return load_public_key(key) if isinstance(key, str | Path) else key


def _as_private(key) -> ed25519.Ed25519PrivateKey:
    return load_private_key(key) if isinstance(key, str | Path) else key


# -- the signed byte layout ------------------------------------------------------------------------
def _header(data: bytes) -> tuple[dict, int]:
    """The safetensors header (parsed) and where the tensor data starts."""
    if len(data) < 8:
        raise BundleError("not a generator bundle: the file is too short")
    length = int.from_bytes(data[:8], "little")
    if length < 2 or 8 + length > len(data):
        raise BundleError("not a generator bundle, or a damaged one: bad header length")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleError("damaged generator bundle: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise BundleError("damaged generator bundle: the header is not a JSON object")
    return header, 8 + length


def _signature_slot(data: bytes, signature: str, header_end: int) -> tuple[int, int]:
    needle = b'"signature":"' + signature.encode("ascii") + b'"'
    header = data[:header_end]
    start = header.find(needle)
    if start < 0 or header.find(needle, start + 1) >= 0:
        raise BundleError("damaged generator bundle: the signature field cannot be located")
    first = start + len(b'"signature":"')
    return first, first + SIGNATURE_HEX


def _digest(data: bytes, slot: tuple[int, int]) -> bytes:
    view = memoryview(data)
    h = hashlib.sha256()
    h.update(view[: slot[0]])
    h.update(PLACEHOLDER.encode("ascii"))
    h.update(view[slot[1] :])
    return DOMAIN + h.digest()


def sign_bytes(data: bytes, signing_key) -> bytes:
    """Sign an unsigned bundle (its signature field holds the placeholder); returns the file."""
    key = _as_private(signing_key)
    _, header_end = _header(data)
    slot = _signature_slot(data, PLACEHOLDER, header_end)
    signature = key.sign(_digest(data, slot)).hex()
    return data[: slot[0]] + signature.encode("ascii") + data[slot[1] :]


def verify_bytes(data: bytes, public_key) -> Manifest:
    """Check a bundle held in memory; returns its manifest or raises :class:`BundleError`."""
    key = _as_public(public_key)
    header, header_end = _header(data)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or "manifest" not in metadata:
        raise BundleError("not a generator bundle: no manifest in the header")
    signature = metadata.get("signature")
    if signature is None or signature == PLACEHOLDER:
        raise BundleError("unsigned generator bundle: it carries no signature")
    if (
        not isinstance(signature, str)
        or len(signature) != SIGNATURE_HEX
        or any(c not in "0123456789abcdef" for c in signature)
    ):
        raise BundleError("damaged generator bundle: the signature is not 128 hex digits")
    slot = _signature_slot(data, signature, header_end)
    try:
        key.verify(bytes.fromhex(signature), _digest(data, slot))
    except InvalidSignature:
        signer = _claimed_signer(metadata["manifest"])
        expected = key_fingerprint(key)
        if signer is not None and signer != expected:
            raise BundleError(
                f"the bundle is signed by another key (fingerprint {signer[:16]}…), not by this "
                f"coordinator key ({expected[:16]}…)"
            ) from None
        raise BundleError(
            "the bundle was modified after signing: its signature does not match its contents"
        ) from None
    try:
        manifest = Manifest.model_validate_json(metadata["manifest"])
    except ValidationError as err:
        first = str(err).splitlines()[0]
        raise BundleError(f"unsupported generator bundle manifest: {first}") from None
    return manifest


def _claimed_signer(manifest_text: Any) -> str | None:
    try:
        return str(json.loads(manifest_text)["signer"]["public_key_sha256"])
    except (ValueError, KeyError, TypeError):
        return None


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise BundleError(f"not a generator bundle (a folder): {path}") from None
    except OSError as err:
        raise BundleError(f"cannot read the bundle {path}: {err.strerror}") from None


def verify_bundle(path: Path, public_key) -> Manifest:
    """Check the bundle file at ``path`` against the coordinator's public key (an
    ``Ed25519PublicKey`` or a PEM file); returns its manifest or raises :class:`BundleError`
    naming what is wrong."""
    try:
        return verify_bytes(_read(path), public_key)
    except BundleError as err:
        raise BundleError(f"{path}: {err}") from None


# -- building --------------------------------------------------------------------------------------
def build_bundle_bytes(
    vqgan_ckpt: Path, ldm_ckpt: Path, provenance: Provenance, signing_key
) -> bytes:
    key = _as_private(signing_key)
    ldm, config, labels, ldm_meta = load_ldm(ldm_ckpt)
    vqgan_hash = file_sha256(vqgan_ckpt)
    if ldm_meta.get("vqgan_sha256") != vqgan_hash:
        raise InputError(f"the diffusion model was trained against another VQ-GAN: {vqgan_ckpt}")
    vqgan, vqgan_config = load_vqgan(vqgan_ckpt)
    if vqgan_config.vqgan != config.vqgan:
        raise InputError(f"the VQ-GAN settings of {vqgan_ckpt} and {ldm_ckpt} differ")
    manifest = Manifest(
        config=config,
        labels=labels,
        provenance=provenance,
        source={
            "vqgan_sha256": vqgan_hash,
            "ldm_sha256": file_sha256(ldm_ckpt),
            "ldm_step": ldm_meta.get("step"),
        },
        signer={"algorithm": "Ed25519", "public_key_sha256": key_fingerprint(key)},
    )
    unsigned = save_tensors(
        generation_tensors(vqgan, ldm),
        metadata={"manifest": manifest.model_dump_json(), "signature": PLACEHOLDER},
    )
    return sign_bytes(unsigned, key)


def build_bundle(
    vqgan_ckpt: Path, ldm_ckpt: Path, provenance: Provenance, signing_key, out: Path
) -> Path:
    """Write the signed bundle of two checkpoints (``lsdm train`` or a federation's export) to
    ``out``, atomically. ``signing_key``: an ``Ed25519PrivateKey`` or a PEM file."""
    data = build_bundle_bytes(Path(vqgan_ckpt), Path(ldm_ckpt), provenance, signing_key)
    with atomic_path(Path(out)) as tmp:
        tmp.write_bytes(data)
    return Path(out)


# -- loading ---------------------------------------------------------------------------------------
@dataclass
class Bundle:
    manifest: Manifest
    generator: Generator


def _models_from(tensors: dict[str, torch.Tensor], manifest: Manifest):
    config, labels = manifest.config, manifest.labels
    vqgan = VQGAN(config.vqgan)
    ldm = build_ldm(config, len(labels))
    decoder = {k[len("vqgan/decoder/") :]: v for k, v in tensors.items() if "/decoder/" in k}
    unet = {k[len("unet/") :]: v for k, v in tensors.items() if k.startswith("unet/")}
    known = {"vqgan/codebook", "vqgan/latent_low", "vqgan/latent_high"}
    stray = [k for k in tensors if k not in known and "/decoder/" not in k and "unet/" not in k]
    if stray or not known <= set(tensors):
        raise BundleError(f"the bundle's tensors do not fit its configuration: {stray[:3]}")
    try:
        vqgan.autoencoder.decoder.load_state_dict(decoder, strict=True)
        ldm.ema.module.load_state_dict(unet, strict=True)
        with torch.no_grad():
            for name, target in (
                ("codebook", vqgan.codebook),
                ("latent_low", vqgan.latent_low),
                ("latent_high", vqgan.latent_high),
            ):
                value = tensors[f"vqgan/{name}"]
                if value.shape != target.shape:
                    raise RuntimeError(f"{name}: shape {tuple(value.shape)}")
                target.copy_(value)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise BundleError(f"the bundle's weights do not fit its configuration: {first}") from None
    # the training-time UNet is never used to sample; share the EMA weights instead of a copy
    ldm.unet = ldm.ema.module
    return vqgan, ldm


def open_bundle_bytes(data: bytes, public_key, device: torch.device | str = "cpu") -> Bundle:
    manifest = verify_bytes(data, public_key)
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as err:
        raise BundleError(f"damaged generator bundle: {err}") from None
    vqgan, ldm = _models_from(tensors, manifest)
    return Bundle(manifest, Generator(vqgan, ldm, manifest.config, manifest.labels, device))


def load_bundle(path: Path, public_key, device: torch.device | str | None = None) -> Bundle:
    """Verify, then load: the manifest and a ready :class:`~lsdm.generate.Generator`. The file
    is read once, so what is verified is what is loaded."""
    from lsdm.training import default_device

    try:
        return open_bundle_bytes(_read(path), public_key, device or default_device())
    except BundleError as err:
        raise BundleError(f"{path}: {err}") from None


def load_generator(path: Path, public_key, device: torch.device | str | None = None) -> Generator:
    return load_bundle(path, public_key, device).generator


def store_bundle(bundle_bytes: bytes, pinned_key, dest: Path) -> Manifest:
    """Site side of the hand-out: verify ``bundle_bytes`` against the coordinator key pinned at
    join time, then write them to ``dest`` atomically (nothing is written if the check fails)."""
    manifest = verify_bytes(bundle_bytes, pinned_key)
    with atomic_path(Path(dest)) as tmp:
        tmp.write_bytes(bundle_bytes)
    return manifest
