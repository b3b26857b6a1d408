"""Shared helpers for the de-identification, policy and node tests (real files on disk)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

from deid.files import NotDicom, iter_files, read_dicom
from deid.phantom_dicom import fake_identity, write_dicom_series
from deid.scan import KnownValues, KnownValueSearch

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
    """(file, value) for every original value found as a whole token in the raw or gunzipped
    bytes of any file, or in its path."""
    import gzip

    search = KnownValueSearch(values)
    hits = []
    for path in iter_files(root):
        rel = str(path.relative_to(root))
        data = path.read_bytes()
        blobs = [data, gzip.decompress(data)] if data[:2] == b"\x1f\x8b" else [data]
        for blob in [*blobs, rel.encode()]:
            hits += [(rel, h.decode()) for h in search.find(blob)]
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
