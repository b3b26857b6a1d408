"""The 3D VQ-GAN: MONAI's VQVAE (two stride-2 levels, 4x compression per axis) and a 3D
PatchDiscriminator whose norm DP-SGD can use (InstanceNorm, never BatchNorm).

Losses of the autoencoder step: L1 reconstruction, the codebook commitment loss (the codebook
itself follows an exponential moving average of the encodings), and, from
``adversarial_start_step`` on, an adversarial term (hinge or least squares) and L1 feature matching
between the discriminator's intermediate features of real and reconstructed volumes. No
perceptual loss: every usable 3D feature network downloads weights at run time.

The latent interface for the diffusion stage: :meth:`VQGAN.encode` gives the continuous
pre-quantisation latent scaled to [-1, 1] per channel, by the range the training data's latents
span (``latent_scaling``: their min and max, or mean -/+ one standard deviation);
:meth:`VQGAN.decode` undoes the scaling, quantises and decodes. The range is a pair of
buffers, so it travels in checkpoints. (The codebook's own range, which the published Med-LSDM
code scales by, is useless with an EMA codebook: unused codes drift to values thousands of times
larger than any encoding, which squeezes every real latent into a sliver of [-1, 1].)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import VQVAE, PatchDiscriminator
from torch import nn

from lsdm.checkpoint import load_checkpoint, read_identity
from lsdm.config import LSDMConfig, VQGANConfig

# MONAI's (stride, kernel, dilation, padding) of an encoder level that halves every side, and of
# one that keeps it; the decoder's (stride, kernel, dilation, padding, output padding) mirror them.
_HALVING = (2, 4, 1, 1)
_KEEPING = (1, 3, 1, 1)


def _level_parameters(downsampling: int) -> tuple[tuple, tuple]:
    """Encoder and decoder parameters of the two levels: downsampling 4 halves at both, 2 only at
    the first (full resolution); the decoder runs the levels in reverse."""
    encoder = (_HALVING, _HALVING if downsampling == 4 else _KEEPING)
    decoder = tuple((*level, 0) for level in reversed(encoder))
    return encoder, decoder


@torch.no_grad()
def _restart_dead_codes(quantiser, inputs, _output) -> None:
    """After a training forward of MONAI's EMA quantiser: every code whose moving-average use
    (``ema_cluster_size``) is below ``dead_code_restart`` x the mean code's is moved onto a
    randomly drawn encoding of this batch, with a use of one, so the next updates pull it along
    with the data instead of leaving it where nothing maps. Not in eval mode, so not where DP
    freezes the codebook (node/privacy.py)."""
    if not quantiser.training:
        return
    share = quantiser._restart_share
    counts = quantiser.ema_cluster_size
    dead = torch.nonzero(counts < share * counts.mean()).flatten()
    if len(dead) == 0:
        return
    encodings = inputs[0].movedim(1, -1).reshape(-1, quantiser.embedding_dim)
    chosen = encodings[torch.randint(len(encodings), (len(dead),), device=encodings.device)]
    quantiser.embedding.weight.data[dead] = chosen
    quantiser.ema_w.data[dead] = chosen
    counts[dead] = 1.0


class VQGAN(nn.Module):
    """Autoencoder ``(B, 1, D, H, W) -> (B, 1, D, H, W)`` through a ``(B, E, D/f, H/f, W/f)``
    codebook latent (``f`` = ``config.downsampling``), with its discriminator."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        encoder_levels, decoder_levels = _level_parameters(config.downsampling)
        self.autoencoder = VQVAE(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=config.channels,
            num_res_layers=config.num_res_layers,
            num_res_channels=config.num_res_channels,
            downsample_parameters=encoder_levels,
            upsample_parameters=decoder_levels,
            num_embeddings=config.num_embeddings,
            embedding_dim=config.embedding_dim,
            commitment_cost=config.commitment_cost,
            decay=config.codebook_decay,
        )
        self.discriminator = PatchDiscriminator(
            spatial_dims=3,
            channels=config.disc_channels,
            in_channels=1,
            out_channels=1,
            num_layers_d=config.disc_layers,
            norm=("INSTANCE", {"affine": True}),
        )
        if config.dead_code_restart > 0:
            quantiser = self.autoencoder.quantizer.quantizer
            quantiser._restart_share = config.dead_code_restart
            quantiser.register_forward_hook(_restart_dead_codes)
        # Per-channel range of the training latents; see calibrate_latent_scale().
        self.register_buffer("latent_low", -torch.ones(config.embedding_dim))
        self.register_buffer("latent_high", torch.ones(config.embedding_dim))

    @property
    def codebook(self) -> torch.Tensor:
        """``(num_embeddings, embedding_dim)``."""
        return self.autoencoder.quantizer.quantizer.embedding.weight

    @property
    def latent_bound(self) -> float:
        """Where the scaled latents of the agreed range end: 1 for range-scaled latents (the
        range's own ends); 4 standard deviations for unit-variance ones."""
        return 1.0 if self.config.latent_scaling == "range" else 4.0

    def latent_shape(self, volume_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        """``(E, d, h, w)``: the latent of a ``(D, H, W)`` volume."""
        return self.config.latent_shape(volume_shape)

    @torch.no_grad()
    def latent_range(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(low, high)``, each ``(E,)``, of the unscaled encodings of ``images``
        ``(N, 1, D, H, W)``, by ``config.latent_scaling``: their min and max, or their mean -/+
        one standard deviation. What :meth:`set_latent_range` takes."""
        was_training = self.training
        self.eval()
        z = torch.cat([self.autoencoder.encode(chunk) for chunk in images.split(2)])
        self.train(was_training)
        return self._scaling_range(z.transpose(0, 1).flatten(1))

    def codebook_latent_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same statistic of the codebook's vectors: a range that reads no data (for a
        federation whose sites are all private)."""
        return self._scaling_range(self.codebook.detach().T)

    def _scaling_range(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)`` per row of ``values`` ``(E, N)``, by ``config.latent_scaling``."""
        if self.config.latent_scaling == "std":
            mean, std = values.mean(dim=1), values.std(dim=1)
            return mean - std, mean + std
        return values.min(dim=1).values, values.max(dim=1).values

    @torch.no_grad()
    def set_latent_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Fix the latent scaling: ``low`` maps to -1 and ``high`` to 1, per channel."""
        low = low.to(self.latent_low)
        self.latent_low.copy_(low)
        self.latent_high.copy_(torch.maximum(high.to(low), low + 1e-6))

    def calibrate_latent_scale(self, images: torch.Tensor) -> None:
        """Fix the latent scaling to the per-channel range of the encodings of ``images``
        (a sample of the training volumes, ``(N, 1, D, H, W)``); done before every save."""
        self.set_latent_range(*self.latent_range(images))

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        return self.latent_low.view(shape), self.latent_high.view(shape)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantisation latent ``(B, E, D/f, H/f, W/f)``, scaled by
        ``config.latent_scaling``."""
        low, high = self._range()
        return (self.autoencoder.encode(images) - low) / (high - low) * 2.0 - 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscale, quantise to the nearest codes and decode to ``(B, 1, D, H, W)``."""
        low, high = self._range()
        quantised, _ = self.autoencoder.quantize((latents + 1.0) / 2.0 * (high - low) + low)
        return self.autoencoder.decode(quantised)


def load_vqgan(path: Path, device: torch.device | str = "cpu") -> tuple[VQGAN, LSDMConfig]:
    """The trained VQ-GAN of a checkpoint (in eval mode) and the configuration it was made with."""
    config, _ = read_identity(path, "vqgan")
    model = VQGAN(config.vqgan).to(device)
    load_checkpoint(path, {"vqgan": model}, device=device)
    return model.eval(), config


@dataclass
class VQGANOptimisers:
    autoencoder: torch.optim.Optimizer
    discriminator: torch.optim.Optimizer


def make_optimisers(model: VQGAN) -> VQGANOptimisers:
    # The codebook is an EMA buffer-like parameter updated in the forward pass, not by gradients.
    params = [p for p in model.autoencoder.parameters() if p.requires_grad]
    return VQGANOptimisers(
        autoencoder=torch.optim.Adam(params, lr=model.config.lr, betas=(0.5, 0.9)),
        discriminator=torch.optim.Adam(
            model.discriminator.parameters(), lr=model.config.disc_lr, betas=(0.5, 0.9)
        ),
    )


def _adversarial_loss(config: VQGANConfig) -> PatchAdversarialLoss:
    return PatchAdversarialLoss(criterion=config.adversarial_loss)


def label_balance_weights(maps: torch.Tensor, balance: float) -> torch.Tensor:
    """Voxel weights ``(B, 1, D, H, W)`` from one-hot ``maps`` ``(B, L, D, H, W)``: a voxel of
    label ``l`` weighs ``share_l ** -balance``, ``share_l`` being the label's share of that
    volume's voxels, normalised to a mean of 1 per volume. Each volume's weights read only its
    own map, so a per-sample loss stays per-sample (DP-SGD clips it as one subject's)."""
    share = maps.mean(dim=(2, 3, 4), keepdim=True)
    per_label = share.clamp_min(1e-6).pow(-balance) * (share > 0)
    weights = (maps * per_label).sum(dim=1, keepdim=True)
    return weights / weights.mean(dim=(2, 3, 4), keepdim=True)


def reconstruction_loss(
    model: VQGAN, reconstruction: torch.Tensor, images: torch.Tensor, maps: torch.Tensor | None
) -> torch.Tensor:
    """L1, label-balanced by ``config.recon_label_balance`` when the maps are at hand."""
    error = (reconstruction - images).abs()
    if maps is None or model.config.recon_label_balance == 0:
        return error.mean()
    return (error * label_balance_weights(maps, model.config.recon_label_balance)).mean()


def autoencoder_step(
    model: VQGAN,
    images: torch.Tensor,
    optimiser: torch.optim.Optimizer,
    real_features: list[torch.Tensor] | None = None,
    maps: torch.Tensor | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """One update of the autoencoder; returns its losses and the (detached) reconstruction.

    With ``real_features`` (the discriminator's intermediate features of ``images``, detached)
    the adversarial and feature-matching terms are added; without, the step is L1 + codebook only.
    With ``maps`` (one-hot, ``(B, L, D, H, W)``) the L1 term is label-balanced (see
    :func:`reconstruction_loss`).
    """
    config = model.config
    model.autoencoder.train()
    reconstruction, quantisation_loss = model.autoencoder(images)
    recon_l1 = reconstruction_loss(model, reconstruction, images, maps)
    loss = recon_l1 + quantisation_loss
    losses = {"recon_l1": recon_l1.item(), "quantisation": quantisation_loss.item()}
    if real_features is not None:
        *fake_features, fake_logits = model.discriminator(reconstruction)
        adversarial = _adversarial_loss(config)(
            fake_logits, target_is_real=True, for_discriminator=False
        )
        matching = sum(
            F.l1_loss(f, r) for f, r in zip(fake_features, real_features, strict=True)
        ) / len(fake_features)
        loss = (
            loss
            + config.adversarial_weight * adversarial
            + config.feature_matching_weight * matching
        )
        losses |= {"adversarial": adversarial.item(), "feature_matching": matching.item()}
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    # The discriminator was only read by this loss: the gradients it left there are not its own.
    model.discriminator.zero_grad(set_to_none=True)
    return losses, reconstruction.detach()


def discriminator_step(
    model: VQGAN,
    real_logits: torch.Tensor,
    reconstruction: torch.Tensor,
    optimiser: torch.optim.Optimizer,
) -> dict[str, float]:
    """One update of the discriminator: ``real_logits`` (computed with gradients) against its
    logits for the (detached) reconstructions."""
    criterion = _adversarial_loss(model.config)
    fake_logits = model.discriminator(reconstruction)[-1]
    loss = 0.5 * (
        criterion(real_logits, target_is_real=True, for_discriminator=True)
        + criterion(fake_logits, target_is_real=False, for_discriminator=True)
    )
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return {"discriminator": loss.item()}


def train_step(
    model: VQGAN,
    images: torch.Tensor,
    optimisers: VQGANOptimisers,
    step: int,
    maps: torch.Tensor | None = None,
) -> dict[str, float]:
    """One VQ-GAN training step on a batch ``(B, 1, D, H, W)`` in [-1, 1]: the autoencoder, then,
    from ``adversarial_start_step`` on, the discriminator. Returns the losses as floats.

    The discriminator reads the real volumes once per step: the autoencoder's feature matching
    uses those features detached, the discriminator's own update the same forward pass (its
    weights do not change in between). The same function serves central training, a federated
    site's round and the benchmark.
    """
    if step < model.config.adversarial_start_step:
        return autoencoder_step(model, images, optimisers.autoencoder, maps=maps)[0]
    model.discriminator.train()
    *real_features, real_logits = model.discriminator(images)
    losses, reconstruction = autoencoder_step(
        model, images, optimisers.autoencoder, [f.detach() for f in real_features], maps
    )
    return losses | discriminator_step(model, real_logits, reconstruction, optimisers.discriminator)


@torch.no_grad()
def reconstruct(model: VQGAN, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model.autoencoder(images)[0].clamp(-1.0, 1.0)


@dataclass(frozen=True)
class CodebookUse:
    codes_used_share: float  # share of the codebook's codes that some latent voxel picks
    perplexity: float  # exp of the entropy of the codes' frequencies: codes in effective use


@torch.no_grad()
def codebook_use(model: VQGAN, images: torch.Tensor, batch: int = 4) -> CodebookUse:
    """How much of its codebook the VQ-GAN uses on ``images`` (N, 1, D, H, W): a collapsed
    codebook caps every volume decoded through it."""
    device = next(model.parameters()).device
    model.eval()
    indices = torch.cat(
        [
            model.autoencoder.index_quantize(c.to(device)).flatten().cpu()
            for c in images.split(batch)
        ]
    )
    counts = torch.bincount(indices, minlength=model.config.num_embeddings).double()
    shares = counts[counts > 0] / counts.sum()
    return CodebookUse(
        codes_used_share=float((counts > 0).double().mean()),
        perplexity=float(torch.exp(-(shares * shares.log()).sum())),
    )
