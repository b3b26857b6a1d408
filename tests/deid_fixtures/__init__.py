"""Shared helpers for the de-identification, policy and node tests (real files on disk)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from deid.files import NotDicom, iter_files, read_dicom
from deid.phantom_dicom import PRIVATE_CREATOR, fake_identity, write_dicom_series
from deid.scan import KnownValues, KnownValueSearch, searchable_bytes

# Real objects that ship with pydicom (no download): CT, MR, RT, SR, SEG, ECG, overlays, private
# sequences, compressed transfer syntaxes, a file without preamble, a deflated one.
PYDICOM_FILES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm", "JPEG2000.dcm", "rtstruct.dcm", "rtplan.dcm", "rtdose.dcm", "test-SR.dcm",
    "liver_1frame.dcm", "waveform_ecg.dcm", "examples_overlay.dcm", "priv_SQ.dcm",
    "image_dfl.dcm", "reportsi.dcm", "SC_rgb.dcm",
]  # fmt: skip
# From pydicom-data: enhanced and multi-frame objects, overlays, US.
PYDICOM_DATA_FILES = ["emri_small.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "liver.dcm",
                      "US1_UNCR.dcm", "eCT_Supplemental.dcm"]  # fmt: skip
CT5N = "dicomdirtests/98892001/CT5N"
MR700 = "dicomdirtests/98892003/MR700"


def sample_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file missing: {name}"
    return Path(path)


def sample_dir(rel: str) -> Path:
    return sample_file("CT_small.dcm").parent / rel


def deid_data_dir() -> Path:
    import deid_data

    return Path(deid_data.__file__).parent / "data"


def build_export(dst: Path) -> Path:
    """A PACS-export-like tree of real DICOM from pydicom, pydicom-data and deid-data, with junk."""
    dst.mkdir(parents=True)
    for name in PYDICOM_FILES:
        shutil.copyfile(sample_file(name), _put(dst, "a", name))
    for name in PYDICOM_DATA_FILES:
        shutil.copyfile(sample_file(name), _put(dst, "b/nested/deeper", name))
    for rel in ("humans/ctbrain1.dcm", "humans/ctbrain2.dcm", "animals/cat.dcm",
                "ultrasounds/GREYSCALE_IMAGE.dcm", "ultrasounds/RGB_IMAGE.dcm"):  # fmt: skip
        shutil.copyfile(deid_data_dir() / rel, _put(dst, "c", rel.replace("/", "_")))
    shutil.copytree(sample_dir(CT5N), dst / "ct5n")
    (dst / "junk.txt").write_text("not DICOM\n")
    (dst / "a" / "Thumbs.db").write_bytes(os.urandom(300))
    return dst


def _put(root: Path, folder: str, name: str) -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    return root / folder / name


def harvest(root: Path) -> set[str]:
    """Every name, ID, date, instance UID and institution value in the DICOM under ``root``."""
    known = KnownValues()
    for path in iter_files(root):
        try:
            known.add(read_dicom(path, header_only=True))
        except NotDicom:
            continue
    return known.values


def byte_hits(root: Path, values: set[str]) -> list[tuple[str, str]]:
    """(file, value) for every original value found, in any case and spelling, where a file can
    hold text (everything but pixels and voxels; gzip member headers and content) or in its path."""
    search = KnownValueSearch(values)
    hits = []
    for path in iter_files(root):
        rel = str(path.relative_to(root))
        for blob in [*searchable_bytes(path), rel.encode()]:
            hits += [(rel, h) for h in search.find(blob)]
    return hits


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
        for p in iter_files(root)
    }


def phantom_series(
    dst: Path, *, shape=(8, 12, 10), seed=0, enhanced=False, affine=None
) -> tuple[str, np.ndarray, np.ndarray]:
    """Write a known volume as a DICOM series; return (SeriesInstanceUID, volume, RAS affine)."""
    rng = np.random.default_rng(seed)
    volume = rng.uniform(0, 1000, size=shape).astype(np.float32)
    if affine is None:
        c, s = np.cos(0.2), np.sin(0.2)
        affine = np.eye(4)
        affine[:3, :3] = np.array([[0, -s, -c], [0, c, -s], [1, 0, 0.0]]) @ np.diag([2.5, 0.8, 0.7])
        affine[:3, 3] = [40.0, -20.0, 5.0]
    uid = write_dicom_series(
        volume, affine, fake_identity(rng), dst, uid_seed=f"test-{seed}", enhanced=enhanced
    )
    return uid, volume, affine


def label_map_for(volume: np.ndarray) -> np.ndarray:
    label = np.zeros(volume.shape, dtype=np.uint8)
    label[volume > 300] = 1
    label[volume > 700] = 2
    label[2:4, 3:6, 2:5] = 4
    return label


# A policy that keeps two private elements of the phantom's block, declared safe by the site.
KEEP_PRIVATE = {
    "name": "keep-private",
    "deid": {
        "options": ["Retain Safe Private"],
        "safe_private_tags": [
            {"group": 0x0029, "creator": PRIVATE_CREATOR, "element": e} for e in (0x01, 0x10)
        ],
    },
}


@dataclass
class PlantedIdentity:
    """A phantom slice whose patient is named, in other cases and spellings, in attributes the
    Annex E table does not list."""

    path: Path
    family: str  # as PatientName spells it, upper case
    given: str
    mrn: str  # PatientID, e.g. MRN6340277
    digits: str  # its digit core, 6340277
    birth: dt.date
    note: str  # the free-text note planted
    fragments: list[str]  # lower-case pieces of identity that must survive nowhere
    planted: dict[str, str] = field(default_factory=dict)  # where -> the text planted there


def plant_identity(dst: Path, seed: int = 0) -> PlantedIdentity:
    """Write a phantom series under ``dst/se`` and plant identity into its first slice.

    Planted at the top level in one unlisted attribute of each text VR (LT, LO, SH, ST, UC, UT),
    one named for a person (PatientBirthDateInAlternativeCalendar), two sequences deep in unlisted
    sequences, and in two private elements (LO, LT); never as the object's own spelling.
    """
    phantom_series(dst / "se", shape=(4, 6, 6), seed=seed)
    path = sorted((dst / "se").glob("*.dcm"))[0]
    ds = read_dicom(path)
    family, given = str(ds.PatientName).split("^")[:2]
    mrn = str(ds.PatientID)
    digits = "".join(c for c in mrn if c.isdigit())
    birth = dt.datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
    note = (
        f"Pt {given.title()} {family.title()}, born {birth.isoformat()} ({mrn[:3]} {digits}), "
        f"call daughter Anna {family.title()} 555-0172"
    )
    planted = {
        "CommentsOnTheScheduledProcedureStep": note,  # LT, (0040,0400)
        "ManufacturerModelName": f"{family.lower()} {given.lower()}",  # LO, lower case
        "ReceiveCoilName": f"{given.title()}Coil",  # SH, inside a word
        "PartialViewDescription": f"seen {birth:%d.%m.%Y}",  # ST, European date
        "PotentialReasonsForProcedure": f"ref {digits}",  # UC, digit core of the MRN
        "PatientBirthDateInAlternativeCalendar": "1320/10/30",  # LO, named for a person
        "ScheduledProcedureStepSequence[0].CommentsOnTheScheduledProcedureStep": note.upper(),
        "ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].CodeMeaning": (
            f"protocol for {family.lower()}"
        ),
        "ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].TextValue": (
            f"{given.lower()} {family.lower()}, tel +1 555 0172 000"
        ),  # UT
        "(0029,1001)": str(ds.PatientName),  # private LO: the name in DICOM notation
        "(0029,1010)": note.lower(),  # private LT
    }
    ds.add_new(0x00400400, "LT", planted["CommentsOnTheScheduledProcedureStep"])
    ds.ManufacturerModelName = planted["ManufacturerModelName"]
    ds.ReceiveCoilName = planted["ReceiveCoilName"]
    ds.PartialViewDescription = planted["PartialViewDescription"]
    ds.PotentialReasonsForProcedure = planted["PotentialReasonsForProcedure"]
    ds.PatientBirthDateInAlternativeCalendar = planted["PatientBirthDateInAlternativeCalendar"]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "P5-0A001", "SRT"
    code.CodeMeaning = planted[
        "ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].CodeMeaning"
    ]
    code.TextValue = planted[
        "ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].TextValue"
    ]
    step = Dataset()
    step.CommentsOnTheScheduledProcedureStep = planted[
        "ScheduledProcedureStepSequence[0].CommentsOnTheScheduledProcedureStep"
    ]
    step.ScheduledProtocolCodeSequence = Sequence([code])
    ds.ScheduledProcedureStepSequence = Sequence([step])
    ds.SequenceName = "*fl3d1"  # unlisted technical text that must survive
    block = ds.private_block(0x0029, PRIVATE_CREATOR)
    block.add_new(0x10, "LT", planted["(0029,1010)"])
    ds.save_as(path, enforce_file_format=True)
    fragments = [family.lower(), given.lower(), digits, birth.isoformat(), f"{birth:%d.%m.%Y}",
                 "0172", "anna", "1320/10/30"]  # fmt: skip
    return PlantedIdentity(path, family, given, mrn, digits, birth, note, fragments, planted)


def element_at(ds: Dataset, where: str):
    """The element at a path like ``Seq[0].Keyword`` or ``(0029,1001)``; None if absent."""
    *items, last = where.split(".")
    for step in items:
        keyword, index = step.rstrip("]").split("[")
        seq = ds.get(keyword)
        if seq is None or len(seq) <= int(index):
            return None
        ds = seq[int(index)]
    if last.startswith("("):
        group, element = last.strip("()").split(",")
        return ds.get((int(group, 16), int(element, 16)))
    return ds[last] if last in ds else None  # noqa: SIM401 (an element, not its value)
