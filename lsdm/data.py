"""Cohort folder -> MONAI dataset and loader of ``{"image", "map"}`` pairs.

Every cohort is checked before anything is read for training or written anywhere, and a problem is
reported as one :class:`~lsdm.errors.InputError` naming the file: a map without an image or the
reverse, grids (shape or affine) that disagree, an image with NaN or infinite values, a map with
non-integer values or labels outside the vocabulary, a header declaring a volume too large to
read, an unreadable file.

Item shapes (after :func:`make_transforms`): ``image`` (1, D, H, W) float in [-1, 1]; ``map``
(L, D, H, W) one-hot float over the cohort's vocabulary of L labels (it sums to 1 at every voxel).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapLabelValued,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
)

from lsdm.cohort import (
    IMAGES_DIR,
    MANIFEST_NAME,
    MAPS_DIR,
    NIFTI_SUFFIX,
    read_manifest,
    read_nifti,
    subject_id,
)
from lsdm.config import DataConfig
from lsdm.errors import InputError

# LoadImaged sets up every reader it knows, DICOM ones included, even when told to use NIfTI;
# on a machine without NVIDIA's image codec that prints two warnings per loader. Cohorts are NIfTI.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


@dataclass(frozen=True)
class Cohort:
    root: Path
    labels: dict[int, str]  # the vocabulary: label value -> name
    pairs: list[dict[str, str]]  # [{"id", "image", "map"}], paths as strings, sorted by id

    @property
    def ids(self) -> list[str]:
        return [p["id"] for p in self.pairs]


def _nifti_files(folder: Path) -> dict[str, Path]:
    return {subject_id(p): p for p in sorted(folder.glob(f"*{NIFTI_SUFFIX}"))}


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        return read_nifti(path)
    except Exception as err:  # nibabel raises many kinds for a truncated or foreign file
        raise InputError(f"unreadable file {path}: {err}") from None


def open_cohort(root: Path) -> Cohort:
    """Check a cohort folder completely and describe it; raises :class:`InputError` when bad."""
    root = Path(root)
    if not (root / MANIFEST_NAME).is_file():
        raise InputError(f"not a cohort (no {MANIFEST_NAME}): {root}")
    try:
        labels = read_manifest(root).labels
    except Exception as err:
        raise InputError(f"invalid {root / MANIFEST_NAME}: {err}") from None
    images, maps = _nifti_files(root / IMAGES_DIR), _nifti_files(root / MAPS_DIR)
    for orphan in sorted(set(maps) - set(images)):
        raise InputError(f"map without an image: {maps[orphan]}")
    for orphan in sorted(set(images) - set(maps)):
        raise InputError(f"image without a map: {images[orphan]}")
    if not images:
        raise InputError(f"cohort has no subjects: {root / IMAGES_DIR}")

    vocabulary = np.array(sorted(labels))
    for sid in sorted(images):
        image, image_affine = _load(images[sid])
        label_map, map_affine = _load(maps[sid])
        if image.shape[:3] != label_map.shape[:3] or image.ndim != 3 or label_map.ndim != 3:
            raise InputError(
                f"image {image.shape} and map {label_map.shape} shapes differ: {maps[sid]}"
            )
        if not np.allclose(image_affine, map_affine, atol=1e-4):
            raise InputError(f"image and map affines differ: {maps[sid]}")
        if not np.isfinite(image).all():
            raise InputError(f"image has NaN or infinite values: {images[sid]}")
        values = np.unique(label_map)
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise InputError(f"map has non-integer values: {maps[sid]}")
        unknown = np.setdiff1d(values, vocabulary)
        if unknown.size:
            raise InputError(
                f"map has labels {unknown.astype(int).tolist()} outside the vocabulary "
                f"{vocabulary.tolist()}: {maps[sid]}"
            )
    pairs = [
        {"id": sid, "image": str(images[sid]), "map": str(maps[sid])} for sid in sorted(images)
    ]
    return Cohort(root=root, labels=labels, pairs=pairs)


def make_transforms(config: DataConfig, labels: dict[int, str]) -> Compose:
    """Load, orient to RAS, crop/pad image and map alike, scale intensities, one-hot the map.

    Everything is deterministic (a centre crop), so a dataset can cache the result.
    """
    values = sorted(labels)
    low, high = config.intensity_percentiles
    return Compose(
        [
            LoadImaged(keys=["image", "map"], reader="NibabelReader", image_only=True),
            EnsureChannelFirstd(keys=["image", "map"], channel_dim="no_channel"),
            Orientationd(keys=["image", "map"], axcodes="RAS", labels=None),
            ResizeWithPadOrCropd(keys=["image", "map"], spatial_size=config.shape),
            ScaleIntensityRangePercentilesd(
                keys="image", lower=low, upper=high, b_min=-1.0, b_max=1.0, clip=True
            ),
            MapLabelValued(keys="map", orig_labels=values, target_labels=range(len(values))),
            AsDiscreted(keys="map", to_onehot=len(values)),
        ]
    )


def make_dataset(cohort: Cohort, config: DataConfig) -> CacheDataset:
    return CacheDataset(
        cohort.pairs, make_transforms(config, cohort.labels), progress=False, num_workers=0
    )


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches for training steps ``start_step .. steps-1`` over an endless stream of epochs.

    Epoch ``e`` visits the items in the order ``default_rng([seed, e]).permutation(n)``, and the
    batch of step ``s`` is items ``s*B .. s*B+B-1`` of that stream. The batch of a step is thus a
    function of the step alone, which is what makes a resumed run see the same data as an
    uninterrupted one.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int, steps: int):
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.steps = start_step, steps

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def _item(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return int(np.random.default_rng([self.seed, epoch]).permutation(self.n)[offset])

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            first = step * self.batch_size
            yield [self._item(p) for p in range(first, first + self.batch_size)]


def make_loader(
    dataset: CacheDataset,
    config: DataConfig,
    seed: int = 0,
    start_step: int = 0,
    steps: int | None = None,
) -> DataLoader:
    """Training batches for ``start_step .. steps-1`` (see :class:`StepBatchSampler`), or, with
    ``steps=None``, every item once in order (for evaluation and reconstructions)."""
    if steps is None:
        return DataLoader(dataset, batch_size=config.batch_size, shuffle=False)
    sampler = StepBatchSampler(len(dataset), config.batch_size, seed, start_step, steps)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers)
