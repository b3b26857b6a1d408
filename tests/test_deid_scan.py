"""The PHI scanner finds what survives: in DICOM, NIfTI headers, JSON and file names."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from deid_fixtures import sample_dir, sample_file
from typer.testing import CliRunner

from deid.scan import scan_path
from node.cli import app


def kinds(findings) -> set[str]:
    return {f.kind for f in findings}


def test_raw_dicom_is_full_of_findings():
    findings = scan_path(sample_file("CT_small.dcm"))
    where = {f.where for f in findings}
    assert {"PatientName", "StudyDate", "SOPInstanceUID", "InstitutionName"} <= where
    assert {"name", "date", "uid", "private", "institution", "marker"} <= kinds(findings)
    # findings never repeat the value they found
    assert not any("CompressedSamples" in f.line() for f in findings)


def test_nested_sequences_are_searched():
    findings = scan_path(sample_file("rtplan.dcm"))
    assert any("[0]." in f.where and f.kind in ("name", "uid", "date") for f in findings)


def test_nifti_json_and_file_names(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header["descrip"] = b"DOE^JANE 20190304"
    img.header["aux_file"] = b"mrn123"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"comment"))
    nib.save(img, tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp_path / "ok.nii.gz")
    (tmp_path / "meta.json").write_text(json.dumps({"patient_name": "Jane", "n": 3,
                                                    "note": "seen 2019-03-04"}))  # fmt: skip
    (tmp_path / "DOE_JANE_20190304.txt").write_text("x")
    (tmp_path / "1.2.840.113619.2.55.3.604688119.969.1268071029.320").write_text("x")
    findings = scan_path(tmp_path)
    by_file = {}
    for f in findings:
        by_file.setdefault(f.path, set()).add(f.where)
    assert {"NIfTI descrip", "NIfTI aux_file", "NIfTI extensions"} <= by_file["scan.nii.gz"]
    assert "ok.nii.gz" not in by_file
    assert {"$.patient_name", "$.note"} <= by_file["meta.json"]
    assert "file name" in by_file["DOE_JANE_20190304.txt"]
    assert any(f.kind == "uid" and f.where == "file name" for f in findings)


def test_known_values_are_found_byte_by_byte(tmp_path):
    (tmp_path / "report.csv").write_bytes(b"id,notes\n1,PRIMARY MARY-ANNE\n")
    assert scan_path(tmp_path, known_values={"MARY"}) != []
    assert scan_path(tmp_path, known_values={"PRIM"}) == []  # whole tokens only


def test_scan_cli_exit_codes(tmp_path):
    runner = CliRunner()
    dirty = runner.invoke(app, ["scan", str(sample_dir("dicomdirtests/98892001/CT5N"))])
    assert dirty.exit_code == 1 and "finding" in dirty.stdout
    (tmp_path / "clean").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)),
             tmp_path / "clean" / "s-abcdefghijklmnop.nii.gz")  # fmt: skip
    clean = runner.invoke(app, ["scan", str(tmp_path / "clean")])
    assert clean.exit_code == 0 and clean.stdout.startswith("clean")
    missing = runner.invoke(app, ["scan", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: not found")


def test_pseudonyms_never_look_like_identifiers(tmp_path):
    """Keyed pseudonyms are letters only: no secret can make one read as a date, UID or record
    number (a base32 pseudonym once held "746356" and failed a run's final scan)."""
    from deid.keys import SiteKeys
    from deid.scan import check_filename

    keys = SiteKeys(tmp_path, bytes(range(32)))
    names = [keys.pseudonym(kind, f"original-{i}") for kind in "pst" for i in range(2000)]
    assert len(set(names)) == len(names)
    assert all(name[2:].isalpha() and len(name) == 18 for name in names)
    assert not [n for n in names if check_filename(f"{n}/{n}.dcm")]
