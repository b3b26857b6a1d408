"""Metrics against values known by hand or in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import linalg

from lsdm.metrics import (
    NearestClassMean,
    foreground_dice,
    frechet_distance,
    label_intensity_distances,
    ms_ssim,
    paired_psnr_ssim,
)


def _closed_form(mu_a, cov_a, mu_b, cov_b) -> float:
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(1.0, 2.0, size=(40, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_equals_the_closed_form_for_known_gaussians():
    # N(0, I) against N(m, diag(s)): |m|^2 + sum(1 + s - 2 sqrt(s)); sampled generously
    rng = np.random.default_rng(1)
    mean, variances = np.array([1.0, -2.0, 0.5]), np.array([4.0, 0.25, 1.0])
    expected = float(np.sum(mean**2) + np.sum(1 + variances - 2 * np.sqrt(variances)))
    a = rng.normal(size=(200_000, 3))
    b = mean + rng.normal(size=(200_000, 3)) * np.sqrt(variances)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("n", [3, 5, 9])
def test_frechet_distance_with_few_volumes_uses_exactly_those(n):
    """Fewer than 10 volumes: the statistics of exactly the rows given (a padded matrix, as in
    the published evaluation, would shrink the distance)."""
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, 4)), rng.normal(0.5, 1.5, size=(n + 1, 4))
    expected = _closed_form(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    padded = np.vstack([a, np.zeros((1000 - n, 4))])
    assert frechet_distance(padded, b) != pytest.approx(expected, rel=0.1)


def test_dice_per_class_background_excluded_and_absent_classes():
    truth = np.zeros((4, 4, 4), dtype=int)
    prediction = np.zeros_like(truth)
    truth[0, :2] = 1  # 8 voxels of label 1
    prediction[0, :1] = 1  # 4 of them predicted
    prediction[3, 0, 0] = 2  # label 2 predicted where truth has none
    result = foreground_dice(prediction, truth, labels=[0, 1, 2, 3])
    assert result["per_class"][1] == pytest.approx(2 * 4 / (4 + 8))
    assert result["per_class"][2] == 0.0  # in one map only: 0
    assert math.isnan(result["per_class"][3])  # in neither: no Dice, not in the mean
    assert 0 not in result["per_class"]  # background is never scored
    assert result["mean"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_ms_ssim_fits_32_slice_volumes_and_ranks_similarity():
    rng = np.random.default_rng(2)
    volume = np.clip(rng.normal(size=(32, 64, 64)) * 0.3, -1, 1)
    slightly = np.clip(volume + rng.normal(size=volume.shape) * 0.05, -1, 1)
    unrelated = np.clip(rng.normal(size=volume.shape) * 0.3, -1, 1)
    assert ms_ssim(volume, volume) == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim(volume, slightly) > ms_ssim(volume, unrelated) + 0.3


def test_paired_psnr_and_ssim():
    real = np.zeros((8, 16, 16), dtype=np.float32)
    synthetic = real + 0.1  # MSE 0.01 on a range of 2: PSNR = 10 log10(4 / 0.01)
    result = paired_psnr_ssim(real, synthetic)
    assert result["psnr_db"] == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-4)
    assert paired_psnr_ssim(real, real)["ssim"] == pytest.approx(1.0, abs=1e-5)


def test_label_intensities_and_map_agreement():
    label_map = np.zeros((4, 4, 4), dtype=int)
    label_map[:2] = 1
    real = np.where(label_map == 1, 0.8, -0.6)
    shifted = real + 0.1
    distances = label_intensity_distances([real], [label_map], [shifted], [label_map])
    assert distances[1]["wasserstein"] == pytest.approx(0.1)
    assert distances[0]["real_mean"] == pytest.approx(-0.6)
    checker = NearestClassMean().fit([real], [label_map])
    assert checker.balanced_accuracy(real, label_map) == 1.0
    assert checker.balanced_accuracy(real[::-1], label_map) == 0.0


def test_frechet_fallback_formula_equals_monai():
    """The formula used when SciPy no longer takes the argument MONAI passes gives MONAI's value."""
    from lsdm.metrics import _frechet_by_formula

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 6)), rng.normal(1.0, 2.0, size=(15, 6))
    assert _frechet_by_formula(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    assert _frechet_by_formula(a, a) == pytest.approx(0.0, abs=1e-9)
