"""Phantom subjects written as a PACS export would arrive at a site: DICOM plus label maps."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from deid.phantom_dicom import export_folder_name, fake_identity, write_dicom_series
from lsdm.atomic import staged_directory


def write_phantom_pacs(
    out: Path, *, subjects: int, shape: tuple[int, int, int], seed: int, enhanced: bool = True
) -> list[str]:
    """Write ``out/dicom/...`` and ``out/maps/<SeriesInstanceUID>.nii.gz``; return the UIDs."""
    from lsdm.phantom import make_subject

    rng = np.random.default_rng(seed)
    uids = []
    with staged_directory(out) as stage:
        notes = []
        for index in range(subjects):
            subject = make_subject(seed, index, shape)
            identity = fake_identity(rng)
            folder = stage / "dicom" / export_folder_name(identity) / f"SE{index + 1}"
            uid = write_dicom_series(
                subject.image, subject.affine, identity, folder,
                uid_seed=f"phantom-{seed}-{index}", enhanced=enhanced and index % 2 == 1,
            )  # fmt: skip
            uids.append(uid)
            # Maps as segmentation tools leave them: header text naming the patient.
            img = nib.Nifti1Image(subject.label_map.astype(np.uint8), subject.affine)
            img.header["descrip"] = f"seg {identity.patient_name} {identity.study_date}"[
                :79
            ].encode()
            (stage / "maps").mkdir(exist_ok=True)
            nib.save(img, stage / "maps" / f"{uid}.nii.gz")
            notes.append(f"{identity.patient_name}\t{identity.patient_id}\t{identity.study_date}")
        # Exports carry non-DICOM files too; this one is full of identity and must be skipped.
        (stage / "dicom" / "EXPORT_NOTES.txt").write_text("\n".join(notes) + "\n")
    return uids
