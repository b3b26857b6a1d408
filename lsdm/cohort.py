"""The on-disk cohort layout shared by phantom cohorts and de-identified site cohorts.

A cohort is a folder::

    images/<id>.nii.gz   float image, one channel, 3D
    maps/<id>.nii.gz     integer label map on the same grid (same shape and affine)
    cohort.json          the manifest below: ids, shapes, spacing, label vocabulary, voxel counts

Only numpy, nibabel and pydantic are needed here, so the site side (``node``) can write and read
manifests without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from pydantic import BaseModel, Field

from lsdm.atomic import atomic_path, atomic_write_text

MANIFEST_NAME = "cohort.json"
IMAGES_DIR = "images"
MAPS_DIR = "maps"
NIFTI_SUFFIX = ".nii.gz"


class CohortSubject(BaseModel):
    id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    label_counts: dict[int, int] = Field(description="voxels per label value in the subject's map")


class CohortManifest(BaseModel):
    format_version: int = 1
    labels: dict[int, str] = Field(description="label vocabulary: value -> name; 0 is background")
    subjects: list[CohortSubject]

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.subjects]


def subject_id(path: Path) -> str:
    """``images/abc.nii.gz`` -> ``abc``."""
    name = path.name
    return name[: -len(NIFTI_SUFFIX)] if name.endswith(NIFTI_SUFFIX) else path.stem


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """A fresh NIfTI from array and affine only (no header text), written atomically."""
    with atomic_path(Path(path)) as tmp:
        nib.save(nib.Nifti1Image(array, affine), tmp)


def write_manifest(root: Path, labels: dict[int, str]) -> CohortManifest:
    """Describe every ``maps/<id>.nii.gz`` of ``root`` in ``root/cohort.json`` (atomically)."""
    root = Path(root)
    subjects = []
    for map_path in sorted((root / MAPS_DIR).glob(f"*{NIFTI_SUFFIX}")):
        img = nib.load(map_path)
        values, counts = np.unique(np.asarray(img.dataobj), return_counts=True)
        subjects.append(
            CohortSubject(
                id=subject_id(map_path),
                shape=tuple(int(s) for s in img.shape[:3]),
                spacing=tuple(float(z) for z in img.header.get_zooms()[:3]),
                label_counts={int(v): int(c) for v, c in zip(values, counts, strict=True)},
            )
        )
    manifest = CohortManifest(labels=labels, subjects=subjects)
    atomic_write_text(root / MANIFEST_NAME, manifest.model_dump_json(indent=2))
    return manifest


def read_manifest(root: Path) -> CohortManifest:
    return CohortManifest.model_validate(json.loads((Path(root) / MANIFEST_NAME).read_text()))
