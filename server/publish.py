"""``lsdm-server publish``: the signed generator bundle of the coordinator's models.

Sources, in order: ``--checkpoint FILE`` (a federation checkpoint, ``state/federation.safetensors``
or a copy of one), else the final models ``serve`` exports (``state/vqgan.safetensors`` and
``state/ldm.safetensors``), else the last round's ``state/federation.safetensors``. Provenance
comes from the federation policy, the round log (which sites took part) and the checkpoint's
``privacy`` metadata (each site's :class:`policies.protocol.DPRecord`; else the privacy records
in the round log).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

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
from policies.protocol import DPRecord
from server.aggregate import combined_privacy
from server.settings import Coordinator


def budget(record: DPRecord) -> DPBudget | Literal["none"]:
    """A site's privacy record as the bundle's provenance states it."""
    return DPBudget(epsilon=record.epsilon, delta=record.delta) if record.dp else "none"


def _dp_from(source: dict) -> dict[str, DPRecord] | None:
    """Per-site privacy from checkpoint metadata: ``privacy`` as the federation writes it
    (``{site: DPRecord}``, or per phase in a federation checkpoint)."""
    privacy = source.get("privacy")
    if not isinstance(privacy, dict) or not privacy:
        return None
    per_phase = set(privacy) <= {"vqgan", "diffusion"}
    try:
        if per_phase:
            return combined_privacy(
                *({s: DPRecord.model_validate(r) for s, r in p.items()} for p in privacy.values())
            )
        return {str(site): DPRecord.model_validate(r) for site, r in privacy.items()}
    except (ValidationError, AttributeError):
        raise InputError("the checkpoint's privacy record is malformed") from None


def sites_and_dp(coordinator: Coordinator) -> tuple[list[str], dict[str, DPRecord]]:
    """Sites whose updates were aggregated, and the last privacy record each reported."""
    sites: list[str] = []
    dp: dict[str, DPRecord] = {}
    for entry in coordinator.rounds():
        if entry.get("event") != "round" or entry.get("outcome") != "aggregated":
            continue
        for site, metrics in entry.get("accepted", {}).items():
            if site not in sites:
                sites.append(site)
            try:
                dp[site] = DPRecord.from_metrics(metrics)
            except ValidationError:
                raise InputError(f"the round log's privacy record of {site} is malformed") from None
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
        dp = {site: budget(record) for site, record in (_dp_from(meta) or dp).items()}
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
