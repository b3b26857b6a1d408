"""Cohort loading: every kind of bad input is one clear line and exit code 2, with nothing written;
a good cohort yields tensors of the configured shape."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lsdm.cli import app
from lsdm.config import preset
from lsdm.data import make_dataset, make_loader, open_cohort
from lsdm.phantom import write_cohort

SHAPE = (8, 16, 16)


@pytest.fixture
def cohort(tmp_path):
    root = tmp_path / "cohort"
    write_cohort(root, subjects=3, shape=SHAPE, seed=3)
    return root


def _ids(root):
    return sorted(p.name[: -len(".nii.gz")] for p in (root / "maps").glob("*.nii.gz"))


def _rewrite(path, array=None, affine=None):
    img = nib.load(path)
    data = np.asarray(img.dataobj) if array is None else array
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), path)


def _break_missing_image(root):
    path = root / "images" / f"{_ids(root)[1]}.nii.gz"
    path.unlink()
    return root / "maps" / path.name, "map without an image"


def _break_missing_map(root):
    path = root / "maps" / f"{_ids(root)[1]}.nii.gz"
    path.unlink()
    return root / "images" / path.name, "image without a map"


def _break_shape(root):
    path = root / "maps" / f"{_ids(root)[0]}.nii.gz"
    _rewrite(path, np.zeros((8, 16, 12), dtype=np.uint8))
    return path, "shapes differ"


def _break_affine(root):
    path = root / "maps" / f"{_ids(root)[2]}.nii.gz"
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 5.0
    _rewrite(path, affine=affine)
    return path, "affines differ"


def _break_non_integer(root):
    path = root / "maps" / f"{_ids(root)[0]}.nii.gz"
    data = np.asarray(nib.load(path).dataobj).astype(np.float32)
    data[0, 0, 0] = 1.5
    _rewrite(path, data)
    return path, "non-integer"


def _break_vocabulary(root):
    path = root / "maps" / f"{_ids(root)[1]}.nii.gz"
    data = np.asarray(nib.load(path).dataobj).copy()
    data[0, 0, 0] = 9
    _rewrite(path, data)
    return path, "outside the vocabulary"


def _break_truncated(root):
    path = root / "images" / f"{_ids(root)[2]}.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    return path, "unreadable"


@pytest.mark.parametrize(
    "damage",
    [
        _break_missing_image,
        _break_missing_map,
        _break_shape,
        _break_affine,
        _break_non_integer,
        _break_vocabulary,
        _break_truncated,
    ],
)
def test_bad_cohort_is_one_line_exit_2_and_writes_nothing(cohort, tmp_path, damage):
    culprit, reason = damage(cohort)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "vqgan", "--cohort", str(cohort), "--out", str(out), "--steps", "1"]
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert reason in lines[0] and str(culprit) in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_folder_that_is_not_a_cohort(tmp_path):
    result = CliRunner().invoke(
        app, ["train", "vqgan", "--cohort", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "not a cohort" in result.stderr


def test_good_cohort_yields_configured_tensors(cohort):
    config = preset("tiny").with_overrides(data={"shape": (8, 8, 24), "batch_size": 2})
    data = open_cohort(cohort)
    assert data.labels == {0: "background", 1: "fat", 2: "fibroglandular", 3: "vessel", 4: "lesion"}
    dataset = make_dataset(data, config.data)
    batch = next(iter(make_loader(dataset, config.data)))
    image, one_hot = batch["image"], batch["map"]
    # cropped along H (16 -> 8), padded along W (16 -> 24), same for image and map
    assert image.shape == (2, 1, 8, 8, 24) and one_hot.shape == (2, 5, 8, 8, 24)
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert image.min() == -1.0 and image.max() == 1.0  # the percentile window spans [-1, 1]
    torch.testing.assert_close(one_hot.sum(dim=1), torch.ones(2, 8, 8, 24))
    # the one-hot map is the file's map, cropped and padded the way the image was
    original = np.asarray(nib.load(data.pairs[0]["map"]).dataobj)
    expected = np.zeros((8, 8, 24), dtype=np.int64)
    expected[:, :, 4:20] = original[:, 4:12, :]
    np.testing.assert_array_equal(one_hot[0].argmax(0).numpy(), expected)


def test_step_batches_do_not_depend_on_where_a_run_started(cohort):
    config = preset("tiny").with_overrides(data={"shape": SHAPE, "batch_size": 2})
    dataset = make_dataset(open_cohort(cohort), config.data)
    straight = [b["image"] for b in make_loader(dataset, config.data, seed=5, steps=6)]
    resumed = [b["image"] for b in make_loader(dataset, config.data, seed=5, start_step=3, steps=6)]
    for a, b in zip(straight[3:], resumed, strict=True):
        torch.testing.assert_close(a, b)
    # every epoch visits every subject once (3 subjects, batch 2: steps 0-2 are two epochs)
    seen = torch.cat(straight[:3]).flatten(1)
    assert len({tuple(v[:50].tolist()) for v in seen}) == 3
