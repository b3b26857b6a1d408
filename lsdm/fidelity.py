"""The evaluation protocol: how useful synthetic volumes are, measured against real ones.
``lsdm evaluate`` (:mod:`lsdm.evaluate`) and the release report (:mod:`lsdm.release_report`)
both run :func:`measure_fidelity`; each measure is also a function of its own, so that a caller
can compose others (reconstructions' Dice, codebook use, map agreement) on the same volumes.

Protocol (all seeds fixed and recorded): the real volumes are split into train and test subjects
(:func:`lsdm.segmenter.split_subjects`). A MONAI BasicUNet segmenter (:mod:`lsdm.segmenter`) is
trained and scored by per-class foreground Dice (background excluded, mean over subjects):

- ``real``: trained on the real train volumes, scored on the real test volumes;
- ``synthetic``: the same network, scored on the synthetic volumes whose map is not one of its
  training maps (all synthetic volumes when every one came from a training map);
- with ``synthetic_training``: ``train_synthetic_test_real`` (TSTR), trained on the synthetic
  volumes not made from a real test map, scored on the real test volumes; and
  ``real_plus_synthetic``, trained on both.

Beside these: the unpadded Fréchet distance between all real and all synthetic volumes in the
``real`` segmenter's bottleneck features (the network is saved and its SHA-256 reported; it was
trained on patient images), and optionally in a user-supplied 3D ResNet's; diversity as mean
MS-SSIM between synthetic volumes (lower: more diverse) with the real volumes' for reference;
with ``paired`` (each synthetic volume made from the map of the real subject of the same id):
paired PSNR/SSIM and per-label intensity distributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from lsdm.checkpoint import file_sha256, save_checkpoint
from lsdm.cohort import IMAGES_DIR, MAPS_DIR, NIFTI_SUFFIX
from lsdm.data import Cohort
from lsdm.errors import InputError
from lsdm.metrics import (
    frechet_distance,
    label_intensity_distances,
    mean_pairwise_ms_ssim,
    paired_psnr_ssim,
)
from lsdm.resnet_features import ResNetExtractor
from lsdm.segmenter import (
    EXTRACTOR,
    NETWORK,
    Segmenters,
    Split,
    Volumes,
    bottleneck_features,
    segment_dice,
    split_volumes,
    train_segmenters,
)

MAX_DIVERSITY_PAIRS = 100
DICE_DEFINITION = "per-class foreground Dice (background excluded), mean over subjects"
OnStage = Callable[[str, int], Callable[[int], None] | None]


def _finite(value: float) -> float | None:
    """A measure that has no value (NaN) is recorded as ``None`` (``null`` in JSON)."""
    return None if math.isnan(value) else float(value)


# -- what the protocol reports ---------------------------------------------------------------------
class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FidelitySettings(_Record):
    """The protocol's knobs; every one is recorded with the result."""

    segmentation_steps: int = Field(300, ge=1, description="training steps of each segmenter")
    seed: int = Field(0, description="seed of the split, of every training and of pair sampling")
    test_share: float = Field(0.34, gt=0, lt=1, description="share of real subjects held out")
    diversity_pairs: int | None = Field(
        MAX_DIVERSITY_PAIRS, ge=1, description="MS-SSIM over at most this many seeded pairs"
    )
    synthetic_training: bool = Field(False, description="also train on synthetic (TSTR, both)")
    paired: bool = Field(
        False, description="synthetic volume i came from real subject i's map: paired measures"
    )


class Dice(_Record):
    per_class: dict[str, float | None]  # foreground label name -> Dice (None: in no map)
    mean: float | None  # over the labels that have a Dice


class DiceScores(_Record):
    definition: str = DICE_DEFINITION
    real: Dice
    synthetic: Dice
    train_synthetic_test_real: Dice | None = None
    real_plus_synthetic: Dice | None = None


class SegmenterRecord(_Record):
    network: str = NETWORK
    trained_on: str = "real train split"
    steps: int
    seed: int
    real_train: list[str]
    real_test: list[str]
    synthetic_scored: list[str]
    synthetic_scored_rule: str
    synthetic_train: list[str] | None = None  # the TSTR training set, when trained


class FrechetDistance(_Record):
    value: float
    real_volumes: int
    synthetic_volumes: int
    padding: str = "none: exactly these volumes' features"
    extractor: str
    extractor_file: str | None = None
    extractor_sha256: str | None = None


class Diversity(_Record):
    definition: str
    ms_ssim_between_synthetic: float | None
    ms_ssim_between_real: float | None


class Paired(_Record):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    psnr_db: float  # infinite for identical volumes: written as Infinity
    ssim: float
    volumes: int


class LabelIntensity(_Record):
    real_mean: float
    real_std: float
    synthetic_mean: float
    synthetic_std: float
    wasserstein: float


class Fidelity(_Record):
    """What :func:`measure_fidelity` measured; the ``fidelity`` of a release report and the
    ``metrics.json`` of ``lsdm evaluate``."""

    labels: dict[int, str]
    settings: FidelitySettings
    segmenter: SegmenterRecord
    dice: DiceScores
    frechet_distance: FrechetDistance
    frechet_distance_resnet: FrechetDistance | None = None
    diversity: Diversity
    paired: Paired | None = None
    intensity_by_label: dict[str, LabelIntensity] | None = None

    def describe(self) -> str:
        """The headline figures, a few lines for a terminal."""

        def number(value: float | None, digits: str) -> str:
            return "–" if value is None else format(value, digits)

        scores = {
            key: getattr(self.dice, key)
            for key in ("real", "synthetic", "train_synthetic_test_real", "real_plus_synthetic")
        }
        lines = [
            f"Dice (mean over foreground labels, {len(self.segmenter.real_test)} test subjects):",
            *(
                f"  {key:28s} {number(dice.mean, '.3f')}"
                for key, dice in scores.items()
                if dice is not None
            ),
        ]
        for fd in (self.frechet_distance, self.frechet_distance_resnet):
            if fd is not None:
                lines.append(f"Fréchet distance: {fd.value:.4g} ({fd.extractor})")
        div = self.diversity
        lines.append(
            f"MS-SSIM between synthetic volumes: {number(div.ms_ssim_between_synthetic, '.3f')} "
            f"(real: {number(div.ms_ssim_between_real, '.3f')})"
        )
        return "\n".join(lines)


# -- the synthetic side ----------------------------------------------------------------------------
def open_synthetic(folder: Path, labels: dict[int, str], real: Cohort | None = None) -> Cohort:
    """A synthetic dataset (``images/`` and ``maps/``, as ``lsdm sample`` and ``lsdm-node
    generate`` write them) as a cohort; every image must have the map it was made from. With
    ``real``, each must also come from the map of the real subject of the same id (an identical
    map): the pairing that paired measures rely on."""
    folder = Path(folder)
    images = sorted((folder / IMAGES_DIR).glob(f"*{NIFTI_SUFFIX}"))
    if not images:
        raise InputError(f"no synthetic volumes in {folder / IMAGES_DIR}")
    real_maps = {p["id"]: p["map"] for p in real.pairs} if real is not None else {}
    pairs = []
    for image in images:
        sid = image.name[: -len(NIFTI_SUFFIX)]
        used_map = folder / MAPS_DIR / image.name
        if real is not None and sid not in real_maps:
            raise InputError(f"synthetic volume whose map is not in the real cohort: {image}")
        if not used_map.is_file():
            raise InputError(f"synthetic volume without the map it was made from: {image}")
        if real is not None and not np.array_equal(
            np.asarray(nib.load(used_map).dataobj), np.asarray(nib.load(real_maps[sid]).dataobj)
        ):
            raise InputError(
                f"map differs from the real subject's map {real_maps[sid]}: {used_map}"
            )
        pairs.append({"id": sid, "image": str(image), "map": str(used_map)})
    return Cohort(root=folder, labels=labels, pairs=pairs)


# -- the measures ----------------------------------------------------------------------------------
def dice(model: torch.nn.Module, volumes: Volumes, labels: dict[int, str]) -> Dice:
    per_class, mean = segment_dice(model, volumes, labels)
    return Dice(per_class=per_class, mean=mean)


def dice_scores(
    segmenters: Segmenters,
    real: Volumes,
    synthetic: Volumes,
    split: Split,
    labels: dict[int, str],
) -> DiceScores:
    real_test = real.subset(split.real_test)
    return DiceScores(
        real=dice(segmenters.real, real_test, labels),
        synthetic=dice(segmenters.real, synthetic.subset(split.synthetic_scored), labels),
        train_synthetic_test_real=(
            None if segmenters.synthetic is None else dice(segmenters.synthetic, real_test, labels)
        ),
        real_plus_synthetic=(
            None
            if segmenters.real_plus_synthetic is None
            else dice(segmenters.real_plus_synthetic, real_test, labels)
        ),
    )


def segmenter_frechet(
    segmenter: torch.nn.Module, real: Volumes, synthetic: Volumes, saved: Path, record_as: str
) -> FrechetDistance:
    """The Fréchet distance in ``segmenter``'s bottleneck features; the segmenter is saved to
    ``saved`` (recorded as ``record_as``) so that the extractor can be checked by its hash."""
    save_checkpoint(saved, {"segmenter": segmenter}, metadata={"kind": "extractor"})
    return FrechetDistance(
        value=frechet_distance(
            bottleneck_features(segmenter, real.images),
            bottleneck_features(segmenter, synthetic.images),
        ),
        real_volumes=len(real.ids),
        synthetic_volumes=len(synthetic.ids),
        extractor=EXTRACTOR,
        extractor_file=record_as,
        extractor_sha256=file_sha256(saved),
    )


def resnet_frechet(resnet: ResNetExtractor, real: Volumes, synthetic: Volumes) -> FrechetDistance:
    """The Fréchet distance in a user-supplied 3D ResNet's features."""
    return FrechetDistance(
        value=frechet_distance(
            resnet.features(real.images).numpy(), resnet.features(synthetic.images).numpy()
        ),
        real_volumes=len(real.ids),
        synthetic_volumes=len(synthetic.ids),
        extractor=resnet.name,
        extractor_file=str(resnet.source),
        extractor_sha256=resnet.sha256,
    )


def diversity(real: Volumes, synthetic: Volumes, max_pairs: int | None, seed: int) -> Diversity:
    limit = f"; at most {max_pairs} pairs, drawn with the seed" if max_pairs else ""
    return Diversity(
        definition=f"mean MS-SSIM between pairs of volumes (lower: more diverse){limit}",
        ms_ssim_between_synthetic=_finite(mean_pairwise_ms_ssim(synthetic.images, max_pairs, seed)),
        ms_ssim_between_real=_finite(mean_pairwise_ms_ssim(real.images, max_pairs, seed)),
    )


def paired(real: Volumes, synthetic: Volumes) -> Paired:
    """Mean PSNR/SSIM of each synthetic volume against the real volume of the same id."""
    real = real.subset(synthetic.ids)
    values = [
        paired_psnr_ssim(r[0].numpy(), s[0].numpy())
        for r, s in zip(real.images, synthetic.images, strict=True)
    ]
    return Paired(
        psnr_db=float(np.mean([v["psnr_db"] for v in values])),
        ssim=float(np.mean([v["ssim"] for v in values])),
        volumes=len(values),
    )


def intensity_by_label(
    real: Volumes, synthetic: Volumes, labels: dict[int, str]
) -> dict[str, LabelIntensity]:
    """Per label name, its voxels' intensities in real and synthetic volumes, both read by the
    real subjects' maps (so the synthetic volumes must be paired)."""
    real = real.subset(synthetic.ids)
    maps = [m.numpy() for m in real.labels]
    distances = label_intensity_distances(
        [v[0].numpy() for v in real.images], maps, [v[0].numpy() for v in synthetic.images], maps
    )
    vocabulary = sorted(labels)
    return {labels[vocabulary[k]]: LabelIntensity(**v) for k, v in distances.items()}


# -- the protocol ----------------------------------------------------------------------------------
def measure_fidelity(
    real: Volumes,
    synthetic: Volumes,
    labels: dict[int, str],
    settings: FidelitySettings,
    extractor_path: Path,
    extractor_record: str | None = None,
    on_stage: OnStage | None = None,
    device: torch.device | str = "cpu",
    resnet: ResNetExtractor | None = None,
) -> Fidelity:
    """The protocol above. ``real`` and ``synthetic`` are on the model grid; ``labels`` the
    vocabulary (value -> name) their label indices refer to, sorted by value. The real segmenter
    is saved at ``extractor_path`` and named ``extractor_record`` (default: the file's name)."""
    if settings.paired and not set(synthetic.ids) <= set(real.ids):
        raise ValueError("paired measures need a real volume for every synthetic one")
    split = split_volumes(real, synthetic, settings.seed, settings.test_share)
    if not split.real_train:
        raise InputError(f"need at least 2 real subjects, found {len(real.ids)}")
    segmenters = train_segmenters(
        real,
        synthetic,
        split,
        len(labels),
        settings.segmentation_steps,
        settings.seed,
        settings.synthetic_training,
        on_stage,
        device,
    )
    record = extractor_record or Path(extractor_path).name
    return Fidelity(
        labels=labels,
        settings=settings,
        segmenter=SegmenterRecord(
            steps=settings.segmentation_steps,
            seed=settings.seed,
            real_train=split.real_train,
            real_test=split.real_test,
            synthetic_scored=split.synthetic_scored,
            synthetic_scored_rule=(
                "all synthetic volumes (every one came from a segmenter training map)"
                if split.all_scored
                else "synthetic volumes whose map is not one of the segmenter's training maps"
            ),
            synthetic_train=split.synthetic_train if settings.synthetic_training else None,
        ),
        dice=dice_scores(segmenters, real, synthetic, split, labels),
        frechet_distance=segmenter_frechet(
            segmenters.real, real, synthetic, Path(extractor_path), record
        ),
        frechet_distance_resnet=resnet_frechet(resnet, real, synthetic) if resnet else None,
        diversity=diversity(real, synthetic, settings.diversity_pairs, settings.seed),
        paired=paired(real, synthetic) if settings.paired else None,
        intensity_by_label=intensity_by_label(real, synthetic, labels) if settings.paired else None,
    )
