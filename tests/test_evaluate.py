"""``lsdm evaluate``: real-vs-real is perfect, real-vs-noise clearly worse, mismatches refused."""

from __future__ import annotations

import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lsdm.cli import app
from lsdm.evaluate import load_metrics

# Few segmentation steps: these tests check the protocol's bookkeeping (pairing, identical inputs
# give identical scores, unpadded distances), not how well a briefly trained segmenter segments.
STEPS = "20"


def _as_synthetic(cohort, folder, noise_seed=None):
    """The cohort's own images (or noise on their grids) laid out as `lsdm sample` writes them."""
    shutil.copytree(cohort / "maps", folder / "maps")
    (folder / "images").mkdir()
    rng = np.random.default_rng(noise_seed)
    for path in sorted((cohort / "images").glob("*.nii.gz")):
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        if noise_seed is not None:
            data = rng.uniform(-1, 1, data.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(data, img.affine), folder / "images" / path.name)
    return folder


def _evaluate(cohort, synthetic, out, *extra: str):
    return CliRunner().invoke(
        app,
        [
            "evaluate",
            "--real",
            str(cohort),
            "--synthetic",
            str(synthetic),
            "--out",
            str(out),
            "--steps",
            STEPS,
            "--seed",
            "0",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """User-supplied 3D ResNet-10 weights (random here: only the bookkeeping is tested)."""
    from safetensors.torch import save_file

    from lsdm.resnet_features import build_resnet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet_10.safetensors"
    save_file(build_resnet(10).state_dict(), str(path))
    return ["--extractor-weights", str(path), "--extractor-depth", "10"]


@pytest.fixture(scope="module")
def real_vs_real(small_cohort, tmp_path_factory, resnet_weights):
    root = tmp_path_factory.mktemp("eval")
    synthetic = _as_synthetic(small_cohort, root / "syn")
    result = _evaluate(small_cohort, synthetic, root / "out", *resnet_weights)
    assert result.exit_code == 0, result.output
    return load_metrics(root / "out" / "metrics.json"), root / "out"


def test_real_against_itself_scores_like_real(real_vs_real):
    metrics, out = real_vs_real
    dice = metrics.dice
    assert dice.synthetic == dice.real  # the same volumes through the same network
    assert "background" not in str(list(dice.real.per_class))  # foreground labels only
    assert "0" not in {str(k) for k in dice.real.per_class}
    assert metrics.frechet_distance.value == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance.real_volumes == 6
    assert metrics.frechet_distance.synthetic_volumes == 6
    assert len(metrics.frechet_distance.extractor_sha256) == 64
    resnet = metrics.frechet_distance_resnet
    assert resnet.value == pytest.approx(0.0, abs=1e-6) and resnet.real_volumes == 6
    assert "ResNet-10" in resnet.extractor and len(resnet.extractor_sha256) == 64
    assert metrics.paired.ssim == pytest.approx(1.0, abs=1e-4)
    assert math.isinf(metrics.paired.psnr_db) or metrics.paired.psnr_db > 60
    diversity = metrics.diversity
    assert diversity.ms_ssim_between_synthetic == pytest.approx(diversity.ms_ssim_between_real)
    for name in ("metrics.json", "dice.png", "intensities.png", "extractor.safetensors"):
        assert (out / name).is_file()


def test_real_against_noise_is_clearly_worse(small_cohort, real_vs_real, tmp_path, resnet_weights):
    reference, _ = real_vs_real
    synthetic = _as_synthetic(small_cohort, tmp_path / "noise", noise_seed=1)
    result = _evaluate(small_cohort, synthetic, tmp_path / "out", *resnet_weights)
    assert result.exit_code == 0, result.output
    metrics = load_metrics(tmp_path / "out" / "metrics.json")
    assert metrics.dice.real == reference.dice.real  # seeds fixed: same real side
    assert metrics.frechet_distance.value > 100 * max(reference.frechet_distance.value, 1e-6)
    assert metrics.paired.psnr_db < 10
    assert metrics.frechet_distance_resnet.value > 1e-3


def test_mismatched_pairs_are_refused(small_cohort, tmp_path):
    stray = _as_synthetic(small_cohort, tmp_path / "stray")
    first = sorted((stray / "images").iterdir())[0]
    first.rename(stray / "images" / "not-in-cohort.nii.gz")
    result = _evaluate(small_cohort, stray, tmp_path / "o1")
    assert result.exit_code == 2 and "map is not in the real cohort" in result.stderr
    assert "not-in-cohort.nii.gz" in result.stderr and not (tmp_path / "o1").exists()

    altered = _as_synthetic(small_cohort, tmp_path / "altered")
    used_map = sorted((altered / "maps").iterdir())[1]
    data = np.asarray(nib.load(used_map).dataobj).copy()
    data[0, 0, 0] = (data[0, 0, 0] + 1) % 5
    nib.save(nib.Nifti1Image(data, nib.load(used_map).affine), used_map)
    result = _evaluate(small_cohort, altered, tmp_path / "o2")
    assert (
        result.exit_code == 2 and "map differs" in result.stderr and str(used_map) in result.stderr
    )
