"""Finding and reading DICOM files in a PACS export: any depth, junk and damage tolerated."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from deid.dicom import reading_config

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index full of names, not an image
_UNCOMPRESSED = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                 DeflatedExplicitVRLittleEndian}  # fmt: skip


class NotDicom(Exception):
    """The file is not DICOM (or not a DICOM object this system handles); ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` in a stable order; symlinks are not followed."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def read_dicom(path: Path, *, header_only: bool = False) -> Dataset:
    """Read one DICOM file, also without a preamble; raise :class:`NotDicom` for anything else."""
    reading_config()
    try:
        try:
            ds = dcmread(path, stop_before_pixels=header_only)
        except InvalidDicomError:
            # Files without the 128-byte preamble and 'DICM' (older exports) are still DICOM if
            # they parse to an object with SOP identity; plain junk does not.
            ds = dcmread(path, stop_before_pixels=header_only, force=True)
            if not isinstance(ds.get("SOPClassUID"), str) or not ds.get("SOPInstanceUID"):
                raise NotDicom("not a DICOM file") from None
            _complete_meta(ds)
    except NotDicom:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise NotDicom(f"unreadable DICOM ({type(e).__name__})") from None
    except Exception as e:  # pydicom raises a wide variety of errors on damaged input
        raise NotDicom(f"unreadable DICOM ({type(e).__name__})") from None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
        raise NotDicom("DICOMDIR index (not an object to de-identify)")
    if "SOPInstanceUID" not in ds:
        raise NotDicom("DICOM without a SOP Instance UID")
    if not header_only:
        check_pixel_length(ds)
    return ds


def _complete_meta(ds: Dataset) -> None:
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        if ds.original_encoding[0]:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif ds.original_encoding[1]:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRBigEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta


def check_pixel_length(ds: Dataset) -> None:
    """Refuse uncompressed pixel data shorter than the image it claims to be (a truncated file)."""
    if "PixelData" not in ds:
        return
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax not in _UNCOMPRESSED:
        return  # encapsulated: lengths are per fragment; decoding will tell
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = (
            ds.Rows * ds.Columns * frames * int(ds.get("SamplesPerPixel", 1)) * ds.BitsAllocated
        ) // 8
    except (AttributeError, TypeError, ValueError):
        raise NotDicom("image without usable Rows/Columns/BitsAllocated") from None
    if len(ds.PixelData) < expected:
        raise NotDicom(f"truncated pixel data ({len(ds.PixelData)} of {expected} bytes)")
