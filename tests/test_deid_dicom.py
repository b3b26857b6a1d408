"""`lsdm-node deid-dicom` over real DICOM: pydicom's files, pydicom-data, deid-data, phantoms."""

from __future__ import annotations

import datetime as dt
import stat
from collections import defaultdict
from pathlib import Path

import pytest
from deid_fixtures import (
    KEEP_PRIVATE,
    build_export,
    byte_hits,
    element_at,
    harvest,
    phantom_series,
    plant_identity,
    sample_file,
    tree_digest,
)
from pydicom import dcmread
from typer.testing import CliRunner

from deid.dicom import Deidentifier, Quarantined
from deid.files import iter_files, read_dicom
from deid.keys import SiteKeys
from deid.scan import scan_path
from node.cli import app
from policies import load_site_policy, parse_policy

runner = CliRunner()
# Head CTs in deid-data are refused under the default face rule; this policy is for a site that
# accepts them (e.g. it defaces upstream), so the rest of the profile is exercised on them too.
FACE_OK = {"name": "face-ok", "deid": {"face_body_parts": []}}


def _policy_file(tmp: Path, data: dict) -> Path:
    import yaml

    path = tmp / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(src: Path, dst: Path, keys: Path, policy: str = "strict"):
    return runner.invoke(
        app, ["deid-dicom", str(src), str(dst), "--keys", str(keys), "--policy", policy]
    )


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return build_export(tmp_path_factory.mktemp("export") / "in")


@pytest.fixture(scope="module")
def first_run(export, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run1")
    policy = _policy_file(tmp, FACE_OK)
    before = tree_digest(export)
    result = _run(export, tmp / "out", tmp / "keys", str(policy))
    return tmp, result, before, policy


def test_output_is_clean_by_scanner_and_by_byte_search(export, first_run):
    tmp, result, _, policy = first_run
    assert result.exit_code == 0, result.stderr
    out = tmp / "out"
    written = [p for p in iter_files(out) if p.suffix == ".dcm"]
    assert len(written) >= 18
    assert scan_path(out, policy=load_site_policy(policy)) == []
    originals = harvest(export)
    # the harvest really holds the identities the test files carry
    assert {"Doe^Peter", "SIMPSON^HOMER^J^", "CompressedSamples^CT1"} & originals
    assert byte_hits(out, originals) == []


def test_input_tree_is_byte_identical_after_a_run(export, first_run):
    _, _, before, _ = first_run
    assert tree_digest(export) == before


def test_sop_class_and_transfer_syntax_survive(export, first_run):
    tmp, _, _, _ = first_run
    by_class = defaultdict(set)
    for path in iter_files(tmp / "out"):
        if path.suffix == ".dcm":
            ds = dcmread(path)
            by_class[ds.SOPClassUID].add(ds.file_meta.TransferSyntaxUID)
            assert ds.PatientIdentityRemoved == "YES"
            assert "113100" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
            assert not any(e.tag.is_private for e in ds.iterall())
    for name in ("CT_small.dcm", "JPEG2000.dcm", "rtstruct.dcm", "liver_1frame.dcm"):
        src = read_dicom(sample_file(name))
        assert src.file_meta.TransferSyntaxUID in by_class[src.SOPClassUID], name


@pytest.mark.parametrize(
    "name", ["MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm"]
)
def test_every_encoding_is_written_back_in_its_own_transfer_syntax(tmp_path, name):
    keys = SiteKeys.create(tmp_path / "keys")
    src = read_dicom(sample_file(name))
    ds = Deidentifier(load_site_policy("strict"), keys).apply(read_dicom(sample_file(name))).dataset
    ds.save_as(tmp_path / "out.dcm", enforce_file_format=True)
    back = dcmread(tmp_path / "out.dcm")
    assert back.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    assert back.SOPClassUID == src.SOPClassUID
    assert (back.pixel_array == src.pixel_array).all()


def test_series_stay_grouped_and_uids_are_keyed(export, first_run):
    tmp, _, _, _ = first_run
    series_dirs = {p.parent for p in iter_files(tmp / "out") if p.suffix == ".dcm"}
    ct5n = [d for d in series_dirs if len(list(d.iterdir())) == 5]
    assert len(ct5n) == 1  # the five CT slices of one series are still one series
    datasets = [dcmread(p) for p in ct5n[0].iterdir()]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 5
    for ds in datasets:
        assert ds.SeriesInstanceUID.startswith("2.25.")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_burned_in_and_colour_secondary_capture_are_quarantined(first_run):
    tmp, result, _, _ = first_run
    quarantined = [line for line in result.stderr.splitlines() if line.startswith("quarantined:")]
    assert any("GREYSCALE_IMAGE" in q and "BurnedInAnnotation=YES" in q for q in quarantined)
    assert any("US1_UNCR" in q for q in quarantined)
    assert any("SC_rgb.dcm" in q for q in quarantined)
    skipped = result.stderr
    assert "junk.txt: not a DICOM file" in skipped and "Thumbs.db" in skipped


def test_uids_consistent_across_runs_and_differ_under_another_secret(tmp_path, first_run, export):
    tmp, _, _, policy = first_run
    again = _run(export, tmp_path / "again", tmp / "keys", str(policy))
    assert again.exit_code == 0, again.stderr
    other = _run(export, tmp_path / "other", tmp_path / "other-keys", str(policy))
    assert other.exit_code == 0, other.stderr

    def uids(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): dcmread(p).SOPInstanceUID
            for p in iter_files(root)
            if p.suffix == ".dcm"
        }

    first, second, third = uids(tmp / "out"), uids(tmp_path / "again"), uids(tmp_path / "other")
    assert first == second  # same secret: same paths, same UIDs
    assert set(first.values()).isdisjoint(third.values())  # another secret: nothing in common


def test_keyed_uid_cannot_be_confirmed_without_the_secret(tmp_path):
    a, b = SiteKeys.create(tmp_path / "a"), SiteKeys.create(tmp_path / "b")
    original = "1.2.840.113619.2.1.1.322987881.621.736170080.681"
    assert a.uid(original) == a.uid(original) != b.uid(original)
    assert len(a.uid(original)) <= 64 and a.uid(original).startswith("2.25.")
    assert a.pseudonym("s", original) != a.pseudonym("p", original)  # domain separation
    assert "secret" not in repr(a).lower() or "fingerprint" in repr(a)
    mode = stat.S_IMODE((tmp_path / "a" / "site.key").stat().st_mode)
    assert mode == 0o600


def test_nested_sequences_and_private_tags_are_cleaned(tmp_path):
    src = tmp_path / "in"
    uid, _, _ = phantom_series(src / "se", shape=(4, 6, 6))
    keys = SiteKeys.create(tmp_path / "keys")
    ds = read_dicom(sorted(src.glob("se/*.dcm"))[0])
    name = str(ds.PatientName)
    assert ds.ReferringPhysicianIdentificationSequence[0].InstitutionName
    outcome = Deidentifier(load_site_policy("strict"), keys).apply(ds)
    assert str(ds.PatientName) == outcome.patient != name
    assert "OtherPatientIDsSequence" not in ds or all(
        not item.get("PatientID") for item in ds.OtherPatientIDsSequence
    )
    for elem in ds.iterall():
        assert not elem.tag.is_private
        if elem.VR == "PN" and elem.value:
            assert str(elem.value) in (outcome.patient, "ANONYMIZED")
    assert ds.SeriesInstanceUID == keys.uid(uid)
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert not ds.get("StudyDate") and not ds.get("PatientBirthDate")


def test_research_policy_shifts_dates_per_patient_keeping_intervals(tmp_path):
    keys = SiteKeys.create(tmp_path / "keys")
    deid = Deidentifier(load_site_policy("research"), keys)
    a = read_dicom(sample_file("CT_small.dcm"))
    b = read_dicom(sample_file("CT_small.dcm"))
    b.StudyDate = "20040201"  # same patient, a later visit
    orig_a, orig_b = a.StudyDate, b.StudyDate
    deid.apply(a)
    deid.apply(b)

    def day(s: str) -> dt.date:
        return dt.datetime.strptime(s, "%Y%m%d").date()

    assert a.StudyDate != orig_a
    assert (day(b.StudyDate) - day(a.StudyDate)) == (day(orig_b) - day(orig_a))
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"
    assert a.PatientAge.endswith("Y") and int(a.PatientAge[:3]) % 5 == 0


def test_descriptors_cleaned_under_clean_descriptors(tmp_path):
    keys = SiteKeys.create(tmp_path / "keys")
    uid, _, _ = phantom_series(tmp_path / "se", shape=(4, 6, 6))
    ds = read_dicom(sorted((tmp_path / "se").glob("*.dcm"))[0])
    family = str(ds.PatientName).split("^")[0]
    assert family in ds.StudyDescription
    Deidentifier(load_site_policy("research"), keys).apply(ds)
    assert family not in ds.StudyDescription and "BILAT" in ds.StudyDescription


def test_face_and_burned_in_rules(tmp_path):
    keys = SiteKeys.create(tmp_path / "keys")
    strict = Deidentifier(load_site_policy("strict"), keys)
    from deid_fixtures import deid_data_dir

    with pytest.raises(Quarantined, match="face"):
        strict.apply(read_dicom(deid_data_dir() / "humans" / "ctbrain1.dcm"))
    us = read_dicom(deid_data_dir() / "ultrasounds" / "GREYSCALE_IMAGE.dcm")
    with pytest.raises(Quarantined, match="burned-in"):
        strict.apply(us)
    # With Clean Pixel Data and a mask for this kind of image, the text region is blanked.
    masked = parse_policy({
        "name": "us-mask",
        "deid": {"options": ["Clean Pixel Data"], "pixel_masks": [{
            "modality": "US", "rows": int(us.Rows), "columns": int(us.Columns),
            "boxes": [{"row0": 0, "row1": 40, "col0": 0, "col1": int(us.Columns)}]}]},
    })  # fmt: skip
    cleaned = Deidentifier(masked, keys).apply(us).dataset
    assert cleaned.BurnedInAnnotation == "NO"
    assert int(cleaned.pixel_array[..., :40, :, :].max() if cleaned.pixel_array.ndim == 4
               else cleaned.pixel_array[:40].max()) == 0  # fmt: skip


def test_failed_run_leaves_no_output_and_refuses_bad_paths(tmp_path, export):
    keys = tmp_path / "keys"
    # keys inside the output: refused before anything is written
    result = _run(export, tmp_path / "out", tmp_path / "out" / "keys")
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()
    # an existing, non-empty output is never touched
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    result = _run(export, tmp_path / "busy", keys)
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["mine.txt"]
    # a missing input
    result = _run(tmp_path / "nowhere", tmp_path / "out2", keys)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()
    # output inside the input
    result = _run(export, export / "sub", keys)
    assert result.exit_code == 2 and not (export / "sub").exists()


# -- text the Annex E table does not list (issue 14, item 3) ---------------------------------------
UNLISTED_POLICIES = {"strict": "strict", "research": "research", "keep-private": KEEP_PRIVATE}


def _texts(ds) -> list[str]:
    """Every text value left in a dataset, at any depth, private elements included."""
    out = []
    for elem in ds.iterall():
        if elem.VR in ("LO", "SH", "ST", "LT", "UT", "UC", "PN"):
            out.append(str(elem.value).lower())
        elif elem.VR == "UN" and isinstance(elem.value, bytes):
            out.append(elem.value.decode("latin-1").lower())
    return out


@pytest.mark.parametrize("name", UNLISTED_POLICIES)
def test_unlisted_text_is_removed_or_cleaned_under_every_policy(tmp_path, name):
    """Identity planted in unlisted attributes of every text VR, in other case and spelling, two
    sequences deep and in private elements the policy keeps: no piece of it survives, and the
    built-in check (scanner plus the input's values) agrees."""
    planted = plant_identity(tmp_path / "in")
    spec = UNLISTED_POLICIES[name]
    policy = load_site_policy(spec) if isinstance(spec, str) else parse_policy(spec)
    keys = SiteKeys.create(tmp_path / "keys")
    ds = Deidentifier(policy, keys).apply(read_dicom(planted.path)).dataset
    for where, text in planted.planted.items():
        elem = element_at(ds, where)
        assert elem is None or str(elem.value) != text, f"{where} kept verbatim under {name}"
    leaks = [(f, t) for t in _texts(ds) for f in planted.fragments if f in t]
    assert leaks == [], name
    # what carries no identity is kept: technical text, codes, the kept private block's creator
    assert ds.SequenceName == "*fl3d1" and ds.Manufacturer == "ACME"
    code = ds.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0]
    assert code.CodeValue == "P5-0A001" and code.CodingSchemeDesignator == "SRT"
    if name == "keep-private":
        assert ds.get((0x0029, 0x0010)).value == "ACME MEDICAL 1.0"
        assert (0x0029, 0x1001) in ds  # kept, emptied
    ds.save_as(tmp_path / "out.dcm", enforce_file_format=True)
    known = harvest(planted.path.parent)
    assert {planted.mrn, planted.digits, planted.family} <= known
    assert scan_path(tmp_path / "out.dcm", policy=policy, known_values=known) == []


def test_deid_dicom_cli_strips_a_free_text_note(tmp_path):
    """The reported case end to end: `deid-dicom --policy strict` on a file holding the note in
    (0040,0400) writes no byte of it, and its own final check passes."""
    planted = plant_identity(tmp_path / "in")
    result = _run(tmp_path / "in", tmp_path / "out", tmp_path / "keys")
    assert result.exit_code == 0, result.stderr
    written = [p for p in iter_files(tmp_path / "out") if p.suffix == ".dcm"]
    assert len(written) == 4
    for path in written:
        data = path.read_bytes().lower()
        for fragment in planted.fragments:
            assert fragment.encode() not in data, (path.name, fragment)
    assert byte_hits(tmp_path / "out", harvest(tmp_path / "in")) == []
