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
import math
from pathlib import Path

import nibabel as nib
import numpy as np
from pydantic import BaseModel, Field

from lsdm.atomic import atomic_path, atomic_write_text

MANIFEST_NAME = "cohort.json"
IMAGES_DIR = "images"
MAPS_DIR = "maps"
NIFTI_SUFFIX = ".nii.gz"
# The largest volume any reader here allocates (a 1024x1024x256 scan; the reference grid is 2.1M).
MAX_NIFTI_VOXELS = 1024 * 1024 * 256


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


def declared_voxels(img: nib.Nifti1Image) -> int:
    """The voxel count ``img``'s header declares, checked before any voxel is read; raises
    ``ValueError`` (which readers turn into their own one-line error) beyond the limit."""
    shape = tuple(int(n) for n in img.header.get_data_shape())
    voxels = math.prod(shape)
    if voxels > MAX_NIFTI_VOXELS:
        raise ValueError(
            f"its header declares shape {shape}, {voxels} voxels, more than the "
            f"{MAX_NIFTI_VOXELS} allowed"
        )
    return voxels


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a NIfTI file whose declared size is within :data:`MAX_NIFTI_VOXELS`
    (checked from the header, before the data is read). Raises whatever nibabel raises for a
    file it cannot read, and ``ValueError`` for one too large."""
    img = nib.load(path)
    declared_voxels(img)
    return np.asarray(img.dataobj), img.affine


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` (3D, array axes as given) with its voxel-to-RAS ``affine`` as a NIfTI-1 file.

    The one NIfTI writer of the project (phantoms, de-identified site cohorts, reconstructions,
    synthetic volumes and their maps). Its header rule, which de-identification relies on (NIfTI
    headers carry free text, see DESIGN §6):

    - the header is made fresh from the array and the affine alone, never copied from an input;
    - its text fields ``descrip``, ``aux_file``, ``intent_name`` and ``db_name`` are empty, and it
      has no header extensions;
    - qform and sform both hold ``affine`` with code 1 (scanner), units are mm and seconds;
    - dtype: the array's own dtype is stored unchanged (callers pass float32 images and uint8 label
      maps); nibabel refuses 64-bit integers, so a map must be narrowed before it is written.

    The file is written atomically: a reader never sees it half-written.
    """
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    header = img.header
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        header[field] = b""
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    with atomic_path(Path(path)) as tmp:
        nib.save(img, tmp)


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
