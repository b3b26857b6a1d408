"""``lsdm sample`` and ``lsdm train ldm`` from the command line: good runs and one-line errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from lsdm.cli import app


def _map_folder(trained_models, tmp_path, count=2):
    folder = tmp_path / "maps"
    folder.mkdir()
    for source in sorted((trained_models.cohort / "maps").glob("*.nii.gz"))[:count]:
        (folder / source.name).write_bytes(source.read_bytes())
    return folder


def _sample(trained_models, maps, out, *extra):
    return CliRunner().invoke(
        app,
        [
            "sample",
            "--vqgan",
            str(trained_models.vqgan),
            "--ldm",
            str(trained_models.ldm),
            "--maps",
            str(maps),
            "--out",
            str(out),
            *extra,
        ],
    )


def test_sample_writes_a_volume_and_its_map_per_input(trained_models, tmp_path):
    maps = _map_folder(trained_models, tmp_path)
    result = _sample(trained_models, maps, tmp_path / "out", "--steps", "3", "--seed", "4")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in maps.iterdir())
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "out" / "maps").iterdir()) == names
    again = _sample(trained_models, maps, tmp_path / "out", "--steps", "3", "--seed", "4")
    assert again.exit_code == 0 and "generated 0 volumes" in again.output


def _bad_labels(path):
    data = np.asarray(nib.load(path).dataobj).copy()
    data[0, 0, 0] = 7
    return data, "outside the model's vocabulary"


def _bad_shape(path):
    return np.asarray(nib.load(path).dataobj)[:, :, :44], "divisible by 8"


def _bad_values(path):
    data = np.asarray(nib.load(path).dataobj).astype(np.float32)
    data[1, 1, 1] = 0.5
    return data, "non-integer"


@pytest.mark.parametrize("damage", [_bad_labels, _bad_shape, _bad_values])
def test_a_bad_map_is_one_line_exit_2_and_nothing_is_written(trained_models, tmp_path, damage):
    maps = _map_folder(trained_models, tmp_path)
    culprit = sorted(maps.iterdir())[1]
    data, reason = damage(culprit)
    nib.save(nib.Nifti1Image(data, nib.load(culprit).affine), culprit)
    result = _sample(trained_models, maps, tmp_path / "out", "--steps", "2")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0] and str(culprit) in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoints_of_the_wrong_kind_are_refused(trained_models, tmp_path):
    maps = _map_folder(trained_models, tmp_path, count=1)
    result = CliRunner().invoke(
        app,
        [
            "sample",
            "--vqgan",
            str(trained_models.vqgan),
            "--ldm",
            str(trained_models.vqgan),
            "--maps",
            str(maps),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2 and "not a ldm checkpoint" in result.stderr


def test_train_ldm_command_runs_and_resumes(trained_models, tmp_path):
    args = [
        "train",
        "ldm",
        "--cohort",
        str(trained_models.cohort),
        "--vqgan",
        str(trained_models.vqgan),
        "--out",
        str(tmp_path / "run"),
    ]
    first = CliRunner().invoke(app, [*args, "--steps", "2"])
    assert first.exit_code == 0, first.output
    refused = CliRunner().invoke(app, [*args, "--steps", "4"])
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    resumed = CliRunner().invoke(app, [*args, "--steps", "4", "--resume"])
    assert resumed.exit_code == 0 and "trained to step 4" in resumed.output
