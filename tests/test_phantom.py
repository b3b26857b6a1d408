"""Phantom cohorts: deterministic per seed, varied subjects, every label, realistic images."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from lsdm.cli import app
from lsdm.phantom import PHANTOM_LABELS, make_subject


def _read(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def test_same_seed_gives_identical_files(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(
            app,
            [
                "phantom",
                "--out",
                str(tmp_path / name),
                "--subjects",
                "3",
                "--shape",
                "16",
                "32",
                "32",
                "--seed",
                "7",
            ],
        )
        assert result.exit_code == 0, result.output
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert files_a == files_b and len(files_a) == 7  # 3 images, 3 maps, cohort.json
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_different_seeds_give_different_subjects():
    a, b = make_subject(0, 0, (16, 32, 32)), make_subject(1, 0, (16, 32, 32))
    assert not np.array_equal(a.label_map, b.label_map)
    # and subjects of one cohort differ from each other in anatomy, not only in noise
    volumes = [int((make_subject(0, i, (16, 32, 32)).label_map > 0).sum()) for i in range(4)]
    assert len(set(volumes)) == 4


def test_cohort_of_eight_has_every_label_and_a_manifest(phantom_cohort):
    manifest = json.loads((phantom_cohort / "cohort.json").read_text())
    assert {int(k) for k in manifest["labels"]} == set(PHANTOM_LABELS)
    assert len(manifest["subjects"]) == 8
    present = set()
    for subject in manifest["subjects"]:
        label_map, map_affine = _read(phantom_cohort / "maps" / f"{subject['id']}.nii.gz")
        image, image_affine = _read(phantom_cohort / "images" / f"{subject['id']}.nii.gz")
        assert label_map.shape == image.shape == tuple(subject["shape"]) == (32, 64, 64)
        assert np.issubdtype(label_map.dtype, np.integer)
        np.testing.assert_allclose(map_affine, image_affine)
        counts = {int(k): v for k, v in subject["label_counts"].items()}
        assert counts == dict(zip(*np.unique(label_map, return_counts=True), strict=True))
        present |= set(counts)
    assert present == set(PHANTOM_LABELS)
    # lesions are in some subjects, not all
    with_lesion = sum(4 in {int(k) for k in s["label_counts"]} for s in manifest["subjects"])
    assert 0 < with_lesion < 8


def test_intensities_differ_by_label_but_overlap():
    subject = make_subject(0, 1, (32, 64, 64))
    by_label = {label: subject.image[subject.label_map == label] for label in (1, 2, 3)}
    means = {label: values.mean() for label, values in by_label.items()}
    # T1-like contrast: fibroglandular < fat < vessel, clearly apart on average ...
    assert means[2] < 0.85 * means[1] and means[1] < 0.95 * means[3]
    # ... but not a lookup of the map: within-label spread, and the distributions overlap.
    for values in by_label.values():
        assert values.std() > 0.05 * values.mean()
    assert np.percentile(by_label[2], 99) > np.percentile(by_label[1], 1)
    assert np.percentile(by_label[1], 99) > np.percentile(by_label[3], 1)


def test_background_has_structure_the_map_does_not_show():
    subject = make_subject(0, 0, (32, 64, 64))
    background = subject.image[subject.label_map == 0]
    # air and the body behind the chest wall share label 0 but not intensity
    assert np.percentile(background, 95) > 3 * np.percentile(background, 50)
