"""The signed generator bundle: sign -> verify, every kind of damage refused, the same volumes as
the checkpoints it was made from, the site-side store, and the verify/publish commands."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from typer.testing import CliRunner

from lsdm.bundle import (
    PLACEHOLDER,
    BundleError,
    Provenance,
    build_bundle,
    load_generator,
    store_bundle,
    verify_bundle,
    verify_bytes,
)
from lsdm.checkpoint import (
    checkpoint_identity,
    file_sha256,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from lsdm.diffusion import build_ldm
from lsdm.generate import Generator
from lsdm.phases import PerPhase
from lsdm.vqgan import VQGAN
from node.cli import app as node_app
from server.cli import app as server_app
from tests.helpers import small_config

LABELS = {0: "background", 1: "fat", 2: "fibroglandular", 3: "vessel", 4: "lesion"}


def _write_pem(key: ed25519.Ed25519PrivateKey, folder):
    private = folder / "signing.key"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = folder / "signing.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def make_checkpoints(folder, seed: int = 0):
    """Untrained tiny VQ-GAN and LDM checkpoints (fast; the signature does not care)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = small_config(10)
    torch.manual_seed(seed)
    vqgan, ldm = VQGAN(config.vqgan), build_ldm(config, len(LABELS))
    identity = checkpoint_identity(config, LABELS)
    vqgan_path, ldm_path = folder / "vqgan.safetensors", folder / "ldm.safetensors"
    save_checkpoint(vqgan_path, {"vqgan": vqgan}, None, {"kind": "vqgan", "step": 0, **identity})
    save_checkpoint(
        ldm_path,
        {"ldm": ldm},
        None,
        {"kind": "ldm", "step": 0, "vqgan_sha256": file_sha256(vqgan_path), **identity},
    )
    return vqgan_path, ldm_path


PROVENANCE = Provenance(
    federation="test-federation",
    sites=2,
    site_names=["a", "b"],
    rounds=PerPhase(vqgan=3, diffusion=4),
    dp={"a": {"epsilon": 7.5, "delta": 1e-5}, "b": {"epsilon": 8.0, "delta": 1e-5}},
)


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = _write_pem(key, root)
    vqgan, ldm = make_checkpoints(root / "ckpt")
    path = build_bundle(vqgan, ldm, PROVENANCE, private, root / "generator.lsdm-bundle")
    return {"path": path, "key": key, "public": public, "root": root, "vqgan": vqgan, "ldm": ldm}


def test_sign_then_verify_passes_and_holds_only_generation_weights(signed):
    manifest = verify_bundle(signed["path"], signed["public"])
    assert manifest.provenance.federation == "test-federation"
    assert manifest.provenance.sites == 2
    assert manifest.provenance.rounds.diffusion == 4
    assert manifest.provenance.dp["b"].epsilon == 8.0
    assert manifest.provenance.dp_accounting == "site-reported"  # said plainly, in the signed part
    assert manifest.worst_epsilon == 8.0
    assert manifest.provenance.software_version.startswith("med-lsdm")
    assert manifest.provenance.created_at.endswith("+00:00")
    assert manifest.labels == LABELS
    assert manifest.source["ldm_sha256"] == file_sha256(signed["ldm"])
    with safe_open(str(signed["path"]), framework="pt") as f:  # a plain safetensors file
        keys = list(f.keys())
        assert json.loads(f.metadata()["manifest"])["format"] == "med-lsdm-generator-bundle"
    assert {k.split("/")[0] for k in keys} == {"vqgan", "unet"}
    assert not any(
        word in k for k in keys for word in ("encoder", "discriminator", "optim", "ema_")
    )
    assert {"vqgan/codebook", "vqgan/latent_low", "vqgan/latent_high"} <= set(keys)


def _positions(data: bytes) -> dict[str, int]:
    header_end = 8 + int.from_bytes(data[:8], "little")
    return {
        "header length": 0,
        "header start": 8,
        "manifest (federation name)": data.index(b"test-federation"),
        "manifest (epsilon)": data.index(b"7.5"),
        "manifest (signer)": data.index(b"public_key_sha256") + 30,
        "signature": data.index(b'"signature":"') + 20,
        "header padding end": header_end - 1,
        "first weight byte": header_end,
        "middle weight byte": (header_end + len(data)) // 2,
        "last byte": len(data) - 1,
    }


def test_one_flipped_byte_anywhere_is_refused(signed):
    data = signed["path"].read_bytes()
    public = signed["key"].public_key()
    rng = np.random.default_rng(0)
    positions = list(_positions(data).items())
    positions += [(f"random {i}", int(i)) for i in rng.integers(0, len(data), 30)]
    for where, position in positions:
        for flip in (0x01, 0xFF):
            damaged = bytearray(data)
            damaged[position] ^= flip
            with pytest.raises(BundleError):
                verify_bytes(bytes(damaged), public)
            assert where  # (named, for a failing assert's message)
    with pytest.raises(BundleError, match="modified after signing"):
        verify_bytes(data + b"\0", public)


def test_flipped_weight_byte_is_refused_on_load(signed, tmp_path):
    data = bytearray(signed["path"].read_bytes())
    data[_positions(bytes(data))["middle weight byte"]] ^= 0x10
    damaged = tmp_path / "damaged.lsdm-bundle"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="modified after signing") as info:
        load_generator(damaged, signed["public"], "cpu")
    assert str(damaged) in str(info.value) and "\n" not in str(info.value)


def test_wrong_key_is_refused(signed):
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(BundleError, match="signed by another key"):
        verify_bundle(signed["path"], other)


def test_missing_signature_is_refused(signed, tmp_path):
    with safe_open(str(signed["path"]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    unsigned = save_tensors(tensors, metadata=metadata | {"signature": PLACEHOLDER})
    with pytest.raises(BundleError, match="unsigned"):
        verify_bytes(unsigned, signed["key"].public_key())
    no_field = save_tensors(tensors, metadata={"manifest": metadata["manifest"]})
    path = tmp_path / "unsigned.lsdm-bundle"
    path.write_bytes(no_field)
    with pytest.raises(BundleError, match="unsigned"):
        load_generator(path, signed["public"], "cpu")


def test_a_checkpoint_or_junk_is_not_a_bundle(signed, tmp_path):
    public = signed["key"].public_key()
    with pytest.raises(BundleError, match="no manifest"):
        verify_bundle(signed["ldm"], public)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(BundleError):
        verify_bundle(junk, public)
    with pytest.raises(BundleError, match="cannot read"):
        verify_bundle(tmp_path / "absent", public)


def test_store_bundle_verifies_before_writing(signed, tmp_path):
    data = signed["path"].read_bytes()
    public = signed["key"].public_key()
    dest = tmp_path / "site" / "generator.lsdm-bundle"
    manifest = store_bundle(data, public, dest)
    assert dest.read_bytes() == data and manifest.provenance.sites == 2
    damaged = bytearray(data)
    damaged[-5] ^= 1
    other = tmp_path / "site" / "other.lsdm-bundle"
    with pytest.raises(BundleError):
        store_bundle(bytes(damaged), public, other)
    assert not other.exists() and sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_bundle_generates_the_same_volume_as_its_checkpoints(trained_models, tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    path = build_bundle(
        trained_models.vqgan, trained_models.ldm, PROVENANCE, key, tmp_path / "g.lsdm-bundle"
    )
    from_checkpoints = Generator.from_checkpoints(trained_models.vqgan, trained_models.ldm, "cpu")
    from_bundle = load_generator(path, key.public_key(), "cpu")
    semantic_map = from_checkpoints.read_map(
        sorted((trained_models.cohort / "maps").glob("*.nii.gz"))[0]
    )
    maps = torch.stack([from_checkpoints.one_hot(semantic_map.labels)])
    expected = from_checkpoints.generate(maps, [11], steps=5, guidance_scale=1.5)
    got = from_bundle.generate(maps, [11], steps=5, guidance_scale=1.5)
    assert torch.equal(expected, got)
    assert path.stat().st_size < trained_models.ldm.stat().st_size  # no optimiser, no copies


# -- commands --------------------------------------------------------------------------------------
def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_node_verify_command(signed, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(
        node_app, ["verify", str(signed["path"]), "--coordinator-key", str(signed["public"])]
    )
    assert ok.exit_code == 0, ok.output
    assert "valid" in ok.stdout and "test-federation" in ok.stdout and "2 site(s)" in ok.stdout

    damaged = tmp_path / "damaged.lsdm-bundle"
    data = bytearray(signed["path"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    line = _one_error_line(
        runner.invoke(
            node_app, ["verify", str(damaged), "--coordinator-key", str(signed["public"])]
        )
    )
    assert "modified after signing" in line

    _, wrong = _write_pem(ed25519.Ed25519PrivateKey.generate(), tmp_path)
    line = _one_error_line(
        runner.invoke(node_app, ["verify", str(signed["path"]), "--coordinator-key", str(wrong)])
    )
    assert "another key" in line
    line = _one_error_line(
        runner.invoke(
            node_app, ["verify", str(signed["path"]), "--coordinator-key", str(signed["path"])]
        )
    )
    assert "not a PEM public key" in line


def test_server_publish_command(signed, tmp_path):
    runner = CliRunner()
    folder = tmp_path / "coordinator"
    result = runner.invoke(server_app, ["init", str(folder)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "published.lsdm-bundle"
    line = _one_error_line(runner.invoke(server_app, ["publish", str(folder), "--out", str(out)]))
    assert "nothing to publish" in line and not out.exists()

    state = folder / "state"
    shutil.copy(signed["vqgan"], state / "vqgan.safetensors")
    ldm_meta = read_metadata(signed["ldm"])
    ldm_meta["privacy"] = {
        "h1": {"dp": True, "epsilon": 4.0, "delta": 1e-5},
        "h2": {"dp": False, "epsilon": None, "delta": None},
    }
    config = small_config(10)
    ldm = build_ldm(config, len(LABELS))
    load_checkpoint(signed["ldm"], {"ldm": ldm})
    save_checkpoint(state / "ldm.safetensors", {"ldm": ldm}, None, ldm_meta)
    rounds = [
        {"event": "round", "round": 1, "outcome": "aggregated", "accepted": {"h1": {}, "h2": {}}},
        {"event": "round", "round": 2, "outcome": "aggregated", "accepted": {"h2": {}}},
    ]
    (state / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    result = runner.invoke(server_app, ["publish", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = verify_bundle(out, folder / "signing.pub.pem")
    assert manifest.provenance.federation == "default"
    assert manifest.provenance.site_names == ["h1", "h2"] and manifest.provenance.sites == 2
    assert manifest.provenance.dp["h1"].epsilon == 4.0 and manifest.provenance.dp["h2"] == "none"
    assert manifest.worst_epsilon == float("inf")  # a site without DP
    assert manifest.source["ldm_sha256"] == file_sha256(state / "ldm.safetensors")
    with pytest.raises(BundleError, match="another key"):
        verify_bundle(out, signed["public"])


def test_server_publish_from_a_federation_checkpoint(tmp_path):
    runner = CliRunner()
    folder = tmp_path / "coordinator"
    assert runner.invoke(server_app, ["init", str(folder)]).exit_code == 0
    config = small_config(10)
    vqgan, ldm = VQGAN(config.vqgan), build_ldm(config, len(LABELS))
    checkpoint = tmp_path / "federation.safetensors"
    metadata = {"kind": "federation", "completed_round": 25, "calibrated": True}
    private = {"dp": True, "epsilon": 2.0, "delta": 1e-5}
    metadata["privacy"] = {  # as the federation records it: per phase, per site
        "vqgan": {"h1": private, "h2": private},
        "diffusion": {"h1": private | {"epsilon": 3.0}, "h2": private | {"epsilon": 2.5}},
    }
    save_checkpoint(
        checkpoint,
        {"vqgan": vqgan, "ldm": ldm},
        None,
        metadata | checkpoint_identity(config, LABELS),
    )
    out = tmp_path / "b.lsdm-bundle"
    result = runner.invoke(
        server_app, ["publish", str(folder), "--out", str(out), "--checkpoint", str(checkpoint)]
    )
    assert result.exit_code == 0, result.output
    manifest = verify_bundle(out, folder / "signing.pub.pem")
    assert manifest.provenance.rounds == PerPhase(vqgan=20, diffusion=5)
    assert manifest.worst_epsilon == 3.0
    assert manifest.provenance.dp["h2"].epsilon == 2.5
    verified = runner.invoke(
        node_app, ["verify", str(out), "--coordinator-key", str(folder / "signing.pub.pem")]
    )
    assert verified.exit_code == 0 and "h1: ε=3" in verified.stdout, verified.output
    generator = load_generator(out, folder / "signing.pub.pem", "cpu")
    assert torch.equal(generator.vqgan.codebook, vqgan.codebook)
    early = tmp_path / "early.safetensors"
    save_checkpoint(
        early,
        {"vqgan": vqgan, "ldm": ldm},
        None,
        metadata | {"completed_round": 20} | checkpoint_identity(config, LABELS),
    )
    line = _one_error_line(
        runner.invoke(
            server_app, ["publish", str(folder), "--out", str(out), "--checkpoint", str(early)]
        )
    )
    assert "not trained yet" in line
