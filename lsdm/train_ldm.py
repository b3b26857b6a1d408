"""Central training of the latent diffusion model against a frozen VQ-GAN, with checkpoints,
metrics and exact resume (see :mod:`lsdm.training`).

The cohort is encoded once: every subject's scaled latent and its label map (as label indices,
one byte a voxel, one-hot only per batch) stay in memory for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lsdm.checkpoint import checkpoint_identity, file_sha256, load_checkpoint, save_checkpoint
from lsdm.config import LSDMConfig
from lsdm.data import Cohort, StepBatchSampler, make_dataset, make_loader
from lsdm.diffusion import LatentDiffusion, build_ldm, make_optimiser, train_step
from lsdm.errors import InputError
from lsdm.training import StepCallback, begin_run, default_device, run_steps
from lsdm.vqgan import VQGAN, load_vqgan


@dataclass
class EncodedCohort:
    latents: torch.Tensor  # (N, E, d, h, w), scaled to [-1, 1]
    label_index: (
        torch.Tensor
    )  # (N, D, H, W) uint8: position of each voxel's label in the vocabulary
    num_labels: int

    def batch(self, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        maps = F.one_hot(self.label_index[indices].long(), self.num_labels)
        return self.latents[indices].to(device), maps.permute(0, 4, 1, 2, 3).float().to(device)


@dataclass
class LDMRun:
    model: LatentDiffusion
    step: int


@torch.no_grad()
def encode_cohort(vqgan: VQGAN, cohort: Cohort, config: LSDMConfig) -> EncodedCohort:
    device = next(vqgan.parameters()).device
    latents, label_index = [], []
    for batch in make_loader(make_dataset(cohort, config.data), config.data):
        latents.append(vqgan.encode(batch["image"].to(device)).cpu())
        label_index.append(batch["map"].argmax(dim=1).to(torch.uint8))
    return EncodedCohort(torch.cat(latents), torch.cat(label_index), len(cohort.labels))


def train_ldm(
    cohort: Cohort,
    vqgan_checkpoint: Path,
    config: LSDMConfig,
    out: Path,
    resume: bool = False,
    on_step: StepCallback | None = None,
    device: torch.device | None = None,
) -> LDMRun:
    """Train for ``config.train.ldm_steps`` steps in all on the cohort's latents.

    The diffusion settings come from ``config``; the data and VQ-GAN settings from the VQ-GAN
    checkpoint, since the latents must be made the way that VQ-GAN was trained.
    """
    device = device or default_device()
    vqgan, vqgan_config = load_vqgan(vqgan_checkpoint, device)
    try:  # validated again: the UNet's depth must suit the VQ-GAN's volume shape
        config = LSDMConfig.model_validate(
            config.model_dump()
            | {"data": vqgan_config.data.model_dump(), "vqgan": vqgan_config.vqgan.model_dump()}
        )
    except ValidationError as err:
        raise InputError(f"the diffusion settings do not fit {vqgan_checkpoint}: {err}") from None
    vqgan_hash = file_sha256(vqgan_checkpoint)
    run, config = begin_run(out, config, cohort.labels, resume, "ldm_steps")
    steps, seed = config.train.ldm_steps, config.train.seed
    torch.manual_seed(seed)
    model = build_ldm(config, len(cohort.labels)).to(device)
    optimiser = make_optimiser(model)
    start = 0
    if resume:
        metadata = load_checkpoint(run.checkpoint_path, {"ldm": model}, {"ldm": optimiser}, device)
        if metadata.get("vqgan_sha256") != vqgan_hash:
            raise InputError(f"the run was trained against another VQ-GAN than {vqgan_checkpoint}")
        start = metadata["step"]
        run.forget_metrics_after(start)

    encoded = encode_cohort(vqgan, cohort, config)
    del vqgan

    def save(step: int) -> None:
        metadata = {
            "kind": "ldm",
            "step": step,
            "vqgan_sha256": vqgan_hash,
            **checkpoint_identity(config, cohort.labels),
        }
        save_checkpoint(run.checkpoint_path, {"ldm": model}, {"ldm": optimiser}, metadata)

    def step_fn(step: int, indices: list[int]) -> dict[str, float]:
        latents, maps = encoded.batch(indices, device)
        return train_step(model, latents, maps, optimiser)

    batch_size = config.diffusion.batch_size
    sampler = StepBatchSampler(len(encoded.latents), batch_size, seed, start, steps)
    run_steps(run, config, start, steps, iter(sampler), step_fn, save, batch_size, on_step)
    return LDMRun(model=model, step=max(start, steps))
