"""`lsdm-node phantom-pacs` -> `lsdm-node prepare`: end to end on files, through the CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from deid_fixtures import byte_hits, harvest, label_map_for, phantom_series, tree_digest
from typer.testing import CliRunner

from deid.files import iter_files
from deid.keys import KEY_FILE, SiteKeys
from deid.scan import scan_path
from lsdm.cohort import read_manifest
from node.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pacs") / "export"
    result = invoke("phantom-pacs", "--out", root, "--subjects", 4, "--shape", 12, 24, 24)
    assert result.exit_code == 0, result.stderr
    # a corrupt DICOM file in the middle of a series folder, and a truncated one
    series_dir = next(p.parent for p in iter_files(root / "dicom") if p.name == "IM00005.dcm")
    good = (series_dir / "IM00005.dcm").read_bytes()
    (series_dir / "IM00005b.dcm").write_bytes(good[:132] + os.urandom(200))
    return root


@pytest.fixture(scope="module")
def prepared(pacs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    before = tree_digest(pacs)
    result = invoke("prepare", "--input", pacs / "dicom", "--maps", pacs / "maps",
                    "--out", tmp / "cohort", "--keys", tmp / "keys")  # fmt: skip
    return tmp, result, before


def test_prepare_writes_a_clean_cohort(pacs, prepared):
    tmp, result, _ = prepared
    assert result.exit_code == 0, result.stderr
    cohort = tmp / "cohort"
    manifest = read_manifest(cohort)
    assert len(manifest.subjects) == 4
    assert manifest.labels[4] == "lesion"
    for sid in manifest.ids:
        assert sid.startswith("s-") and len(sid) == 18
        img = nib.load(cohort / "images" / f"{sid}.nii.gz")
        lab = nib.load(cohort / "maps" / f"{sid}.nii.gz")
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        assert np.asarray(lab.dataobj).dtype == np.uint8
        assert img.header["descrip"].tobytes().strip(b"\x00") == b""
    assert scan_path(cohort) == []
    originals = harvest(pacs / "dicom")
    assert any("^" in v for v in originals) and any(v.startswith("MRN") for v in originals)
    assert byte_hits(cohort, originals) == []
    audit = [json.loads(line) for line in (cohort / "audit.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "included" for r in audit) == 4


def test_corrupt_file_is_reported_and_the_rest_processed(prepared):
    _, result, _ = prepared
    assert "IM00005b.dcm: " in result.stderr
    assert "EXPORT_NOTES.txt: not a DICOM file" in result.stderr
    assert "cohort of 4 subject(s)" in result.stdout


def test_input_is_untouched_and_keys_are_private(pacs, prepared):
    tmp, _, before = prepared
    assert tree_digest(pacs) == before
    key = tmp / "keys" / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = key.read_text().strip()
    _, result, _ = prepared
    assert secret not in result.stdout + result.stderr


def test_rerun_gives_same_pseudonyms_and_links_are_site_only(pacs, prepared, tmp_path):
    tmp, _, _ = prepared
    again = invoke("prepare", "--input", pacs / "dicom", "--maps", pacs / "maps",
                   "--out", tmp_path / "again", "--keys", tmp / "keys")  # fmt: skip
    assert again.exit_code == 0, again.stderr
    first = read_manifest(tmp / "cohort").ids
    assert read_manifest(tmp_path / "again").ids == first
    other = invoke("prepare", "--input", pacs / "dicom", "--maps", pacs / "maps",
                   "--out", tmp_path / "other", "--keys", tmp_path / "k2")  # fmt: skip
    assert other.exit_code == 0
    assert set(read_manifest(tmp_path / "other").ids).isdisjoint(first)
    # the site re-links a pseudonym to its SeriesInstanceUID; the link file is ciphertext
    relinked = invoke("relink", first[0], "--keys", tmp / "keys")
    assert relinked.exit_code == 0 and relinked.stdout.startswith(f"series {first[0]} = ")
    uid = relinked.stdout.split(" = ")[1].strip()
    assert (pacs / "maps" / f"{uid}.nii.gz").exists()
    assert uid.encode() not in (tmp / "keys" / "links.enc").read_bytes()


def test_unpaired_series_and_maps_are_reported(pacs, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    names = sorted(p.name for p in (pacs / "maps").iterdir())
    for name in names[:3]:
        (maps / name).write_bytes((pacs / "maps" / name).read_bytes())
    stray = np.zeros((4, 4, 4), np.uint8)
    nib.save(nib.Nifti1Image(stray, np.eye(4)), maps / "1.2.3.4.5.nii.gz")
    result = invoke("prepare", "--input", pacs / "dicom", "--maps", maps,
                    "--out", tmp_path / "c", "--keys", tmp_path / "k")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "no label map for this series" in result.stderr
    assert "1.2.3.4.5.nii.gz: a map that matches no series" in result.stderr
    assert len(read_manifest(tmp_path / "c").subjects) == 3


def test_pairs_csv_by_folder_and_mixed_orientation_rejected(tmp_path):
    from deid_fixtures import MR700, sample_dir

    src = tmp_path / "in"
    uid, volume, affine = phantom_series(src / "a" / "b", shape=(6, 10, 10))
    (src / "mr700").mkdir()
    for p in sample_dir(MR700).iterdir():
        (src / "mr700" / p.name).write_bytes(p.read_bytes())
    nib.save(nib.Nifti1Image(label_map_for(volume), affine), tmp_path / "lab.nii.gz")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        f"folder,map\n{src / 'a' / 'b'},{tmp_path / 'lab.nii.gz'}\n"
        f"{src / 'mr700'},{tmp_path / 'lab.nii.gz'}\n"
    )
    result = invoke("prepare", "--input", src, "--pairs", pairs, "--out", tmp_path / "c",
                    "--keys", tmp_path / "k", "--policy", "research")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "mixed orientations" in result.stderr
    manifest = read_manifest(tmp_path / "c")
    assert len(manifest.subjects) == 1 and manifest.subjects[0].shape == (6, 10, 10)  # no crop
    covariates = json.loads((tmp_path / "c" / "covariates.json").read_text())
    (entry,) = covariates.values()
    assert entry["sex"] == "F" and entry["age_band"].split("-")[0].isdigit()


def test_failing_run_leaves_nothing(pacs, tmp_path, monkeypatch):
    import node.prepare

    calls = []

    def disk_full(path, array, affine):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(28, "No space left on device", str(path))
        return write(path, array, affine)

    write = node.prepare.write_nifti
    monkeypatch.setattr(node.prepare, "write_nifti", disk_full)
    result = invoke("prepare", "--input", pacs / "dicom", "--maps", pacs / "maps",
                    "--out", tmp_path / "c", "--keys", tmp_path / "k")  # fmt: skip
    assert result.exit_code == 2 and "No space left on device" in result.stderr
    assert not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no staging folder left behind
    assert not (tmp_path / "k" / "links.enc").exists()


def test_scanner_gate_fails_closed(tmp_path):
    # A patient whose ID equals a label name: the known-value gate finds it in cohort.json and
    # the run publishes nothing, because it cannot tell the two apart.
    src = tmp_path / "in"
    uid, volume, affine = phantom_series(src / "se", shape=(5, 8, 8))
    from pydicom import dcmread

    for p in (src / "se").iterdir():
        ds = dcmread(p)
        ds.PatientID = "fibroglandular"
        ds.save_as(p)
    (tmp_path / "maps").mkdir()
    nib.save(nib.Nifti1Image(label_map_for(volume), affine), tmp_path / "maps" / f"{uid}.nii.gz")
    result = invoke("prepare", "--input", src, "--maps", tmp_path / "maps",
                    "--out", tmp_path / "c", "--keys", tmp_path / "k")  # fmt: skip
    assert result.exit_code == 1
    assert "cohort.json: file bytes: known value" in result.stderr
    assert "nothing was written" in result.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "/nonexistent/x"], "input folder not found"),
        (["--policy", "nope.yaml"], "nope.yaml: no such file"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, pacs, args, message):
    base = {"--input": str(pacs / "dicom"), "--out": str(tmp_path / "c"),
            "--keys": str(tmp_path / "k"), "--maps": str(pacs / "maps")}  # fmt: skip
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    result = invoke("prepare", *[x for kv in base.items() for x in kv])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_keys_inside_output_refused_and_secret_created_once(tmp_path, pacs):
    result = invoke("prepare", "--input", pacs / "dicom", "--maps", pacs / "maps",
                    "--out", tmp_path / "c", "--keys", tmp_path / "c" / "keys")  # fmt: skip
    assert result.exit_code == 2 and "key store must not lie inside" in result.stderr
    assert invoke("init", "--keys", tmp_path / "k").exit_code == 0
    before = (tmp_path / "k" / KEY_FILE).read_bytes()
    again = invoke("init", "--keys", tmp_path / "k")
    assert again.exit_code == 0 and "already present" in again.stdout
    assert (tmp_path / "k" / KEY_FILE).read_bytes() == before
    os.chmod(tmp_path / "k" / KEY_FILE, 0o644)
    with pytest.raises(Exception, match="readable by others"):
        SiteKeys.load(tmp_path / "k")
