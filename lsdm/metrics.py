"""Measures of synthetic volumes. Each function states its definition."""

from __future__ import annotations

import warnings
from itertools import combinations

import numpy as np
import torch
from monai.metrics import FIDMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from scipy.stats import wasserstein_distance


class NearestClassMean:
    """Does a volume follow its map? A voxel classifier that knows only each label's mean
    intensity in real images.

    ``fit`` learns, per label, the mean intensity of its voxels over real (image, map) pairs.
    ``balanced_accuracy(image, map)`` labels every voxel of ``image`` with the label whose mean
    is nearest, and returns the mean over labels present in ``map`` of the share of that label's
    voxels labelled correctly (chance: 1 / number of labels present). A synthetic volume that
    follows its map scores near what real images score; one that ignores it scores near chance,
    and so does a volume scored against another subject's map.
    """

    def __init__(self) -> None:
        self.labels: np.ndarray | None = None
        self.means: np.ndarray | None = None

    def fit(self, images: list[np.ndarray], maps: list[np.ndarray]) -> NearestClassMean:
        values = np.concatenate([np.ravel(i) for i in images])
        labels = np.concatenate([np.ravel(m) for m in maps]).astype(np.int64)
        self.labels = np.unique(labels)
        self.means = np.array([values[labels == label].mean() for label in self.labels])
        return self

    def predict(self, image: np.ndarray) -> np.ndarray:
        nearest = np.abs(np.asarray(image)[..., None] - self.means).argmin(axis=-1)
        return self.labels[nearest]

    def balanced_accuracy(self, image: np.ndarray, label_map: np.ndarray) -> float:
        predicted = self.predict(image)
        truth = np.asarray(label_map).astype(np.int64)
        recalls = [(predicted[truth == label] == label).mean() for label in np.unique(truth)]
        return float(np.mean(recalls))


def foreground_dice(prediction: np.ndarray, truth: np.ndarray, labels: list[int]) -> dict:
    """Per-class Dice of two label maps, background excluded.

    For each foreground label ``l`` (every label of ``labels`` but 0):
    ``2 |P_l ∩ T_l| / (|P_l| + |T_l|)``. A label absent from both maps has no Dice: it is NaN and
    left out of the mean; absent from one map only, it scores 0. Returns
    ``{"per_class": {label: dice}, "mean": mean over the labels that have one}``.
    """
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"shapes differ: {prediction.shape} and {truth.shape}")
    per_class = {}
    for label in labels:
        if label == 0:
            continue
        p, t = prediction == label, truth == label
        total = int(p.sum() + t.sum())
        per_class[int(label)] = float(2 * (p & t).sum() / total) if total else float("nan")
    values = [v for v in per_class.values() if not np.isnan(v)]
    return {"per_class": per_class, "mean": float(np.mean(values)) if values else float("nan")}


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, F)`` and ``(M, F)``:
    ``|μ_a − μ_b|² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)``, over exactly the rows given (no padding,
    means subtracted from copies). Computed by MONAI's ``FIDMetric``; the feature extractor is
    the caller's and must be named wherever the number is reported."""
    a, b = (torch.as_tensor(np.asarray(f, dtype=np.float64)) for f in (features_a, features_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, F) with the same F: {a.shape}, {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("a covariance needs at least two feature vectors per set")
    with warnings.catch_warnings():  # MONAI passes scipy's deprecated sqrtm(disp=...)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return float(FIDMetric()(a, b))
        except TypeError:  # a SciPy that has dropped sqrtm's disp argument: the same formula
            return _frechet_by_formula(a.numpy(), b.numpy())


def _frechet_by_formula(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.linalg import sqrtm

    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def ms_ssim(volume_a: np.ndarray, volume_b: np.ndarray, data_range: float = 2.0) -> float:
    """Multi-scale SSIM of two (D, H, W) volumes on the [-1, 1] scale (``data_range`` 2).

    Three scales with a 3-voxel Gaussian window (σ 0.5), so that 32-slice volumes fit (MONAI's
    defaults, five scales of 11 voxels, need sides of 176); the weights are the first three of the
    standard five, renormalised. Between synthetic volumes it measures diversity (lower: more
    diverse)."""
    weights = np.array([0.0448, 0.2856, 0.3001])
    metric = MultiScaleSSIMMetric(
        spatial_dims=3,
        data_range=data_range,
        kernel_size=3,
        kernel_sigma=0.5,
        weights=tuple(weights / weights.sum()),
    )
    a, b = (
        torch.as_tensor(np.asarray(v, dtype=np.float32))[None, None] for v in (volume_a, volume_b)
    )
    return float(metric(a, b).mean())


def mean_pairwise_ms_ssim(
    images: torch.Tensor, max_pairs: int | None = None, seed: int = 0
) -> float:
    """Mean MS-SSIM over pairs of ``images`` (N, 1, D, H, W): all pairs, or ``max_pairs`` of them
    drawn without replacement (seeded) when there are more; NaN for fewer than two images."""
    pairs = list(combinations(range(len(images)), 2))
    if not pairs:
        return float("nan")
    if max_pairs is not None and len(pairs) > max_pairs:
        chosen = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(chosen)]
    return float(np.mean([ms_ssim(images[a, 0].numpy(), images[b, 0].numpy()) for a, b in pairs]))


def paired_psnr_ssim(real: np.ndarray, synthetic: np.ndarray, data_range: float = 2.0) -> dict:
    """PSNR (dB) and SSIM (7-voxel Gaussian window) between a real volume and the synthetic one
    made from its map, both (D, H, W) on the [-1, 1] scale."""
    a, b = (torch.as_tensor(np.asarray(v, dtype=np.float32))[None, None] for v in (real, synthetic))
    return {
        "psnr_db": float(PSNRMetric(max_val=data_range)(b, a).mean()),
        "ssim": float(SSIMMetric(spatial_dims=3, data_range=data_range, win_size=7)(b, a).mean()),
    }


def label_intensity_distances(
    real_images: list[np.ndarray],
    real_maps: list[np.ndarray],
    synthetic_images: list[np.ndarray],
    synthetic_maps: list[np.ndarray],
) -> dict[int, dict]:
    """Per label, the intensity distribution of its voxels in real and in synthetic volumes:
    means, standard deviations, and the 1-Wasserstein distance between the two distributions
    (in intensity units). Labels present in both sets only."""

    def by_label(images, maps):
        values = np.concatenate([np.ravel(i) for i in images])
        labels = np.concatenate([np.ravel(m) for m in maps]).astype(np.int64)
        return {int(label): values[labels == label] for label in np.unique(labels)}

    real, synthetic = by_label(real_images, real_maps), by_label(synthetic_images, synthetic_maps)
    return {
        label: {
            "real_mean": float(real[label].mean()),
            "real_std": float(real[label].std()),
            "synthetic_mean": float(synthetic[label].mean()),
            "synthetic_std": float(synthetic[label].std()),
            "wasserstein": float(wasserstein_distance(real[label], synthetic[label])),
        }
        for label in sorted(set(real) & set(synthetic))
    }
