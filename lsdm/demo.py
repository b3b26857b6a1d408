"""The main job on built-in data: a phantom cohort, then the VQ-GAN trained on it.

``<out>/cohort``  the phantom cohort (images/, maps/, cohort.json)
``<out>/vqgan``   the VQ-GAN run: checkpoint, metrics.jsonl, reconstructions/, preview.png
"""

from __future__ import annotations

from pathlib import Path

from lsdm.atomic import staged_directory
from lsdm.config import LSDMConfig
from lsdm.data import open_cohort
from lsdm.phantom import write_cohort
from lsdm.train_vqgan import VQGANRun, train_vqgan
from lsdm.training import StepCallback

DEMO_SUBJECTS = 8


def run_demo(
    out: Path, config: LSDMConfig, seed: int = 0, on_step: StepCallback | None = None
) -> VQGANRun:
    out = Path(out)
    with staged_directory(out / "cohort") as stage:
        write_cohort(stage, DEMO_SUBJECTS, config.data.shape, seed)
    return train_vqgan(open_cohort(out / "cohort"), config, out / "vqgan", on_step=on_step)
