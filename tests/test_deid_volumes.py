"""Volumes from DICOM series: geometry, rejections with reasons, label maps on the image grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from deid_fixtures import CT5N, MR700, label_map_for, phantom_series, sample_dir
from pydicom import dcmread

from deid.volumes import (
    VolumeError,
    assemble_volume,
    crop_to_labels,
    read_nifti_map,
)
from lsdm.cohort import write_nifti
from policies.site import LabelPolicy, VolumePolicy

POLICY = VolumePolicy()


def test_known_ct_series_has_the_dicom_geometry():
    files = sorted(sample_dir(CT5N).iterdir())
    volume = assemble_volume(files, POLICY)
    assert volume.array.shape == (5, 16, 16)
    assert volume.spacing == pytest.approx((2.5, 0.488281, 0.488281), abs=1e-5)
    # Every voxel's RAS position equals the DICOM LPS position with x and y negated.
    for path in files:
        ds = dcmread(path)
        k = [f.path for f in volume.frames].index(path)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        col_dir = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = 7, 11
        lps = ipp + c * dc * row_dir + r * dr * col_dir
        ras = volume.affine @ np.array([k, r, c, 1.0])
        assert ras[:3] == pytest.approx([-lps[0], -lps[1], lps[2]], abs=1e-4)
        # rescale slope/intercept applied
        expected = ds.pixel_array[r, c] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert volume.array[k, r, c] == pytest.approx(expected)
    assert volume.array.min() < -800  # Hounsfield units, not stored values


@pytest.mark.parametrize("enhanced", [False, True])
def test_written_series_round_trips_to_the_same_world_grid(tmp_path, enhanced):
    uid, original, affine = phantom_series(tmp_path / "se", shape=(7, 9, 11), enhanced=enhanced)
    volume = assemble_volume(sorted((tmp_path / "se").iterdir()), POLICY)
    a = nib.as_closest_canonical(nib.Nifti1Image(original, affine))
    b = nib.as_closest_canonical(nib.Nifti1Image(volume.array, volume.affine))
    assert b.shape == a.shape
    assert np.allclose(a.affine, b.affine, atol=1e-4)
    step = (original.max() - original.min()) / 65535
    assert np.abs(a.get_fdata() - b.get_fdata()).max() <= step


def test_mixed_orientations_are_rejected():
    with pytest.raises(VolumeError, match="mixed orientations"):
        assemble_volume(sorted(sample_dir(MR700).iterdir()), POLICY)


def test_missing_slice_is_rejected_with_its_position(tmp_path):
    phantom_series(tmp_path / "se", shape=(8, 6, 6))
    files = sorted((tmp_path / "se").iterdir())
    del files[4]
    with pytest.raises(VolumeError, match=r"missing slice: 1 slice\(s\) absent between"):
        assemble_volume(files, POLICY)


def test_too_few_slices_and_duplicates_are_rejected(tmp_path):
    phantom_series(tmp_path / "se", shape=(3, 6, 6))
    files = sorted((tmp_path / "se").iterdir())
    with pytest.raises(VolumeError, match="too few slices"):
        assemble_volume(files, POLICY)
    phantom_series(tmp_path / "b", shape=(5, 6, 6), seed=1)
    dup = sorted((tmp_path / "b").iterdir())
    with pytest.raises(VolumeError, match="duplicate slice positions"):
        assemble_volume([*dup, dup[2]], POLICY)


def test_uneven_spacing_is_rejected(tmp_path):
    phantom_series(tmp_path / "se", shape=(6, 6, 6))
    files = sorted((tmp_path / "se").iterdir())
    ds = dcmread(files[3])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.8  # along the slice axis
    ds.save_as(files[3])
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        assemble_volume(files, POLICY)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) - 0.8
    ds.ImagePositionPatient[0] = float(ds.ImagePositionPatient[0]) + 1.0  # in-plane
    ds.save_as(files[3])
    with pytest.raises(VolumeError, match="displaced in-plane"):
        assemble_volume(files, POLICY)


def test_map_must_match_the_image_grid(tmp_path):
    uid, original, affine = phantom_series(tmp_path / "se", shape=(6, 8, 10))
    volume = assemble_volume(sorted((tmp_path / "se").iterdir()), POLICY)
    labels = LabelPolicy()
    good = label_map_for(original)
    # Written on the phantom's own axes: reoriented onto the image's (which are flipped).
    nib.save(nib.Nifti1Image(good, affine), tmp_path / "good.nii.gz")
    label = read_nifti_map(tmp_path / "good.nii.gz", volume, labels, 0.01)
    assert label.dtype == np.uint8 and label.shape == volume.array.shape
    assert np.array_equal(label, good[::-1])
    shifted = affine.copy()
    shifted[:3, 3] += [0.5, 0, 0]
    nib.save(nib.Nifti1Image(good, shifted), tmp_path / "shifted.nii.gz")
    with pytest.raises(VolumeError, match="mm from the image grid"):
        read_nifti_map(tmp_path / "shifted.nii.gz", volume, labels, 0.01)
    nib.save(nib.Nifti1Image(good[:, :, :-1], affine), tmp_path / "small.nii.gz")
    with pytest.raises(VolumeError, match="shape"):
        read_nifti_map(tmp_path / "small.nii.gz", volume, labels, 0.01)
    bad = good.copy()
    bad[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(bad, affine), tmp_path / "unmapped.nii.gz")
    with pytest.raises(VolumeError, match="does not map"):
        read_nifti_map(tmp_path / "unmapped.nii.gz", volume, labels, 0.01)
    remap = LabelPolicy(local_to_vocabulary={9: 4})
    assert read_nifti_map(tmp_path / "unmapped.nii.gz", volume, remap, 0.01).max() == 4


def test_fresh_nifti_has_no_header_text_and_crop_keeps_world_positions(tmp_path):
    image = np.arange(6 * 8 * 10, dtype=np.float32).reshape(6, 8, 10)
    label = np.zeros(image.shape, np.uint8)
    label[2:4, 3:5, 4:7] = 2
    affine = np.diag([2.0, 0.7, 0.7, 1.0])
    affine[:3, 3] = [10, 20, 30]
    img, lab, aff = crop_to_labels(image, label, affine, margin=1)
    assert img.shape == (4, 4, 5)
    assert np.allclose(aff @ [0, 0, 0, 1], affine @ [1, 2, 3, 1])
    assert img[0, 0, 0] == image[1, 2, 3]
    write_nifti(tmp_path / "x.nii.gz", img, aff)
    hdr = nib.load(tmp_path / "x.nii.gz").header
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        assert hdr[field].tobytes().strip(b"\x00") == b""
    assert len(hdr.extensions) == 0
    with pytest.raises(VolumeError, match="empty"):
        crop_to_labels(image, np.zeros_like(label), affine, 1)
