"""Memorisation check: is a synthetic volume a (near) copy of a volume the model was trained on?

Distance ("map-residual distance"). Synthetic volumes are generated from label maps, often the
training subjects' own maps, so any distance that sees the anatomy calls a faithful synthetic
volume "close" to the patient whose map drove it. What a generator must not reproduce is what
the map does not determine: the fine texture and noise of a training image. So each volume (on
the model grid, intensities scaled to [-1, 1]) is reduced to its residual against its own map:

1. only labelled tissue (label index > 0) away from label boundaries counts: background (air,
   and the body behind the chest wall, whose unlabelled anatomy is alike in every subject) and
   voxels with another label within one voxel (partial volume follows the map) are set to 0;
2. within each label, the intensity minus its local mean over that label's counted voxels
   (a normalised Gaussian average, sigma 1.5 voxels): what is left is texture and noise, not the
   label's level, the bias field or any large-scale trend;
3. scaled to unit root-mean-square.

The distance of two volumes is the root-mean-square difference of their residuals,
``sqrt(mean((r_a - r_b)^2)) = sqrt(2 - 2 <r_a, r_b> / V)``: 0 for a copy, about sqrt(2) for
unrelated volumes, in [0, 2].

Check: for each synthetic volume its nearest training volume and distance; the same for the
reference volumes: held-out real volumes when given, else each training volume against the other
training volumes (leave one out). A synthetic volume is flagged as a near-copy when its distance
is below ``near_copy_factor`` (default 0.5) times the smallest reference distance, i.e. when it
is much closer to a training volume than any real volume of another patient ever is. The ratio
reported for the release gate is median(synthetic nearest distances) / median(reference nearest
distances).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from scipy.ndimage import gaussian_filter

NEAR_COPY_FACTOR = 0.5
SMOOTHING_VOXELS = 1.5
DISTANCE_NAME = (
    "map-residual distance: RMS difference of the volumes' texture residuals (labelled tissue away "
    "from label boundaries, by its own map; intensity minus its local mean within its label, "
    "Gaussian sigma 1.5 voxels; scaled to unit RMS): 0 = copy, ~1.41 = unrelated"
)


class Nearest(BaseModel):
    """A volume's nearest training volume and its distance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    nearest_training: str
    distance: float


class SyntheticNearest(Nearest):
    near_copy: bool


class Memorisation(BaseModel):
    """The check's result: the release report's ``memorisation`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    distance: str = DISTANCE_NAME
    reference: Literal["holdout", "leave-one-out"]
    reference_description: str
    threshold_rule: str
    near_copy_factor: float
    threshold: float
    synthetic: list[SyntheticNearest]
    reference_volumes: list[Nearest]
    synthetic_median: float
    reference_median: float
    median_ratio: float | None  # None when every reference distance is 0
    near_copies: list[str]


def _boundary(labels: torch.Tensor) -> torch.Tensor:
    """(D, H, W) label indices -> voxels with a different label in their 3x3x3 neighbourhood."""
    x = labels[None, None].float()
    high = F.max_pool3d(x, 3, stride=1, padding=1)
    low = -F.max_pool3d(-x, 3, stride=1, padding=1)
    return (high != low)[0, 0]


@torch.no_grad()
def map_residuals(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, 1, D, H, W) images and (N, D, H, W) label indices -> (N, V) unit-RMS residuals."""
    rows = []
    for image, label in zip(images, labels, strict=True):
        volume = image[0].double().numpy()
        label_values = label.numpy()
        counted = (label_values > 0) & ~_boundary(label).numpy()
        residual = np.zeros_like(volume)
        for value in np.unique(label_values[counted]):
            mask = counted & (label_values == value)
            weight = mask.astype(np.float64)
            local = gaussian_filter(volume * weight, SMOOTHING_VOXELS) / np.maximum(
                gaussian_filter(weight, SMOOTHING_VOXELS), 1e-6
            )
            residual[mask] = (volume - local)[mask]
        rms = np.sqrt(np.mean(residual**2))
        rows.append(torch.from_numpy(residual / rms if rms > 0 else residual).flatten().float())
    return torch.stack(rows)


def residual_distances(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(N, V) and (M, V) unit-RMS residuals -> (N, M) distances."""
    inner = (a.double() @ b.double().T) / a.shape[1]
    sq_a = a.double().pow(2).mean(1, keepdim=True)
    sq_b = b.double().pow(2).mean(1, keepdim=True).T
    return (sq_a + sq_b - 2 * inner).clamp_min(0).sqrt().numpy()


def _nearest(dist: np.ndarray, query_ids: list[str], train_ids: list[str]) -> list[Nearest]:
    index = dist.argmin(axis=1)
    return [
        Nearest(id=q, nearest_training=train_ids[j], distance=float(dist[i, j]))
        for i, (q, j) in enumerate(zip(query_ids, index, strict=True))
    ]


def check_memorisation(
    synthetic_ids: list[str],
    synthetic_images: torch.Tensor,
    synthetic_labels: torch.Tensor,
    train_ids: list[str],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    holdout: tuple[list[str], torch.Tensor, torch.Tensor] | None = None,
    near_copy_factor: float = NEAR_COPY_FACTOR,
) -> Memorisation:
    """The check described above."""
    if len(train_ids) < 2 and holdout is None:
        raise ValueError("the leave-one-out reference needs at least two training volumes")
    train = map_residuals(train_images, train_labels)
    synthetic = map_residuals(synthetic_images, synthetic_labels)
    nearest = _nearest(residual_distances(synthetic, train), synthetic_ids, train_ids)
    if holdout is not None:
        ids, images, labels = holdout
        reference = _nearest(
            residual_distances(map_residuals(images, labels), train), ids, train_ids
        )
        reference_kind = "holdout"
    else:
        dist = residual_distances(train, train)
        np.fill_diagonal(dist, np.inf)
        reference = _nearest(dist, train_ids, train_ids)
        reference_kind = "leave-one-out"
    reference_distances = np.array([r.distance for r in reference])
    threshold = near_copy_factor * float(reference_distances.min())
    per_synthetic = [
        SyntheticNearest(**e.model_dump(), near_copy=bool(e.distance < threshold)) for e in nearest
    ]
    synthetic_median = float(np.median([e.distance for e in per_synthetic]))
    reference_median = float(np.median(reference_distances))
    return Memorisation(
        reference=reference_kind,
        reference_description=(
            "held-out real volumes (not used in training) against the training volumes"
            if reference_kind == "holdout"
            else "each training volume against the other training volumes (no held-out set given)"
        ),
        threshold_rule=(
            f"near-copy when the distance to the nearest training volume is below "
            f"{near_copy_factor} x the smallest reference distance"
        ),
        near_copy_factor=near_copy_factor,
        threshold=threshold,
        synthetic=per_synthetic,
        reference_volumes=reference,
        synthetic_median=synthetic_median,
        reference_median=reference_median,
        median_ratio=synthetic_median / reference_median if reference_median > 0 else None,
        near_copies=[e.id for e in per_synthetic if e.near_copy],
    )
