"""Configuration: pydantic models for data, VQ-GAN, diffusion and training, and named presets.

A configuration is validated once, at the edge (a YAML file or a preset name), and passed down as
objects. Two presets matter everywhere:

- ``tiny``: 1x32x64x64 volumes, a few hundred thousand parameters; trains in seconds to minutes on
  2 CPU cores (tests, CI, the demo).
- ``reference``: Med-LSDM scale, 1x32x256x256 volumes, 8x8x64x64 latents, 16384 codes of dim 8.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lsdm.errors import InputError

# Every side of a volume must divide by this: the most the VQ-GAN's two levels shrink a side, so a
# volume shape stays valid whichever ``VQGANConfig.downsampling`` a configuration picks.
VQGAN_DOWNSAMPLING = 4
# The largest volume a configuration may ask for (512^3 voxels; the reference grid has 2.1M).
MAX_VOXELS = 512**3

Positive = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    # allow_inf_nan: every float of every section must be finite (a NaN learning rate trains a
    # NaN model; an infinite one is never what was meant)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(_Strict):
    shape: tuple[Positive, Positive, Positive] = Field(
        (32, 64, 64), description="(D, H, W) every volume is cropped or padded to, after RAS"
    )
    intensity_percentiles: tuple[float, float] = Field(
        (0.5, 99.5), description="per-volume percentiles mapped to -1 and 1 (then clipped)"
    )
    batch_size: int = Field(2, ge=1)
    num_workers: int = Field(0, ge=0, description="data loader worker processes")

    @model_validator(mode="after")
    def _shape_fits_the_autoencoder(self) -> DataConfig:
        if math.prod(self.shape) > MAX_VOXELS:
            raise ValueError(f"shape {self.shape}: more than {MAX_VOXELS} voxels")
        low, high = self.intensity_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(
                f"intensity_percentiles {self.intensity_percentiles}: need 0 <= low < high <= 100"
            )
        if any(n % VQGAN_DOWNSAMPLING for n in self.shape):
            raise ValueError(
                f"shape {self.shape}: every side must be divisible by {VQGAN_DOWNSAMPLING}"
            )
        return self


class VQGANConfig(_Strict):
    channels: tuple[Positive, Positive] = Field(
        (16, 32), description="encoder widths of the two levels"
    )
    num_res_layers: int = Field(1, ge=0)
    num_res_channels: tuple[Positive, Positive] = (16, 32)
    downsampling: Literal[2, 4] = Field(
        4,
        description="how much the encoder shrinks every side: 4 (two stride-2 levels, as "
        "Med-LSDM at 256^2) or 2 (the second level keeps its size; 8x the latent voxels, for "
        "small volumes whose vessels and lesions are a few voxels across)",
    )
    num_embeddings: int = Field(256, ge=2, description="codebook size")
    embedding_dim: int = Field(4, ge=1, description="latent channels")
    commitment_cost: float = Field(0.25, ge=0)
    codebook_decay: float = Field(0.99, gt=0, lt=1, description="EMA decay of the codebook")
    dead_code_restart: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="a code whose moving-average use falls below this share of the mean code's "
        "is moved onto an encoding of the current batch (0: never; without it a short run "
        "collapses onto a few codes)",
    )
    disc_channels: int = Field(16, ge=1)
    disc_layers: int = Field(2, ge=1)
    adversarial_loss: Literal["hinge", "least_squares"] = "hinge"
    adversarial_weight: float = Field(0.05, ge=0)
    feature_matching_weight: float = Field(0.1, ge=0)
    adversarial_start_step: int = Field(
        200, ge=0, description="the discriminator and the adversarial terms start at this step"
    )
    lr: float = Field(1e-3, gt=0)
    disc_lr: float = Field(1e-3, gt=0)
    recon_label_balance: float = Field(
        0.0,
        ge=0,
        le=1,
        description="weight each voxel's reconstruction error by its label's share of its "
        "volume to this power, negated (0: plain L1; 0.5: rare labels such as vessels and "
        "lesions count by the inverse square root of their share)",
    )
    latent_scaling: Literal["range", "std"] = Field(
        "range",
        description="range: the training latents' per-channel min and max map to -1 and 1; "
        "std: their mean -/+ one standard deviation do (unit-variance latents, as latent "
        "diffusion usually assumes)",
    )

    def latent_shape(self, volume_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """``(E, d, h, w)``: the latent of a ``(D, H, W)`` volume."""
        return (self.embedding_dim, *(n // self.downsampling for n in volume_shape))


class DiffusionConfig(_Strict):
    channels: tuple[Positive, ...] = Field(
        (16, 32), min_length=1, description="UNet widths per level"
    )
    attention_levels: tuple[bool, ...] = (False, False)
    num_res_blocks: int = Field(1, ge=1)
    num_head_channels: int = Field(8, ge=1)
    norm_groups: int = Field(8, ge=1, description="GroupNorm groups; must divide every width")
    spade_channels: int = Field(16, ge=1, description="hidden width of each SPADE block")
    map_resize: Literal["nearest", "area"] = Field(
        "area",
        description="how SPADE shrinks the map to a feature map: nearest keeps one map voxel "
        "per feature voxel (MONAI's SPADE); area keeps the label fractions of every voxel",
    )
    map_at_input: bool = Field(
        False,
        description="also give the UNet's first layer the map's label fractions at the latent "
        "size, beside the noisy latent (SPADE alone reaches only the decoder)",
    )
    latent_patch: Literal[1, 2] = Field(
        1,
        description="the UNet sees the latent in blocks of this side folded into channels "
        "(space to depth) and unfolds its output the same way: 2 runs a 2x-compressed VQ-GAN's "
        "latent at the cost of a 4x-compressed one, with 8x the channels",
    )
    objective: Literal["ddpm", "rflow"] = Field(
        "rflow", description="ddpm: denoising diffusion, sampled with DDIM; rflow: rectified flow"
    )
    prediction: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="what a ddpm model predicts: the noise or the velocity v"
    )
    timesteps: int = Field(1000, ge=2)
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = "cosine"
    condition_dropout: float = Field(0.2, ge=0, le=1, description="share of null-map samples")
    guidance_scale: float = Field(1.5, ge=0, description="classifier-free guidance at sampling")
    sampling_steps: int = Field(
        5,
        ge=1,
        description="solver steps per volume (x2 UNet evaluations with guidance); 5 rectified-"
        "flow steps scored as 25 on the fidelity protocol (bench/results/fidelity_cpu*.md)",
    )
    ema_decay: float = Field(0.995, gt=0, lt=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)

    @model_validator(mode="after")
    def _levels_match(self) -> DiffusionConfig:
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("channels and attention_levels must have the same length")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"norm_groups {self.norm_groups} must divide every channel width")
        return self


class TrainConfig(_Strict):
    vqgan_steps: int = Field(400, ge=1, description="total VQ-GAN training steps")
    ldm_steps: int = Field(1500, ge=1, description="total latent diffusion training steps")
    seed: int = 0
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    preview_subjects: int = Field(3, ge=1, description="subjects reconstructed at the end")


class LSDMConfig(_Strict):
    preset: str = "custom"
    data: DataConfig = DataConfig()
    vqgan: VQGANConfig = VQGANConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _shape_fits_both_networks(self) -> LSDMConfig:
        unet = self.diffusion.latent_patch * 2 ** (len(self.diffusion.channels) - 1)
        factor = self.vqgan.downsampling * unet
        if any(n % factor for n in self.data.shape):
            raise ValueError(
                f"shape {self.data.shape}: every side must be divisible by {factor} "
                f"({self.vqgan.downsampling} for the VQ-GAN times {unet} for the UNet's latent "
                "patch and levels)"
            )
        return self

    def with_overrides(self, **sections: dict) -> LSDMConfig:
        """A copy with some fields of some sections replaced, validated again."""
        merged = self.model_dump()
        for section, values in sections.items():
            merged[section].update(values)
        return LSDMConfig.model_validate(merged)


PRESETS: dict[str, LSDMConfig] = {
    "tiny": LSDMConfig(preset="tiny"),
    "reference": LSDMConfig(
        preset="reference",
        data=DataConfig(shape=(32, 256, 256), batch_size=2, num_workers=4),
        vqgan=VQGANConfig(
            channels=(64, 128),
            num_res_layers=2,
            num_res_channels=(64, 128),
            num_embeddings=16384,
            embedding_dim=8,
            disc_channels=64,
            disc_layers=3,
            adversarial_start_step=1000,
            lr=1e-4,
            disc_lr=1e-4,
        ),
        diffusion=DiffusionConfig(
            channels=(128, 256, 512),
            attention_levels=(False, True, True),
            num_res_blocks=2,
            num_head_channels=32,
            norm_groups=32,
            spade_channels=128,
            batch_size=8,
            lr=1e-4,
        ),
        train=TrainConfig(
            vqgan_steps=100_000, ldm_steps=200_000, log_every=50, checkpoint_every=1000
        ),
    ),
}


def preset(name: str) -> LSDMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None


def load_config(path: Path) -> LSDMConfig:
    """Read a YAML configuration; it may name a ``preset`` whose values the file then overrides."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise InputError(
            f"cannot read configuration {path}: {' '.join(str(err).split())}"
        ) from None
    if not isinstance(raw, dict):
        raise InputError(f"configuration {path} must be a mapping")
    name = raw.pop("preset", None)
    if name is not None and not isinstance(name, str):
        raise InputError(f"configuration {path}: preset must be a name, not {name!r}")
    base = preset(name).model_dump() if name is not None else {}
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section].update(values)
        else:
            base[section] = values
    try:
        return LSDMConfig.model_validate(base)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise InputError(f"invalid configuration {path}: {problems}") from None
