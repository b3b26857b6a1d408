"""A DICOM SEG label map: paired with its series through ReferencedSeriesSequence, on its grid."""

from __future__ import annotations

import numpy as np
import pytest
from deid_fixtures import label_map_for, phantom_series
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from deid.volumes import VolumeError, assemble_volume, read_seg_map
from lsdm.cohort import read_manifest
from node.cli import app
from policies.site import LabelPolicy, VolumePolicy

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def write_seg(series_dir, label: np.ndarray, path, *, shift_mm: float = 0.0) -> None:
    """A BINARY SEG with one frame per (segment, slice), as segmentation tools export."""
    slices = [dcmread(p) for p in sorted(series_dir.iterdir())]
    first = slices[0]
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SEG_STORAGE, generate_uid()
    ds.Modality, ds.SegmentationType = "SEG", "BINARY"
    ds.PatientName, ds.PatientID = first.PatientName, first.PatientID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, generate_uid()
    ref = Dataset()
    ref.SeriesInstanceUID = first.SeriesInstanceUID
    ds.ReferencedSeriesSequence = Sequence([ref])
    ds.SegmentSequence = Sequence()
    for value in range(1, int(label.max()) + 1):
        seg = Dataset()
        seg.SegmentNumber, seg.SegmentLabel = value, f"label {value}"
        ds.SegmentSequence.append(seg)
    shared, measures, plane = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = first.PixelSpacing
    plane.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, planes = [], []
    # slice k of the label map is the k-th file in InstanceNumber order
    for k, sl in enumerate(sorted(slices, key=lambda d: int(d.InstanceNumber))):
        for value in range(1, int(label.max()) + 1):
            item, pos, ident = Dataset(), Dataset(), Dataset()
            pos.ImagePositionPatient = [float(v) + shift_mm for v in sl.ImagePositionPatient]
            ident.ReferencedSegmentNumber = value
            item.PlanePositionSequence = Sequence([pos])
            item.SegmentIdentificationSequence = Sequence([ident])
            frames.append(item)
            planes.append(label[k] == value)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.NumberOfFrames = len(planes)
    ds.Rows, ds.Columns = first.Rows, first.Columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(np.stack(planes).astype(np.uint8))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SEG_STORAGE, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def test_seg_is_read_onto_the_image_grid_or_rejected(tmp_path):
    uid, volume_in, _ = phantom_series(tmp_path / "se", shape=(6, 8, 10))
    label = label_map_for(volume_in)  # in the writer's slice order (InstanceNumber)
    write_seg(tmp_path / "se", label, tmp_path / "seg.dcm")
    volume = assemble_volume(sorted((tmp_path / "se").iterdir()), VolumePolicy())
    got = read_seg_map(dcmread(tmp_path / "seg.dcm"), volume, LabelPolicy(), 0.01)
    order = [int(dcmread(f.path).InstanceNumber) - 1 for f in volume.frames]
    assert np.array_equal(got, label[order])
    write_seg(tmp_path / "se", label, tmp_path / "off.dcm", shift_mm=3.0)
    with pytest.raises(VolumeError, match="lies on no slice"):
        read_seg_map(dcmread(tmp_path / "off.dcm"), volume, LabelPolicy(), 0.01)


def test_prepare_pairs_a_seg_found_in_the_export(tmp_path):
    uid, volume_in, _ = phantom_series(tmp_path / "in" / "se", shape=(6, 8, 10))
    write_seg(tmp_path / "in" / "se", label_map_for(volume_in), tmp_path / "in" / "seg.dcm")
    args = [
        "prepare",
        "--input",
        tmp_path / "in",
        "--out",
        tmp_path / "c",
        "--keys",
        tmp_path / "k",
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    (subject,) = read_manifest(tmp_path / "c").subjects
    assert subject.label_counts.get(4, 0) > 0
