"""The main job on built-in data: the whole central pipeline on phantom cohorts.

<out>/cohort       training cohort (phantom, seed 0)
<out>/heldout      held-out subjects (phantom, seed 1): their maps drive generation
<out>/vqgan        VQ-GAN run: checkpoint, metrics.jsonl, reconstructions/, preview.png
<out>/ldm          latent diffusion run: checkpoint, metrics.jsonl
<out>/synthetic    images/<id>.nii.gz generated from the held-out maps, maps/<id>.nii.gz
<out>/comparison.png   per held-out subject: map, real image, its reconstruction, synthetic image
<out>/summary.json     the figures printed at the end
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from lsdm.atomic import atomic_write_text, staged_directory
from lsdm.cohort import IMAGES_DIR, NIFTI_SUFFIX
from lsdm.config import LSDMConfig
from lsdm.data import Cohort, make_dataset, open_cohort
from lsdm.generate import Generator
from lsdm.metrics import NearestClassMean
from lsdm.phantom import write_cohort
from lsdm.preview import save_sheet
from lsdm.train_ldm import train_ldm
from lsdm.train_vqgan import train_vqgan
from lsdm.training import StepCallback
from lsdm.vqgan import VQGAN, reconstruct

TRAIN_SUBJECTS, HELDOUT_SUBJECTS = 16, 3


@dataclass
class MapAgreement:
    """NearestClassMean balanced accuracy (chance: 1 / labels) of held-out volumes against the
    map they belong to, and (``_swapped``) against the next subject's map."""

    map_agreement_real: float  # the real images: the ceiling
    map_agreement_real_swapped: float
    map_agreement_reconstructed: float  # the VQ-GAN's reconstructions of the real images: the
    map_agreement_reconstructed_swapped: float  # most a generator decoding through it can show
    map_agreement_synthetic: float  # the volumes generated from the maps
    map_agreement_synthetic_swapped: float
    map_agreement_mirrored: float  # the synthetic volumes against their own map mirrored

    def describe(self) -> str:
        return (
            "map agreement (balanced accuracy of a label-intensity voxel classifier, chance "
            "0.2), against each volume's own map / another subject's: "
            f"real {self.map_agreement_real:.2f} / {self.map_agreement_real_swapped:.2f}, "
            f"VQ-GAN reconstructions {self.map_agreement_reconstructed:.2f} / "
            f"{self.map_agreement_reconstructed_swapped:.2f}, synthetic "
            f"{self.map_agreement_synthetic:.2f} / {self.map_agreement_synthetic_swapped:.2f} "
            f"(against its own map mirrored: {self.map_agreement_mirrored:.2f})"
        )


@dataclass
class DemoSummary(MapAgreement):
    vqgan_psnr_db: float  # mean reconstruction PSNR of the previewed training subjects


def map_agreement(
    training: list[Cohort],
    heldout: Cohort,
    synthetic: Path,
    vqgan: VQGAN,
    config: LSDMConfig,
    sheet: Path,
) -> MapAgreement:
    """Does each synthetic volume follow its map? Each is scored by a classifier of the real
    training images' label intensities, against its own map, against the next subject's (the
    same anatomy with other details: real images lose much of their score there) and against
    its own map mirrored front to back (the body where the breasts were). Real held-out images
    give the ceiling, and ``vqgan``'s reconstructions of them the ceiling of any generator that
    decodes through it. Writes the comparison sheet (map, real, reconstructed, synthetic)."""
    images, maps = [], []
    for cohort in training:
        real = make_dataset(cohort, config.data)
        images += [real[i]["image"][0].numpy() for i in range(len(real))]
        maps += [real[i]["map"].argmax(0).numpy() for i in range(len(real))]
    checker = NearestClassMean().fit(images, maps)
    held = make_dataset(heldout, config.data)
    rows, scores = [], defaultdict(list)
    for i, sid in enumerate(heldout.ids):
        label_map = held[i]["map"].argmax(0).numpy()
        other_map = held[(i + 1) % len(held)]["map"].argmax(0).numpy()
        image = held[i]["image"][None].to(next(vqgan.parameters()).device)
        volumes = {
            "real": image[0, 0].cpu().numpy(),
            "reconstructed": reconstruct(vqgan, image)[0, 0].cpu().numpy(),
            "synthetic": np.asarray(
                nib.load(synthetic / IMAGES_DIR / f"{sid}{NIFTI_SUFFIX}").dataobj
            ),
        }
        for name, volume in volumes.items():
            scores[name].append(checker.balanced_accuracy(volume, label_map))
            scores[f"{name}_swapped"].append(checker.balanced_accuracy(volume, other_map))
        mirrored_map = np.flip(label_map, 1).copy()
        scores["mirrored"].append(checker.balanced_accuracy(volumes["synthetic"], mirrored_map))
        rows.append((sid, [("map", label_map), *volumes.items()]))
    save_sheet(rows, sheet, label_columns=["map"])
    return MapAgreement(**{f"map_agreement_{k}": float(np.mean(v)) for k, v in scores.items()})


def run_demo(
    out: Path,
    config: LSDMConfig,
    on_stage: Callable[[str, int], StepCallback] | None = None,
) -> DemoSummary:
    """Run every stage; ``on_stage(name, total)`` may return a progress callback for it."""
    out = Path(out)
    progress = on_stage or (lambda name, total: None)
    for name, subjects, seed in (("cohort", TRAIN_SUBJECTS, 0), ("heldout", HELDOUT_SUBJECTS, 1)):
        with staged_directory(out / name) as stage:
            write_cohort(stage, subjects, config.data.shape, seed)
    cohort, heldout = open_cohort(out / "cohort"), open_cohort(out / "heldout")

    vqgan_run = train_vqgan(
        cohort, config, out / "vqgan", on_step=progress("VQ-GAN", config.train.vqgan_steps)
    )
    vqgan_checkpoint = out / "vqgan" / "checkpoint.safetensors"
    train_ldm(
        cohort,
        vqgan_checkpoint,
        config,
        out / "ldm",
        on_step=progress("diffusion", config.train.ldm_steps),
    )
    generator = Generator.from_checkpoints(vqgan_checkpoint, out / "ldm" / "checkpoint.safetensors")
    sampling = progress("sampling", len(heldout.ids))
    generator.generate_folder(
        generator.check_folder(out / "heldout"),
        out / "synthetic",
        on_done=(lambda done, total: sampling(done, total, {})) if sampling else None,
    )

    agreement = map_agreement(
        [cohort], heldout, out / "synthetic", vqgan_run.model, config, out / "comparison.png"
    )
    summary = DemoSummary(
        vqgan_psnr_db=float(np.mean(list(vqgan_run.psnr.values()))), **asdict(agreement)
    )
    atomic_write_text(out / "summary.json", json.dumps(asdict(summary), indent=2))
    return summary
