"""The PHI scanner finds what survives: in DICOM, NIfTI headers, JSON and file names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from deid_fixtures import KEEP_PRIVATE, harvest, phantom_series, sample_dir, sample_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from typer.testing import CliRunner

from deid.dicom import Deidentifier
from deid.files import read_dicom
from deid.keys import SiteKeys
from deid.phantom_dicom import PRIVATE_CREATOR
from deid.scan import scan_path
from node.cli import app
from policies import load_site_policy, parse_policy
from policies.site import SitePolicy


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
    assert scan_path(tmp_path, known_values={"mary"}) != []  # any case
    # a short value is not found where it continues a word: PRIM and MARY in PRIMARY
    assert scan_path(tmp_path, known_values={"PRIM", "RIMA"}) == []


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


# -- text the Annex E table does not list (issue 14, item 3) ---------------------------------------
@dataclass
class Output:
    path: Path  # the one de-identified file, out/x.dcm
    policy: SitePolicy
    known: set[str]  # the input's identifying values, as deid-dicom harvests them
    source: Dataset  # the original slice


def _deidentified(tmp_path, policy_name: str = "strict") -> Output:
    """A de-identified phantom slice on disk, in which the scanner finds nothing."""
    phantom_series(tmp_path / "in", shape=(4, 6, 6))
    source = read_dicom(sorted((tmp_path / "in").glob("*.dcm"))[0])
    policy = load_site_policy(policy_name)
    keys = SiteKeys.create(tmp_path / "keys")
    ds = Deidentifier(policy, keys).apply(read_dicom(sorted((tmp_path / "in").glob("*.dcm"))[0]))
    out = tmp_path / "out"
    out.mkdir()
    ds.dataset.save_as(out / "x.dcm", enforce_file_format=True)
    known = harvest(tmp_path / "in")
    assert scan_path(out, policy=policy, known_values=known) == []
    return Output(out / "x.dcm", policy, known, source)


def _nested(ds, path: str):
    """The dataset at ``Seq[0].Seq[0]`` (created as needed)."""
    for step in path.split("."):
        keyword = step.split("[")[0]
        if keyword not in ds or not ds[keyword].value:
            setattr(ds, keyword, Sequence([Dataset()]))
        ds = getattr(ds, keyword)[0]
    return ds


# (where, VR, text, kind): a phone, a date or a record number in unlisted text of each VR, at the
# top level and nested, in a cleaned descriptor, and in a private element the policy keeps
PATTERN_CASES = [
    ("CommentsOnTheScheduledProcedureStep", "LT", "call daughter 555-0172", "phone"),
    ("ManufacturerModelName", "LO", "MRN 6340277", "id"),
    ("ReceiveCoilName", "SH", "14.07.1961", "date"),
    ("PartialViewDescription", "ST", "seen July 14, 1961", "date"),
    ("PotentialReasonsForProcedure", "UC", "tel +44 20 7946 0958", "phone"),
    ("ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].TextValue", "UT",
     "ref NHS810866780", "id"),
    ("ScheduledProcedureStepSequence[0].CommentsOnTheScheduledProcedureStep", "LT",
     "born 07/14/61", "date"),
    ("StudyDescription", "LO", "BILAT 1961-07-14", "date"),  # listed, cleaned (C)
]  # fmt: skip


@pytest.mark.parametrize(("where", "vr", "text", "kind"), PATTERN_CASES)
def test_phone_date_and_record_numbers_are_flagged_in_any_text_attribute(
    tmp_path, where, vr, text, kind
):
    path = _deidentified(tmp_path, "research").path
    ds = read_dicom(path)
    *parents, keyword = where.split(".")
    target = _nested(ds, ".".join(parents)) if parents else ds
    target.add_new(tag_for_keyword(keyword), vr, text)
    ds.save_as(path, enforce_file_format=True)
    findings = scan_path(path, policy=load_site_policy("research"))
    assert [(f.where, f.kind) for f in findings] == [(where, kind)]
    assert not any(text in f.line() for f in findings)  # the hint never repeats the value


def test_private_text_the_policy_keeps_is_checked_too(tmp_path):
    path = _deidentified(tmp_path).path
    policy = parse_policy(KEEP_PRIVATE)
    ds = read_dicom(path)
    block = ds.private_block(0x0029, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "call 555-0172")
    ds.save_as(path, enforce_file_format=True)
    findings = scan_path(path, policy=policy)
    assert [(f.where, f.kind) for f in findings] == [("(0029,1001)", "phone")]


def test_unlisted_free_text_is_flagged_where_the_policy_removes_it(tmp_path):
    """Strict keeps no free text (LT, ST, UT) the table does not list, nor unlisted attributes
    named for a person: whatever they hold is a finding."""
    output = _deidentified(tmp_path)
    path, policy = output.path, output.policy
    ds = read_dicom(path)
    ds.add_new(0x00400400, "LT", "patient anxious")
    ds.PatientBirthDateInAlternativeCalendar = "1320/10/30"
    ds.save_as(path, enforce_file_format=True)
    where = {f.where for f in scan_path(path, policy=policy)}
    assert where == {"CommentsOnTheScheduledProcedureStep", "PatientBirthDateInAlternativeCalendar"}


@pytest.mark.parametrize("policy_name", ["strict", "research"])
def test_technical_text_and_numbers_are_not_flagged(tmp_path, policy_name):
    """No false positives on what scanners write: model names, versions, sequence names, coil
    names, codes with long digit runs, window explanations, numbers with many decimals."""
    output = _deidentified(tmp_path, policy_name)
    path, policy = output.path, output.policy
    ds = read_dicom(path)
    ds.Manufacturer, ds.ManufacturerModelName = "SIEMENS", "Avanto_fit"
    ds.SoftwareVersions = ["syngo MR E11", "VB17A", "4.0.12"]
    ds.SequenceName, ds.ReceiveCoilName = "*tfl3d1_16ns", "Breast 16"
    ds.WindowCenterWidthExplanation = ["WINDOW1", "WINDOW2"]
    ds.PixelSpacing = ["0.7421875", "0.7421875"]
    ds.SpacingBetweenSlices = "1.200000047683716"
    region = _nested(ds, "AnatomicRegionSequence")
    region.CodeValue, region.CodingSchemeDesignator = "76752008", "SCT"
    region.CodeMeaning = "Breast"
    concept = _nested(ds, "ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence")
    concept.CodeValue, concept.CodingSchemeDesignator = "C0018787", "UMLS"
    concept.CodeMeaning = "Heart"
    if policy_name == "research":  # free text is kept (and checked) under Clean Descriptors
        ds.add_new(0x00400400, "LT", "1.5 T, 3 mm slices, b=800, 25 degree flip, 100-200 ms")
    ds.save_as(path, enforce_file_format=True)
    assert scan_path(path, policy=policy, known_values=output.known) == []


def test_known_values_found_in_any_case_inside_words_and_by_digit_core(tmp_path):
    """The input says HALVORSEN^BEATRIZ and MRN6340277; outputs that spell them otherwise are
    caught by the known-value search (no pattern would flag a bare surname)."""
    output = _deidentified(tmp_path)
    path, policy, known = output.path, output.policy, output.known
    family, given = str(output.source.PatientName).split("^")[:2]
    mrn = str(output.source.PatientID)
    digits, birth = mrn[3:], output.source.PatientBirthDate
    iso = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    assert {family, given, mrn, digits, iso} <= known
    ds = read_dicom(path)
    ds.ManufacturerModelName = f"for {family.title()}"  # unlisted LO, other case
    ds.save_as(path, enforce_file_format=True)
    notes = tmp_path / "out" / "notes"
    notes.mkdir()
    cases = {
        "lower.txt": f"seen by {family.lower()}",
        "camel.txt": f"{given.title()}{family.title()}",
        "glued.txt": f"{given}{family}_2",
        "core.txt": f"ref {digits}.",
        "iso.txt": f"born {iso}",
    }
    for name, text in cases.items():
        (notes / name).write_text(text)
    (notes / "ok.txt").write_text(f"{digits}9 0.{digits} PRIMARY")
    found = {f.path for f in scan_path(tmp_path / "out", policy=policy, known_values=known)}
    assert found == {"x.dcm"} | {f"notes/{name}" for name in cases}
    # without the input's values, the surname in DICOM text is no pattern: nothing to flag there
    assert scan_path(path, policy=policy) == []


def test_scan_cli_reports_the_reported_note(tmp_path):
    """`lsdm-node scan` on a copy that kept the note in (0040,0400) (what deid-dicom wrote before
    the fix) reports it, with and without --originals."""
    output = _deidentified(tmp_path)
    family, given = str(output.source.PatientName).split("^")[:2]
    note = f"Pt {given.title()} {family.title()} ({output.source.PatientID}), call 555-0172"
    ds = read_dicom(output.path)
    ds.add_new(0x00400400, "LT", note)
    ds.save_as(output.path, enforce_file_format=True)
    runner = CliRunner()
    for extra in ([], ["--originals", str(tmp_path / "in")]):
        result = runner.invoke(app, ["scan", str(tmp_path / "out"), *extra], env={"COLUMNS": "200"})
        assert result.exit_code == 1, result.stdout
        assert "CommentsOnTheScheduledProcedureStep" in result.stdout
        assert family.lower() not in result.stdout.lower()
