"""Shared fixtures: real phantom cohorts on disk, at sizes that keep the suite fast on 2 cores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lsdm.data import open_cohort
from lsdm.phantom import write_cohort
from tests.helpers import CONDITIONING_SHAPE, SMALL_SHAPE, conditioning_config


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory) -> Path:
    """Eight 32x64x64 phantom subjects (the issue's reference cohort for the phantom checks)."""
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, subjects=8, shape=(32, 64, 64), seed=0)
    return out


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_cohort")
    write_cohort(out, subjects=6, shape=SMALL_SHAPE, seed=1)
    return out


@dataclass(frozen=True)
class TrainedModels:
    cohort: Path
    vqgan: Path  # checkpoint
    ldm: Path  # checkpoint
    ldm_run: Path


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory) -> TrainedModels:
    """A VQ-GAN and a latent diffusion model trained centrally on 8 phantom subjects (~75 s)."""
    from lsdm.train_ldm import train_ldm
    from lsdm.train_vqgan import train_vqgan

    root = tmp_path_factory.mktemp("trained")
    write_cohort(root / "cohort", subjects=8, shape=CONDITIONING_SHAPE, seed=1)
    cohort = open_cohort(root / "cohort")
    config = conditioning_config()
    train_vqgan(cohort, config, root / "vqgan")
    train_ldm(cohort, root / "vqgan" / "checkpoint.safetensors", config, root / "ldm")
    return TrainedModels(
        cohort=root / "cohort",
        vqgan=root / "vqgan" / "checkpoint.safetensors",
        ldm=root / "ldm" / "checkpoint.safetensors",
        ldm_run=root / "ldm",
    )


@pytest.fixture
def processes():
    """Child processes of one test (Flower coordinators and sites), all killed at its end.
    Modules that share one federation across tests override it with a module-scoped one."""
    from tests.test_federation import Processes

    procs = Processes()
    yield procs
    procs.kill_all()
