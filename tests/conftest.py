"""Shared fixtures: real phantom cohorts on disk, at sizes that keep the suite fast on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from lsdm.phantom import write_cohort
from tests.helpers import SMALL_SHAPE


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
