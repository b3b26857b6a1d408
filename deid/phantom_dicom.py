"""Write a volume as a DICOM series that looks like a PACS export, fake identity and all.

The identity is fake but placed everywhere real exports put identity: names, IDs, birth and study
dates, institution, referring and performing physicians, free-text descriptions and comments,
private tags, nested sequences holding names, and the folder names of the export. The demo and the
tests run de-identification end to end on these files.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
PRIVATE_CREATOR = "ACME MEDICAL 1.0"

_FAMILY = ["MUSTERMANN", "KOWALSKA", "OKONKWO", "LINDQVIST", "FERREIRA", "NAKAMURA", "DUBOIS",
           "ABERNATHY", "VILLANUEVA", "HALVORSEN", "MBEKI", "CASTELLANOS"]  # fmt: skip
_GIVEN = ["ERIKA", "AGNIESZKA", "CHIAMAKA", "INGRID", "BEATRIZ", "YUKIKO", "MARGAUX", "DOROTHEA",
          "ROSALIND", "SOLVEIG", "THANDIWE", "XIMENA"]  # fmt: skip
_DOCTORS = ["HOUSE^GREGORY^^DR", "QUINN^MICHAELA^^DR", "ZHIVAGO^YURI^^DR", "WATSON^JOAN^^DR"]
_HOSPITALS = [
    "St. Elsewhere General Hospital",
    "Mercy West Medical Center",
    "Sacred Heart Teaching Hospital",
    "Princeton-Plainsboro University Hospital",
]


@dataclass(frozen=True)
class FakeIdentity:
    patient_name: str
    patient_id: str
    other_patient_id: str
    birth_date: str
    sex: str
    age: str
    address: str
    phone: str
    study_date: str
    study_time: str
    accession: str
    institution: str
    institution_address: str
    department: str
    station: str
    referring: str
    performing: str
    operator: str
    device_serial: str

    def values(self) -> list[str]:
        """Every identifying value, for tests that search outputs for them byte by byte."""
        family, given = self.patient_name.split("^")[:2]
        return [self.patient_name, family, given, self.patient_id, self.other_patient_id,
                self.birth_date, self.study_date, self.accession, self.institution,
                self.institution_address, self.address, self.phone, self.station,
                self.referring, self.performing, self.operator, self.device_serial]  # fmt: skip


def fake_identity(rng: np.random.Generator) -> FakeIdentity:
    family, given = str(rng.choice(_FAMILY)), str(rng.choice(_GIVEN))
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 50)))
    study = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 9)))
    age = (study - birth).days // 365
    hospital = int(rng.integers(len(_HOSPITALS)))
    return FakeIdentity(
        patient_name=f"{family}^{given}^{chr(65 + int(rng.integers(26)))}",
        patient_id=f"MRN{int(rng.integers(10**6, 10**7))}",
        other_patient_id=f"NHS{int(rng.integers(10**8, 10**9))}",
        birth_date=birth.strftime("%Y%m%d"),
        sex="F",
        age=f"{age:03d}Y",
        address=f"{int(rng.integers(1, 200))} Larkspur Lane, Springfield",
        phone=f"+1-555-{int(rng.integers(1000, 9999))}",
        study_date=study.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(60)):02d}12.000",
        accession=f"ACC{int(rng.integers(10**7, 10**8))}",
        institution=_HOSPITALS[hospital],
        institution_address=f"{int(rng.integers(1, 999))} Hospital Drive, Springfield",
        department="Breast Imaging Unit",
        station=f"MRI3T-{family[:4]}",
        referring=str(rng.choice(_DOCTORS)),
        performing=str(rng.choice(_DOCTORS)),
        operator=f"TECH^{str(rng.choice(_GIVEN)).title()}",
        device_serial=f"SN{int(rng.integers(10**5, 10**6))}",
    )


def _person_sequence(name: str, identity: FakeIdentity) -> Sequence:
    """A nested sequence holding a name, an ID and an institution (as identification macros do)."""
    code = Dataset()
    code.CodeValue = identity.patient_id
    code.CodingSchemeDesignator = "L"
    code.CodeMeaning = name
    person = Dataset()
    person.PersonIdentificationCodeSequence = Sequence([code])
    person.PersonAddress = identity.institution_address
    person.InstitutionName = identity.institution
    person.PersonTelephoneNumbers = identity.phone
    return Sequence([person])


def _base_dataset(identity: FakeIdentity, uids: dict[str, str], description: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = identity.study_date
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = identity.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = identity.study_time
    ds.AccessionNumber = identity.accession
    ds.Modality = "MR"
    ds.Manufacturer = "ACME"
    ds.InstitutionName = identity.institution
    ds.InstitutionAddress = identity.institution_address
    ds.InstitutionalDepartmentName = identity.department
    ds.StationName = identity.station
    ds.ReferringPhysicianName = identity.referring
    ds.ReferringPhysicianIdentificationSequence = _person_sequence(identity.referring, identity)
    ds.PerformingPhysicianName = identity.performing
    ds.OperatorsName = identity.operator
    family = identity.patient_name.split("^")[0]
    ds.StudyDescription = f"MRI BREAST BILAT {family}"
    ds.SeriesDescription = description
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.IssuerOfPatientID = identity.institution
    other = Dataset()
    other.PatientID = identity.other_patient_id
    other.IssuerOfPatientID = "NHS"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = identity.sex
    ds.PatientAge = identity.age
    ds.PatientAddress = identity.address
    ds.PatientTelephoneNumbers = identity.phone
    ds.PatientComments = (
        f"Referred by {identity.referring.split('^')[0]}; prior scan {identity.study_date}"
    )
    ds.BodyPartExamined = "BREAST"
    ds.DeviceSerialNumber = identity.device_serial
    ds.ProtocolName = f"BREAST DCE {identity.station}"
    request = Dataset()
    request.RequestedProcedureID = identity.accession
    request.ScheduledProcedureStepID = f"SPS{identity.patient_id}"
    request.ScheduledPerformingPhysicianName = identity.performing
    ds.RequestAttributesSequence = Sequence([request])
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.StudyID = identity.accession[-6:]
    ds.SeriesNumber = 3
    ds.PositionReferenceIndicator = ""
    ds.ImageComments = f"pt {identity.patient_name} dob {identity.birth_date}"
    block = ds.private_block(0x0029, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", identity.patient_name)
    block.add_new(0x02, "LO", identity.patient_id)
    inner = Dataset()
    inner.PatientName = identity.patient_name
    inner.PatientBirthDate = identity.birth_date
    block.add_new(0x03, "SQ", Sequence([inner]))
    return ds


def _pixels(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = float(volume.min()), float(volume.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.round((volume - lo) / slope).clip(0, 65535).astype(np.uint16)
    return stored, slope, lo


def _geometry(affine_ras: np.ndarray, depth: int) -> tuple[list[float], list[float], list[list]]:
    lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    col_step, row_step = lps[:3, 1], lps[:3, 2]  # array axis 1 = rows, axis 2 = columns
    spacing = [float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))]
    orientation = [*(row_step / spacing[1]), *(col_step / spacing[0])]
    positions = [list(lps[:3, 3] + k * lps[:3, 0]) for k in range(depth)]
    return spacing, [round(float(v), 8) for v in orientation], positions


def _ds(values: list[float]) -> list[str]:
    return [f"{v:.6f}"[:16] for v in values]


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    identity: FakeIdentity,
    out_dir: Path,
    *,
    uid_seed: str,
    enhanced: bool = False,
    description: str = "AX T1 FS POST",
) -> str:
    """Write ``volume`` (slices, rows, columns) with RAS ``affine`` as a series; return its UID.

    Classic: one MR Image Storage file per slice. Enhanced: one Enhanced MR Image Storage object
    with per-frame plane positions, as modern scanners export.
    """
    volume = np.asarray(volume, dtype=np.float32)
    depth, rows, cols = volume.shape
    uids = {k: generate_uid(entropy_srcs=[uid_seed, k]) for k in ("study", "series", "frame")}
    spacing, orientation, positions = _geometry(affine, depth)
    thickness = float(np.linalg.norm(affine[:3, 0]))
    stored, slope, intercept = _pixels(volume)
    out_dir.mkdir(parents=True, exist_ok=True)

    def finish(ds: Dataset, sop_class: str, sop_uid: str, path: Path) -> None:
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.SourceApplicationEntityTitle = identity.station[:16]
        ds.file_meta = meta
        ds.save_as(path, enforce_file_format=True)

    if not enhanced:
        for k in range(depth):
            ds = _base_dataset(identity, uids, description)
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = _ds(positions[k])
            ds.ImageOrientationPatient = _ds(orientation)
            ds.PixelSpacing = _ds(spacing)
            ds.SliceThickness = f"{thickness:.6f}"[:16]
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
            ds.RescaleType = "US"
            ds.PixelData = stored[k].tobytes()
            sop = generate_uid(entropy_srcs=[uid_seed, "sop", str(k)])
            finish(ds, MR_IMAGE_STORAGE, sop, out_dir / f"IM{k + 1:05d}.dcm")
        return uids["series"]

    ds = _base_dataset(identity, uids, description)
    ds.InstanceNumber = 1
    ds.NumberOfFrames = depth
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = _ds(spacing)
    measures.SliceThickness = f"{thickness:.6f}"[:16]
    plane = Dataset()
    plane.ImageOrientationPatient = _ds(orientation)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    transform.RescaleType = "US"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    # Frames written in reverse slice order: readers must sort by position, not trust the order.
    for k in reversed(range(depth)):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = _ds(positions[k])
        content = Dataset()
        content.FrameAcquisitionDateTime = identity.study_date + "101500"
        content.InStackPositionNumber = k + 1
        item.PlanePositionSequence = Sequence([pos])
        item.FrameContentSequence = Sequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = stored[::-1].tobytes()
    sop = generate_uid(entropy_srcs=[uid_seed, "sop"])
    finish(ds, ENHANCED_MR_IMAGE_STORAGE, sop, out_dir / "IM00001.dcm")
    return uids["series"]


def export_folder_name(identity: FakeIdentity) -> str:
    """Folder names the way PACS exports make them: full of identity."""
    name = identity.patient_name.replace("^", "_")
    return f"{name}_{identity.patient_id}/{identity.study_date}_MRI_BREAST"
