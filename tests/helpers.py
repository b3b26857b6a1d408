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
