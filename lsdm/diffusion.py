"""Latent semantic diffusion: MONAI's 3D ``SPADEDiffusionModelUNet`` on the VQ-GAN's latents,
conditioned on the one-hot semantic map at full resolution (SPADE resizes it to every feature map).

Objectives (``DiffusionConfig.objective``):

- ``ddpm``: the DDPM noising process; the network predicts the noise ε or the velocity v
  (``prediction``); sampled with DDIM in few steps.
- ``rflow``: rectified flow, ``x_t = (1 - t) x_0 + t ε``; the network predicts ``x_0 - ε``;
  sampled with Euler steps.

Classifier-free guidance is trained, not assumed: each training sample's map is replaced by the
null map (all zeros) with probability ``condition_dropout``, so the network also learns the
unconditional prediction. At sampling, ``out = out_null + s (out_map - out_null)``, both halves in
one batched forward pass. An exponential moving average of the weights is kept and samples.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.blocks.spade_norm import SPADE
from monai.networks.nets import SPADEDiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from monai.networks.utils import pixelshuffle, pixelunshuffle
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lsdm.checkpoint import load_checkpoint, read_identity
from lsdm.config import DiffusionConfig, LSDMConfig


def label_fractions(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """One-hot ``maps`` (B, L, D, H, W) shrunk to ``size`` by area: each voxel holds the share of
    every label in the block of map voxels it covers."""
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="area")


class AreaSPADE(SPADE):
    """MONAI's SPADE with the map shrunk by area instead of nearest: at the latent level a
    nearest resize keeps one map voxel in 64, and thin structures (vessels) mostly vanish."""

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free_norm(x.contiguous())
        actv = self.mlp_shared(label_fractions(segmap, x.shape[2:]))
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class MapConditionedUNet(SPADEDiffusionModelUNet):
    """MONAI's 3D SPADE diffusion UNet, ``forward(x, timesteps, seg)``, with three options of
    :class:`DiffusionConfig`: SPADE's map resize by area (``map_resize``); the map's label
    fractions at the latent size concatenated to the input (``map_at_input``), so that the
    encoder half, which has no SPADE, sees the map too; and the latent folded into channels in
    blocks of ``latent_patch`` per side before the UNet and unfolded after it (the input's map
    fractions are taken before folding, so they keep every latent voxel's). The parameter names
    are MONAI's."""

    def __init__(self, config: DiffusionConfig, latent_channels: int, num_labels: int):
        folded = config.latent_patch**3
        super().__init__(
            spatial_dims=3,
            in_channels=(latent_channels + (num_labels if config.map_at_input else 0)) * folded,
            out_channels=latent_channels * folded,
            label_nc=num_labels,
            channels=config.channels,
            attention_levels=config.attention_levels,
            num_res_blocks=config.num_res_blocks,
            num_head_channels=config.num_head_channels,
            norm_num_groups=config.norm_groups,
            spade_intermediate_channels=config.spade_channels,
        )
        self.map_at_input = config.map_at_input
        self.latent_patch = config.latent_patch
        if config.map_resize == "area":
            for module in self.modules():
                if type(module) is SPADE:
                    module.__class__ = AreaSPADE  # same parameters, another forward

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        if self.map_at_input:
            x = torch.cat([x, label_fractions(seg, x.shape[2:]).to(x.dtype)], dim=1)
        if self.latent_patch == 1:
            return super().forward(x, timesteps, seg=seg)
        folded = pixelunshuffle(x, 3, self.latent_patch)
        return pixelshuffle(super().forward(folded, timesteps, seg=seg), 3, self.latent_patch)


class LatentDiffusion(nn.Module):
    """Denoiser of ``(B, E, d, h, w)`` latents given ``(B, L, D, H, W)`` one-hot maps, and the
    moving average of its weights (``ema``) that sampling uses."""

    def __init__(self, config: DiffusionConfig, latent_channels: int, num_labels: int):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.unet = MapConditionedUNet(config, latent_channels, num_labels)
        self.ema = AveragedModel(
            self.unet, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
        self.ema.requires_grad_(False)

    @property
    def downsampling(self) -> int:
        """Each latent side must be divisible by this (the UNet halves it per level)."""
        return self.config.latent_patch * 2 ** (len(self.config.channels) - 1)


def build_ldm(config: LSDMConfig, num_labels: int) -> LatentDiffusion:
    return LatentDiffusion(config.diffusion, config.vqgan.embedding_dim, num_labels)


def load_ldm(path: Path, device: torch.device | str = "cpu"):
    """The latent diffusion model of a checkpoint, its configuration, vocabulary and metadata."""
    config, labels = read_identity(path, "ldm")
    model = build_ldm(config, len(labels)).to(device)
    metadata = load_checkpoint(path, {"ldm": model}, device=device)
    return model.eval(), config, labels, metadata


@functools.cache
def training_scheduler(config: DiffusionConfig):
    """The noising process of training (MONAI schedulers are modules, some without module state,
    so they are kept beside the model rather than inside it)."""
    if config.objective == "rflow":
        return RFlowScheduler(num_train_timesteps=config.timesteps, use_discrete_timesteps=True)
    return DDPMScheduler(
        num_train_timesteps=config.timesteps,
        schedule=config.schedule,
        prediction_type=config.prediction,
    )


def null_maps_for(maps: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``maps`` with the samples where ``drop`` (shape (B,), bool) is true set to the null map."""
    return maps * (~drop).to(maps.dtype).view(-1, *([1] * (maps.ndim - 1)))


def diffusion_loss(model: LatentDiffusion, latents: torch.Tensor, maps: torch.Tensor):
    """The training loss on a batch of clean latents and their (possibly null) maps."""
    scheduler = training_scheduler(model.config)
    noise = torch.randn_like(latents)
    if model.config.objective == "rflow":
        timesteps = scheduler.sample_timesteps(latents)
        target = latents - noise
    else:
        timesteps = torch.randint(
            0, model.config.timesteps, (latents.shape[0],), device=latents.device
        )
        target = (
            noise
            if model.config.prediction == "epsilon"
            else scheduler.get_velocity(latents, noise, timesteps)
        )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model.unet(noisy, timesteps, seg=maps)
    return F.mse_loss(prediction.float(), target.float())


def train_step(
    model: LatentDiffusion,
    latents: torch.Tensor,
    maps: torch.Tensor,
    optimiser: torch.optim.Optimizer,
) -> dict[str, float]:
    """One update on ``latents`` (B, E, d, h, w) in [-1, 1] and one-hot ``maps`` (B, L, D, H, W);
    a ``condition_dropout`` share of the maps is nulled first. Updates the moving average too.

    The same function serves central training, a federated site's round and the benchmark.
    """
    model.unet.train()
    drop = torch.rand(latents.shape[0], device=latents.device) < model.config.condition_dropout
    loss = diffusion_loss(model, latents, null_maps_for(maps, drop))
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    model.ema.update_parameters(model.unet)
    return {"loss": loss.item(), "null_share": drop.float().mean().item()}


def make_optimiser(model: LatentDiffusion) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.unet.parameters(), lr=model.config.lr, weight_decay=0.0)


def guided_prediction(
    network: nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor | int,
    maps: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """``out_null + s (out_map - out_null)``; both halves in one forward pass of batch 2B.

    ``s = 1`` is the conditional prediction alone and ``s = 0`` the unconditional one: each needs
    one half only, so only that half is run.
    """
    batch = latents.shape[0]
    if guidance_scale in (0.0, 1.0):
        seg = maps if guidance_scale == 1.0 else torch.zeros_like(maps)
        t = torch.full((batch,), int(timestep), device=latents.device, dtype=torch.long)
        return network(latents, t, seg=seg)
    t = torch.full((2 * batch,), int(timestep), device=latents.device, dtype=torch.long)
    both = network(torch.cat([latents, latents]), t, seg=torch.cat([maps, torch.zeros_like(maps)]))
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


@torch.no_grad()
def sample_latents(
    model: LatentDiffusion,
    maps: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance_scale: float,
    clip_to_unit: bool = True,
) -> torch.Tensor:
    """Denoise ``noise`` (B, E, d, h, w) into latents following ``maps`` with the EMA weights,
    in ``steps`` DDIM (deterministic, η = 0) or rectified-flow Euler steps. ``clip_to_unit``:
    DDIM keeps its predicted clean latent in [-1, 1] (right for range-scaled latents only)."""
    config = model.config
    network = model.ema.module.eval()
    x = noise
    if config.objective == "rflow":
        scheduler = RFlowScheduler(num_train_timesteps=config.timesteps)
        scheduler.set_timesteps(steps, device=noise.device)
        timesteps = [int(t) for t in scheduler.timesteps]
        for i, t in enumerate(timesteps):
            next_t = timesteps[i + 1] if i + 1 < len(timesteps) else 0
            velocity = guided_prediction(network, x, t, maps, guidance_scale)
            x, _ = scheduler.step(velocity, t, x, next_t)
        return x
    scheduler = DDIMScheduler(
        num_train_timesteps=config.timesteps,
        schedule=config.schedule,
        prediction_type=config.prediction,
        clip_sample=clip_to_unit,
    )
    scheduler.set_timesteps(steps, device=noise.device)
    for t in scheduler.timesteps:
        x, _ = scheduler.step(guided_prediction(network, x, t, maps, guidance_scale), int(t), x)
    return x
