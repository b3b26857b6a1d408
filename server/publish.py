"""``lsdm-server publish``: the signed generator bundle of the coordinator's models.

Sources, in order: ``--checkpoint FILE`` (a federation checkpoint, ``state/federation.safetensors``
or a copy of one), else the final models ``serve`` exports (``state/vqgan.safetensors`` and
``state/ldm.safetensors``), else the last round's ``state/federation.safetensors``. Provenance
comes from the federation policy, the round log (which sites took part) and the checkpoint's
``privacy`` metadata (each site's DP (ε, δ), or none; else ε/δ metrics in the round log).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lsdm.bundle import DPBudget, Manifest, Provenance, build_bundle
from lsdm.checkpoint import (
    checkpoint_identity,
    file_sha256,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from lsdm.config import LSDMConfig
from lsdm.diffusion import build_ldm
from lsdm.errors import InputError
from lsdm.phases import PerPhase
from lsdm.vqgan import VQGAN
from server.aggregate import combined_privacy
from server.settings import Coordinator


def _dp_from(source: dict) -> dict[str, DPBudget | str] | None:
    """Per-site DP from checkpoint metadata: ``privacy`` as the federation writes it
    (``{site: {"dp", "epsilon", "delta"}}``, or per phase in a federation checkpoint), or a
    plain ``dp`` entry ``{site: {"epsilon", "delta"}}``."""
    privacy = source.get("privacy")
    if isinstance(privacy, dict) and set(privacy) <= {"vqgan", "diffusion"} and privacy:
        privacy = combined_privacy(*privacy.values())
    if isinstance(privacy, dict) and privacy:
        try:
            return {
                str(site): DPBudget(epsilon=r["epsilon"], delta=r["delta"]) if r["dp"] else "none"
                for site, r in privacy.items()
            }
        except (KeyError, TypeError, ValueError):
            raise InputError("the checkpoint's privacy record is malformed") from None
    dp = source.get("dp")
    if isinstance(dp, dict) and dp:
        try:
            return {str(k): DPBudget.model_validate(v) for k, v in dp.items()}
        except ValueError:
            return None
    return None


def sites_and_dp(coordinator: Coordinator) -> tuple[list[str], dict[str, DPBudget | str]]:
    """Sites whose updates were aggregated, and the last (ε, δ) each reported, if any."""
    sites: list[str] = []
    dp: dict[str, DPBudget | str] = {}
    for entry in coordinator.rounds():
        if entry.get("event") != "round" or entry.get("outcome") != "aggregated":
            continue
        for site, metrics in entry.get("accepted", {}).items():
            if site not in sites:
                sites.append(site)
            if float(metrics.get("dp", 0)) == 1 and "epsilon" in metrics and "delta" in metrics:
                dp[site] = DPBudget(
                    epsilon=float(metrics["epsilon"]), delta=float(metrics["delta"])
                )
            elif "dp" in metrics:
                dp[site] = "none"
    return sorted(sites), dp


def _split_federation_checkpoint(checkpoint: Path, folder: Path) -> tuple[Path, Path, int]:
    """Standalone VQ-GAN and LDM checkpoints (as ``serve`` exports them) from a federation
    checkpoint; returns their paths and its completed round."""
    meta = read_metadata(checkpoint)
    if meta.get("kind") != "federation":
        raise InputError(f"not a federation checkpoint: {checkpoint}")
    try:
        config = LSDMConfig.model_validate(meta["config"])
        labels = {int(k): v for k, v in meta["labels"].items()}
    except (KeyError, ValueError) as err:
        raise InputError(f"federation checkpoint metadata is incomplete: {err}") from None
    vqgan, ldm = VQGAN(config.vqgan), build_ldm(config, len(labels))
    load_checkpoint(checkpoint, {"vqgan": vqgan, "ldm": ldm})
    identity = checkpoint_identity(config, labels)
    vqgan_path, ldm_path = folder / "vqgan.safetensors", folder / "ldm.safetensors"
    save_checkpoint(vqgan_path, {"vqgan": vqgan}, None, {"kind": "vqgan", **identity})
    save_checkpoint(
        ldm_path,
        {"ldm": ldm},
        None,
        {"kind": "ldm", "vqgan_sha256": file_sha256(vqgan_path), **identity},
    )
    return vqgan_path, ldm_path, int(meta.get("completed_round", 0))


def publish(folder: Path, out: Path, checkpoint: Path | None = None) -> Manifest:
    """Export and sign the bundle into ``out``; returns its manifest."""
    from lsdm.bundle import load_private_key, verify_bundle

    coordinator = Coordinator(folder)
    coordinator.check()
    policy = coordinator.policy()
    if not coordinator.signing_key.is_file():
        raise InputError(f"no signing key in the coordinator folder: {coordinator.signing_key}")
    key = load_private_key(coordinator.signing_key)
    total_vqgan = policy.rounds.vqgan
    sites, dp = sites_and_dp(coordinator)
    with tempfile.TemporaryDirectory(prefix=".publish.", dir=coordinator.state) as tmp:
        final = (coordinator.state / "vqgan.safetensors", coordinator.state / "ldm.safetensors")
        if checkpoint is None and all(p.is_file() for p in final):
            vqgan_path, ldm_path = final
            completed = total_vqgan + policy.rounds.diffusion
            meta = read_metadata(ldm_path)
        else:
            source = checkpoint or coordinator.checkpoint
            if not Path(source).is_file():
                raise InputError(
                    f"nothing to publish: no trained models in {coordinator.state} "
                    "(run lsdm-server serve first)"
                )
            vqgan_path, ldm_path, completed = _split_federation_checkpoint(Path(source), Path(tmp))
            meta = read_metadata(source)
        if completed <= total_vqgan:
            raise InputError(
                f"the diffusion model is not trained yet (round {completed} of "
                f"{total_vqgan + policy.rounds.diffusion}): nothing to publish"
            )
        dp = _dp_from(meta) or dp
        if dp and all(b == "none" for b in dp.values()):
            dp = {}
        provenance = Provenance(
            federation=policy.name,
            sites=max(1, len(sites) or len(coordinator.registered_sites())),
            site_names=sites or sorted(coordinator.registered_sites()),
            rounds=PerPhase(vqgan=total_vqgan, diffusion=completed - total_vqgan),
            dp=dp or "none",
        )
        build_bundle(vqgan_path, ldm_path, provenance, key, out)
    return verify_bundle(out, key.public_key())
