"""Inputs that must be refused with one clear line, leaving nothing half-done (issue 14 §5):
non-finite images, a run killed before its first checkpoint, configuration gaps, ``prepare``'s
pairs files and empty or killed runs, an infinite ε, NIfTI headers that declare huge volumes, a
``.safetensors`` file that is not one, and sites the coordinator's gateway refuses."""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml
from deid_fixtures import label_map_for, phantom_series
from pydicom import dcmread
from starlette.testclient import TestClient
from typer.testing import CliRunner

from lsdm.atomic import staged_directory
from lsdm.cli import app as lsdm_app
from lsdm.config import load_config
from lsdm.data import open_cohort
from lsdm.errors import InputError
from lsdm.phantom import write_cohort
from lsdm.resnet_features import load_resnet_extractor
from lsdm.run_folder import RunFolder
from lsdm.train_vqgan import train_vqgan
from lsdm.training import run_steps
from node.cli import app as node_app
from policies.load import PolicyError, load_policy
from tests.helpers import small_config

SHAPE = (8, 16, 16)


def _one_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def _rewrite(path: Path, change) -> None:
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    change(data)
    nib.save(nib.Nifti1Image(data, img.affine), path)


def _huge_header(path: Path, shape=(1024, 1024, 512)) -> None:
    """A NIfTI file whose header declares ``shape`` (uint8) but that holds a few bytes."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\1" * 64)


def _peak_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# -- non-finite images -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_cohort_with_a_non_finite_voxel_is_refused(tmp_path, value):
    write_cohort(tmp_path, subjects=2, shape=SHAPE, seed=0)
    image = sorted((tmp_path / "images").iterdir())[1]

    def plant(data):
        data[3, 4, 5] = value

    _rewrite(image, plant)
    with pytest.raises(InputError, match="NaN or infinite") as err:
        open_cohort(tmp_path)
    assert str(image) in str(err.value)


def test_a_diverging_loss_stops_training_and_the_log_stays_json(tmp_path):
    config = small_config(6)
    run = RunFolder(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    losses = iter([1.0, 0.5, 0.25, 0.2, 0.1, float("nan")])
    with pytest.raises(InputError, match="diverged at step 6: loss is nan"):
        run_steps(
            run, config, 0, 6, range(6), lambda step, batch: {"loss": next(losses)},
            save=lambda step: None, volumes_per_batch=2,
        )  # fmt: skip
    for line in run.metrics_path.read_text().splitlines():  # strict JSON: no bare NaN
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    with pytest.raises(ValueError):
        run.log({"step": 7, "loss": math.nan})


# -- a run killed before its first checkpoint ------------------------------------------------------
class _Killed(BaseException):
    pass


def test_a_run_killed_before_its_first_checkpoint_starts_over(small_cohort, tmp_path):
    cohort = open_cohort(small_cohort)
    out = tmp_path / "run"

    def kill_at_2(done, total, losses):
        if done == 2:
            raise _Killed

    with pytest.raises(_Killed):  # checkpoint_every is 10: nothing saved yet
        train_vqgan(cohort, small_config(20), out, on_step=kill_at_2)
    assert (out / "config.json").is_file() and not (out / "checkpoint.safetensors").exists()
    (out / ".tmp1234.partial.safetensors").write_bytes(b"half a checkpoint")
    with pytest.raises(InputError, match="start it again without --resume"):
        train_vqgan(cohort, small_config(2), out, resume=True)
    result = train_vqgan(cohort, small_config(2), out)  # refused today ("use --resume")
    assert result.step == 2 and (out / "checkpoint.safetensors").is_file()
    assert not (out / ".tmp1234.partial.safetensors").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [2]
    with pytest.raises(InputError, match="use --resume"):  # a checkpointed run is never replaced
        train_vqgan(cohort, small_config(2), out)
    other = tmp_path / "other"  # nor is a folder holding anything but a run's own files
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        train_vqgan(cohort, small_config(2), other)
    assert (other / "notes.txt").read_text() == "mine"


# -- configuration files ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("data: {shape: [-32, 64, 64]}", "greater than or equal to 1"),
        ("preset: [tiny]", "preset must be a name"),
        ("vqgan: {lr: .nan}", "finite number"),
        ("vqgan: {disc_lr: .inf}", "finite number"),
        ("diffusion: {lr: -0.001}", "greater than 0"),
        ("diffusion: {guidance_scale: .inf}", "finite number"),
        ("data: {shape: [4096, 4096, 4096]}", "voxels"),
        ("data: {intensity_percentiles: [99, 1]}", "low < high"),
        ("data: {intensity_percentiles: [1, 101]}", "low < high"),
    ],
)
def test_configuration_gaps_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_a_configuration_that_is_not_utf8_is_one_line_through_the_cli(small_cohort, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"data:\n  shape: [16, 32, 32]\n# \xff\xfe\xfa\n")
    args = ["train", "vqgan", "--cohort", str(small_cohort), "--out", str(tmp_path / "o")]
    line = _one_line(CliRunner().invoke(lsdm_app, [*args, "--config", str(path)]))
    assert "cannot read configuration" in line and "utf-8" in line
    path.write_text("preset: [tiny]\n")
    assert "preset must be a name" in _one_line(
        CliRunner().invoke(lsdm_app, [*args, "--config", str(path)])
    )
    assert not (tmp_path / "o").exists()
    path.write_text("preset: reference\n")  # the limits refuse nothing a real configuration uses
    assert load_config(path).data.shape == (32, 256, 256)


# -- prepare ---------------------------------------------------------------------------------------
def _series(tmp_path: Path, name: str = "se", shape=(5, 8, 8)):
    src = tmp_path / "in"
    uid, volume, affine = phantom_series(src / name, shape=shape)
    (tmp_path / "maps").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(label_map_for(volume), affine), tmp_path / "maps" / f"{uid}.nii.gz")
    assert CliRunner().invoke(node_app, ["init", "--keys", str(tmp_path / "k")]).exit_code == 0
    return src, uid


def _prepare(tmp_path: Path, *extra):
    args = ["prepare", "--input", tmp_path / "in", "--out", tmp_path / "c",
            "--keys", tmp_path / "k", *extra]  # fmt: skip
    return CliRunner().invoke(node_app, [str(a) for a in args])


def test_prepare_refuses_pairs_that_are_not_utf8_or_leave_maps(tmp_path):
    _, uid = _series(tmp_path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(f"{uid},{uid}.nii.gz\n# caf\xe9\n".encode("latin-1"))
    line = _one_line(_prepare(tmp_path, "--maps", tmp_path / "maps", "--pairs", pairs))
    assert "not UTF-8" in line and str(pairs) in line
    outside = tmp_path / "elsewhere.nii.gz"
    outside.write_bytes((tmp_path / "maps" / f"{uid}.nii.gz").read_bytes())
    for target in ("../elsewhere.nii.gz", str(outside), "sub/../../elsewhere.nii.gz"):
        pairs.write_text(f"series,map\n{uid},{target}\n")
        line = _one_line(_prepare(tmp_path, "--maps", tmp_path / "maps", "--pairs", pairs))
        assert "pairs line 2" in line and "outside --maps" in line
    assert not (tmp_path / "c").exists()
    pairs.write_text(f"{uid},{uid}.nii.gz\n")  # inside --maps: fine
    assert _prepare(tmp_path, "--maps", tmp_path / "maps", "--pairs", pairs).exit_code == 0


def test_prepare_that_rejects_every_series_publishes_nothing(tmp_path):
    src, uid = _series(tmp_path)
    for path in (src / "se").iterdir():  # one NaN slice: the image is not finite
        ds = dcmread(path)
        if int(ds.InstanceNumber) == 2:
            ds.RescaleIntercept = "NaN"
            ds.save_as(path)
    line = _one_line(_prepare(tmp_path, "--maps", tmp_path / "maps"))
    assert "every series was rejected" in line and "NaN or infinite" in line
    assert not (tmp_path / "c").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "k", "maps"]  # no staging left
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(
        node_app, ["prepare", "--input", str(empty), "--out", str(tmp_path / "c"),
                   "--keys", str(tmp_path / "k")],
    )  # fmt: skip
    assert "no DICOM image series" in _one_line(result)


def test_prepare_refuses_a_map_header_declaring_a_huge_volume_without_reading_it(tmp_path):
    _, uid = _series(tmp_path)
    _huge_header(tmp_path / "maps" / f"{uid}.nii.gz")
    result = None

    def run():
        nonlocal result
        result = _prepare(tmp_path, "--maps", tmp_path / "maps")

    peak = _peak_bytes(run)
    line = _one_line(result)
    assert "declares shape (1024, 1024, 512)" in line
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a refused map"


def test_a_killed_staged_run_is_cleaned_up_by_the_next(tmp_path):
    out = tmp_path / "cohort"
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, sys\n"
         "from pathlib import Path\n"
         "from lsdm.atomic import staged_directory\n"
         "with staged_directory(Path(sys.argv[1])) as stage:\n"
         "    (stage / 'unscanned.nii.gz').write_bytes(b'patient')\n"
         "    os.kill(os.getpid(), 9)\n",
         str(out)],
        cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert killed.returncode == -9
    (left,) = tmp_path.glob(".cohort.*.partial")
    assert (left / "unscanned.nii.gz").exists()
    other = tmp_path / ".cohort.v2.999999.abc.partial"  # output cohort.v2's, not cohort's
    other.mkdir()
    live = tmp_path / f".cohort.{os.getpid()}.live.partial"  # a running process's
    live.mkdir()
    with staged_directory(out) as stage:
        (stage / "x").write_text("1")
    assert not left.exists() and other.exists() and live.exists()
    assert (out / "x").read_text() == "1"


# -- an infinite epsilon ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "policy",
    [
        {"kind": "site", "name": "s", "dp": {"enabled": True, "target_epsilon": float("inf")}},
        {"kind": "site", "name": "s", "release": {"max_epsilon": float("inf")}},
        {"kind": "site", "name": "s", "dp": {"target_delta": float("nan")}},
    ],
)
def test_an_infinite_epsilon_is_not_a_policy(tmp_path, policy):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(policy))
    assert ".inf" in path.read_text() or ".nan" in path.read_text()
    with pytest.raises(PolicyError, match="finite number"):
        load_policy(path)


def test_an_infinite_federation_epsilon_is_not_a_policy(tmp_path):
    path = tmp_path / "f.yaml"
    base = yaml.safe_load(yaml.safe_dump(load_policy("federation").model_dump(mode="json")))
    path.write_text(yaml.safe_dump({**base, "max_epsilon": float("inf")}))
    with pytest.raises(PolicyError, match="finite number"):
        load_policy(path)


# -- NIfTI headers and safetensors files -----------------------------------------------------------
def test_a_cohort_image_declaring_a_huge_volume_is_refused_before_reading(tmp_path):
    write_cohort(tmp_path, subjects=2, shape=SHAPE, seed=0)
    image = sorted((tmp_path / "images").iterdir())[0]
    _huge_header(image)

    def run():
        with pytest.raises(InputError, match=r"declares shape \(1024, 1024, 512\)"):
            open_cohort(tmp_path)

    peak = _peak_bytes(run)
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a refused image"


def test_a_map_declaring_a_huge_volume_is_refused_by_the_generator_before_reading(tmp_path):
    from lsdm.config import preset
    from lsdm.diffusion import build_ldm
    from lsdm.generate import Generator
    from lsdm.labels import BREAST_MRI_LABELS
    from lsdm.vqgan import VQGAN

    config = preset("tiny")
    labels = dict(BREAST_MRI_LABELS)
    generator = Generator(VQGAN(config.vqgan), build_ldm(config, len(labels)), config, labels)
    path = tmp_path / "m.nii.gz"
    _huge_header(path)

    def run():
        with pytest.raises(InputError, match=r"declares shape \(1024, 1024, 512\)"):
            generator.read_map(path)

    peak = _peak_bytes(run)
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a refused map"


def test_a_safetensors_file_that_is_not_one_is_an_input_error(tmp_path):
    fake = tmp_path / "resnet_10.safetensors"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_resnet_extractor(fake, 10)


# -- refused sites ---------------------------------------------------------------------------------
def test_refused_connections_are_logged_at_most_once_a_minute_per_address(caplog):
    from server.gateway import RefusalLog, make_app

    def superlink(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/activate-node"):
            return httpx.Response(412, json={"detail": "Failed to activate SuperNode."})
        return httpx.Response(200, content=b"ok")

    upstream = httpx.AsyncClient(
        transport=httpx.MockTransport(superlink), base_url="https://superlink"
    )
    caplog.set_level(logging.WARNING, logger="server.gateway")
    with TestClient(make_app("superlink", "unused-ca.pem", client=upstream)) as gateway:
        for _ in range(5):  # an unregistered site, retrying
            assert gateway.post("/v1/fleet/activate-node", content=b"x").status_code == 412
        assert gateway.post("/v1/fleet/pull-messages", content=b"x").status_code == 200
        assert gateway.get("/v1/control/list-runs").status_code == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "server.gateway"]
    assert len(lines) == 1, lines  # one line for this address in this minute
    assert "refused testclient" in lines[0] and "412" in lines[0]
    assert "Failed to activate SuperNode" in lines[0]

    now = [0.0]
    refusals = RefusalLog(interval_s=60, clock=lambda: now[0])
    caplog.clear()
    for t in (0, 1, 2, 30, 61, 62, 200):
        now[0] = t
        refusals.refused("10.0.0.7", "activate-node: 412")
    refusals.refused("10.0.0.8", "GET /: not the Fleet API (403)")
    lines = [r.getMessage() for r in caplog.records if r.name == "server.gateway"]
    assert len(lines) == 4
    assert "(and 3 more refused since the last line)" in lines[1]
    assert "(and 1 more refused since the last line)" in lines[2]
    assert lines[3].startswith("refused 10.0.0.8")
