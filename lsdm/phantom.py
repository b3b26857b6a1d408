"""Procedural breast-MRI-like phantom cohorts.

Public scans cannot be downloaded here, so the system ships its own: each subject is a 3D image and
a semantic map on the same grid, made from a random anatomy drawn per subject.

Anatomy is drawn in millimetres in the scanner's RAS frame (voxel axis 0 = R, 1 = A, 2 = S, the
affine is diagonal), over a fixed field of view, so the same seed gives the same subject at any
resolution. A prone breast MRI is imitated: the body lies posterior to a curved chest wall, two
breasts protrude anteriorly.

Labels: 0 background (air and the body behind the chest wall), 1 fat (breast tissue),
2 fibroglandular tissue, 3 vessels, 4 lesion (in some subjects).

Subjects differ like patients do: breast size, protrusion and droop, left/right asymmetry,
fibroglandular density (BI-RADS-like, 5-55 % of the breast) and texture scale, vessel count and
paths, lesion presence, size and place. The image is not a lookup of the map: every tissue has a
subject-specific mean intensity and its own texture, the body behind the chest wall has structure
the map does not show, boundaries are blurred by partial volume, and a smooth multiplicative bias
field and Rician noise are applied.

Only numpy and scipy are used (no torch), so site-side code may import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from lsdm.cohort import (
    IMAGES_DIR,
    MAPS_DIR,
    NIFTI_SUFFIX,
    CohortManifest,
    write_manifest,
    write_nifti,
)
from lsdm.labels import BREAST_MRI_LABELS

PHANTOM_LABELS: dict[int, str] = BREAST_MRI_LABELS  # every subject's map uses this vocabulary
FIELD_OF_VIEW_MM = (160.0, 200.0, 200.0)  # R, A, S
LESION_PROBABILITY = 0.6
INTENSITY_SCALE = 1000.0  # images are stored in a scanner-like range, not in [0, 1]


@dataclass(frozen=True)
class PhantomSubject:
    id: str
    image: np.ndarray  # float32, (D, H, W) = voxel axes (R, A, S)
    label_map: np.ndarray  # uint8, same shape
    affine: np.ndarray  # 4x4 voxel -> RAS millimetres


def default_spacing(shape: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(fov / n for fov, n in zip(FIELD_OF_VIEW_MM, shape, strict=True))


def _smooth_noise(rng: np.random.Generator, shape, sigma_mm: float, spacing) -> np.ndarray:
    """White noise low-passed at ``sigma_mm``, normalised to zero mean and unit std."""
    sigma_vox = [sigma_mm / s for s in spacing]
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-8)


def _grid_mm(shape, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def _draw_vessels(rng, breast, cw_level, shape, spacing, x, y, z, centre_x, reach) -> np.ndarray:
    """Tubes that leave the chest wall and wind anteriorly through one breast."""
    centreline = np.zeros(shape, dtype=bool)
    to_index = [
        lambda v, n=n, s=s: np.clip(np.round(v / s + (n - 1) / 2), 0, n - 1).astype(int)
        for n, s in zip(shape, spacing, strict=True)
    ]
    for _ in range(int(rng.integers(2, 6))):
        t = np.linspace(0.0, 1.0, 400)
        x0 = centre_x + rng.uniform(-0.5, 0.5) * reach[0]
        z0 = rng.uniform(-0.6, 0.6) * reach[2]
        amp, freq, phase = rng.uniform(4, 14, 2), rng.uniform(0.5, 2.0, 2), rng.uniform(0, 6.3, 2)
        px = x0 + amp[0] * np.sin(2 * np.pi * freq[0] * t + phase[0]) + rng.normal(0, 8) * t
        pz = z0 + amp[1] * np.sin(2 * np.pi * freq[1] * t + phase[1]) + rng.normal(0, 10) * t
        py = cw_level + t * reach[1] * rng.uniform(0.6, 0.95)
        centreline[to_index[0](px), to_index[1](py), to_index[2](pz)] = True
    distance = ndimage.distance_transform_edt(~centreline, sampling=spacing)
    radius = rng.uniform(2.0, 3.5)
    return (distance <= max(radius, 0.5 * min(spacing))) & breast


def make_subject(
    seed: int,
    index: int,
    shape: tuple[int, int, int] = (32, 64, 64),
    spacing: tuple[float, float, float] | None = None,
) -> PhantomSubject:
    """Draw subject ``index`` of cohort ``seed``; the same arguments give the same arrays."""
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in (spacing or default_spacing(shape)))
    rng = np.random.default_rng([seed, index])
    x, y, z = _grid_mm(shape, spacing)

    # Chest wall: a surface curving posteriorly away from the midline; the body lies behind it.
    cw_level = rng.uniform(-70, -30)
    chest_wall = cw_level - rng.uniform(0.002, 0.006) * x**2 - rng.uniform(0.0, 0.002) * z**2
    body = y < chest_wall

    # Two breasts: half-ellipsoids on the chest wall, with droop, asymmetry and an irregular skin.
    size = rng.uniform(0.7, 1.25)
    skin_irregularity = 0.12 * _smooth_noise(rng, shape, 25.0, spacing)
    breast = np.zeros(shape, dtype=bool)
    depth = np.zeros(shape, dtype=np.float32)  # 0 at the centre of the breast, 1 at the skin
    centres, reaches = [], []
    for side in (-1.0, 1.0):
        asym = rng.uniform(0.9, 1.1)
        reach = np.array([rng.uniform(28, 38), rng.uniform(45, 95) * size, rng.uniform(55, 85)])
        reach *= asym
        centre_x = side * rng.uniform(38, 48)
        droop = rng.uniform(0.0, 0.35) * reach[2]
        rel_y = (y - chest_wall) / reach[1]
        centre_z = rng.uniform(-10, 10) - droop * np.clip(rel_y, 0, 1) ** 2
        r = np.sqrt(((x - centre_x) / reach[0]) ** 2 + rel_y**2 + ((z - centre_z) / reach[2]) ** 2)
        this = (r < 1.0 + skin_irregularity) & (y >= chest_wall)
        depth = np.where(this, np.minimum(r, 1.0), depth)
        breast |= this
        centres.append(centre_x)
        reaches.append(reach)

    # Fibroglandular tissue: a textured field thresholded at the subject's density, kept off the
    # subcutaneous fat layer and concentrated centrally.
    density = rng.uniform(0.05, 0.55)
    texture_mm = rng.uniform(4.0, 12.0)
    fgt_field = _smooth_noise(rng, shape, texture_mm, spacing) - 2.5 * depth
    candidates = breast & (depth < 0.85)
    threshold = np.quantile(fgt_field[candidates], 1.0 - density) if candidates.any() else np.inf
    fgt = candidates & (fgt_field > threshold)

    vessels = np.zeros(shape, dtype=bool)
    for centre_x, reach in zip(centres, reaches, strict=True):
        vessels |= _draw_vessels(rng, breast, cw_level, shape, spacing, x, y, z, centre_x, reach)

    lesion = np.zeros(shape, dtype=bool)
    if rng.random() < LESION_PROBABILITY:
        inside = np.argwhere(fgt if fgt.sum() > 50 else candidates)
        if len(inside):
            centre = inside[rng.integers(len(inside))]
            centre_mm = [
                (c - (n - 1) / 2) * s for c, n, s in zip(centre, shape, spacing, strict=True)
            ]
            radius = rng.uniform(6.0, 16.0)
            spicules = 1.0 + 0.35 * _smooth_noise(rng, shape, 4.0, spacing)
            dist = np.sqrt(
                (x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (z - centre_mm[2]) ** 2
            )
            lesion = (dist < radius * spicules) & breast
            if not lesion.any():
                lesion[tuple(centre)] = True

    label_map = np.zeros(shape, dtype=np.uint8)
    label_map[breast] = 1
    label_map[fgt] = 2
    label_map[vessels] = 3
    label_map[lesion] = 4

    image = _render_image(rng, shape, spacing, label_map, body, y, chest_wall)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True)]
    return PhantomSubject(
        id=f"phantom-s{seed}-{index:03d}", image=image, label_map=label_map, affine=affine
    )


def _render_image(rng, shape, spacing, label_map, body, y, chest_wall) -> np.ndarray:
    """T1-weighted-like contrast: fat bright, fibroglandular tissue dark, enhancing vessels and
    lesion brightest; every tissue textured, then partial volume, bias field and Rician noise."""
    means = {
        1: rng.uniform(0.70, 0.82),
        2: rng.uniform(0.30, 0.45),
        3: rng.uniform(0.88, 1.00),
        # Enhancing, as in contrast-enhanced breast MRI. A mid-grey lesion (once 0.52-0.66) reads
        # as a blurred fat/fibroglandular boundary: no segmenter found it (segmenter_gpu.md).
        4: rng.uniform(1.00, 1.15),
    }
    texture = _smooth_noise(rng, shape, rng.uniform(2.0, 5.0), spacing)
    image = np.zeros(shape, dtype=np.float64)
    for label, mean in means.items():
        inside = label_map == label
        strength = 0.10 if label in (2, 4) else 0.05
        image[inside] = mean * (1.0 + strength * texture[inside])

    # The body behind the chest wall: pectoral muscle, then ribs and lungs; unlabelled, not empty.
    depth_behind = np.broadcast_to(chest_wall - y, shape)
    muscle = body & (depth_behind < rng.uniform(10, 20))
    inner = body & ~muscle
    image[muscle] = rng.uniform(0.25, 0.35) * (1.0 + 0.08 * texture[muscle])
    image[inner] = rng.uniform(0.08, 0.18) * (1.0 + 0.3 * texture[inner])

    image = ndimage.gaussian_filter(image, 0.6)  # partial volume at tissue boundaries
    bias = np.exp(rng.uniform(0.1, 0.25) * _smooth_noise(rng, shape, 80.0, spacing))
    image *= bias
    sigma = rng.uniform(0.015, 0.04)
    real = image + rng.normal(0.0, sigma, shape)
    imag = rng.normal(0.0, sigma, shape)
    return (np.sqrt(real**2 + imag**2) * INTENSITY_SCALE).astype(np.float32)


def write_subject(subject: PhantomSubject, out: Path) -> None:
    for folder, array in ((IMAGES_DIR, subject.image), (MAPS_DIR, subject.label_map)):
        write_nifti(Path(out) / folder / f"{subject.id}{NIFTI_SUFFIX}", array, subject.affine)


def write_cohort(
    out: Path,
    subjects: int,
    shape: tuple[int, int, int] = (32, 64, 64),
    seed: int = 0,
    progress=None,
) -> CohortManifest:
    """Write ``subjects`` phantom subjects as a cohort folder (see ``lsdm.cohort``).

    ``progress`` is an optional callable run after each subject (for a progress bar).
    """
    out = Path(out)
    for index in range(subjects):
        write_subject(make_subject(seed, index, shape), out)
        if progress is not None:
            progress()
    return write_manifest(out, PHANTOM_LABELS)
