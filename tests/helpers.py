"""Helpers shared by the tests."""

from __future__ import annotations

from lsdm.config import LSDMConfig, preset

# Small volumes for training tests: the tiny preset's networks on 16x32x32 phantoms.
SMALL_SHAPE = (16, 32, 32)


def small_config(steps: int, **vqgan) -> LSDMConfig:
    """The tiny preset on SMALL_SHAPE volumes, trained for ``steps`` steps."""
    return preset("tiny").with_overrides(
        data={"shape": SMALL_SHAPE, "batch_size": 2},
        train={"vqgan_steps": steps, "log_every": 5, "checkpoint_every": 10, "preview_subjects": 2},
        vqgan=vqgan,
    )


# The conditioning checks need latents big enough to carry a breast's layout: 24x48x48 volumes
# (6x12x12 latents) learn to follow their maps in 500 diffusion steps; 16x32x32 ones do not.
CONDITIONING_SHAPE = (24, 48, 48)


def conditioning_config(vqgan_steps: int = 200, ldm_steps: int = 500) -> LSDMConfig:
    return preset("tiny").with_overrides(
        data={"shape": CONDITIONING_SHAPE, "batch_size": 2},
        vqgan={"adversarial_start_step": vqgan_steps - 40},
        train={
            "vqgan_steps": vqgan_steps,
            "ldm_steps": ldm_steps,
            "log_every": 10,
            "checkpoint_every": 100,
            "preview_subjects": 2,
        },
    )
