"""3D volumes from DICOM series and label maps that must sit on their image's grid.

Geometry follows PS3.3 C.7.6.2: a voxel (column c, row r) of a slice lies at
``ImagePositionPatient + c * PixelSpacing[1] * row_direction + r * PixelSpacing[0] * col_direction``
in LPS patient coordinates, where ``ImageOrientationPatient = row_direction + col_direction``.
Volumes are stored with array axes (slice, row, column) and a RAS affine (NIfTI's convention):
``RAS = diag(-1, -1, 1) @ LPS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from deid.files import NotDicom, read_dicom
from lsdm.errors import InputError
from policies.site import LabelPolicy, VolumePolicy

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
IMAGE_MODALITIES_EXCLUDED = frozenset(
    {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG"}
)


class VolumeError(InputError):
    """A series or map that cannot become a training volume; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Frame:
    """One 2D plane: a classic single-frame file or one frame of an enhanced object."""

    path: Path
    index: int | None  # frame number within a multi-frame file, None for single-frame files
    position: np.ndarray  # ImagePositionPatient (3,), LPS mm
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    shape: tuple[int, int]  # (Rows, Columns)
    slope: float
    intercept: float


@dataclass
class Volume:
    array: np.ndarray  # float32 (slices, rows, columns)
    affine: np.ndarray  # 4x4 RAS
    frames: list[Frame]  # sorted along the slice normal

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _floats(value: object, n: int, what: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise VolumeError(f"unreadable {what}") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"unreadable {what}")
    return arr


def _item(seq_owner: Dataset | None, keyword: str) -> Dataset | None:
    if seq_owner is None or keyword not in seq_owner or not seq_owner[keyword].value:
        return None
    return seq_owner[keyword].value[0]


def frames_of(ds: Dataset, path: Path) -> list[Frame]:
    """The planes of one object, from the classic attributes or the functional groups."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not rows or not cols:
        raise VolumeError("image without Rows/Columns")
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError("multi-frame object without per-frame geometry")
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise VolumeError("slice without ImagePositionPatient/ImageOrientationPatient")
        return [
            Frame(
                path, None,
                _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
                _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                tuple(_floats(ds.get("PixelSpacing"), 2, "PixelSpacing")),
                (rows, cols),
                float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0),
            )
        ]  # fmt: skip
    frames = []
    for i, group in enumerate(per_frame):

        def find(keyword: str, group: Dataset = group) -> Dataset | None:
            return _item(group, keyword) or _item(shared, keyword)

        position, orientation = find("PlanePositionSequence"), find("PlaneOrientationSequence")
        measures = find("PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise VolumeError(f"frame {i + 1} lacks plane position, orientation or pixel spacing")
        transform = find("PixelValueTransformationSequence")
        frames.append(
            Frame(
                path, i,
                _floats(position.ImagePositionPatient, 3, "ImagePositionPatient"),
                _floats(orientation.ImageOrientationPatient, 6, "ImageOrientationPatient"),
                tuple(_floats(measures.PixelSpacing, 2, "PixelSpacing")),
                (rows, cols),
                float(transform.get("RescaleSlope", 1) if transform else 1),
                float(transform.get("RescaleIntercept", 0) if transform else 0),
            )
        )  # fmt: skip
    return frames


def stack_geometry(frames: list[Frame], policy: VolumePolicy) -> tuple[list[Frame], np.ndarray]:
    """Sort planes into a regular stack and return them with its LPS affine, or say why not."""
    if len(frames) < policy.min_slices:
        raise VolumeError(f"too few slices ({len(frames)} < {policy.min_slices})")
    first = frames[0]
    for f in frames[1:]:
        if np.max(np.abs(f.orientation - first.orientation)) > policy.orientation_tolerance:
            raise VolumeError("mixed orientations within the series")
        if f.shape != first.shape:
            raise VolumeError("mixed image sizes within the series")
        if not np.allclose(f.spacing, first.spacing, rtol=1e-4):
            raise VolumeError("mixed pixel spacings within the series")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1) > 1e-2 or abs(row_dir @ col_dir) > 1e-2:
        raise VolumeError("ImageOrientationPatient is not two orthonormal directions")
    distance = np.array([f.position @ normal for f in frames])
    order = np.argsort(distance, kind="stable")
    frames = [frames[i] for i in order]
    distance = distance[order]
    gaps = np.diff(distance)
    step = float(np.median(gaps))
    if step <= 1e-4 or np.any(gaps <= 1e-3 * max(step, 1e-3)):
        raise VolumeError("duplicate slice positions (several stacks or time points in one series)")
    tol = policy.slice_spacing_tolerance * step
    for i, gap in enumerate(gaps):
        if abs(gap - step) > tol:
            ratio = gap / step
            if abs(ratio - round(ratio)) * step <= tol and round(ratio) >= 2:
                raise VolumeError(
                    f"missing slice: {round(ratio) - 1} slice(s) absent between positions "
                    f"{distance[i]:.2f} and {distance[i + 1]:.2f} mm"
                )
            raise VolumeError(f"uneven slice spacing ({gap:.3f} mm against {step:.3f} mm)")
    # In-plane offsets must follow the normal: otherwise the stack is sheared (gantry tilt).
    along = frames[-1].position - frames[0].position
    if np.linalg.norm(np.cross(along / np.linalg.norm(along), normal)) > 1e-2:
        raise VolumeError("slices are sheared (gantry tilt): not a regular grid")
    step_vector = along / (len(frames) - 1)
    tol_mm = 0.1 * min(first.spacing)
    for k, f in enumerate(frames):
        drift = f.position - (frames[0].position + k * step_vector)
        if np.linalg.norm(drift - (drift @ normal) * normal) > tol_mm:
            raise VolumeError(f"slice {k + 1} is displaced in-plane: not a regular grid")
    affine = np.eye(4)
    affine[:3, 0] = step_vector
    affine[:3, 1] = col_dir * first.spacing[0]
    affine[:3, 2] = row_dir * first.spacing[1]
    affine[:3, 3] = frames[0].position
    return frames, affine


def assemble_volume(paths: list[Path], policy: VolumePolicy) -> Volume:
    """Read a series' files and stack them into a float32 volume with a RAS affine."""
    decoded: dict[Path, np.ndarray] = {}  # each file decoded once, also multi-frame files
    frames: list[Frame] = []
    for path in paths:
        try:
            ds = read_dicom(path, header_only=True)
        except NotDicom as e:
            raise VolumeError(f"{e.reason}: {path.name}") from None
        if not str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME"):
            raise VolumeError("colour images are not volumes")
        frames.extend(frames_of(ds, path))
    frames, lps = stack_geometry(frames, policy)
    rows, cols = frames[0].shape
    array = np.empty((len(frames), rows, cols), dtype=np.float32)
    for k, frame in enumerate(frames):
        pixels = decoded.get(frame.path)
        if pixels is None:
            try:
                pixels = decoded[frame.path] = read_dicom(frame.path).pixel_array
            except NotDicom as e:
                raise VolumeError(f"{e.reason}: {frame.path.name}") from None
            except Exception as e:
                name = type(e).__name__
                raise VolumeError(f"cannot decode pixels ({name}): {frame.path.name}") from None
        plane = pixels if frame.index is None else pixels[frame.index]
        array[k] = plane.astype(np.float32) * frame.slope + frame.intercept
    return Volume(array=array, affine=LPS_TO_RAS @ lps, frames=frames)


# -- label maps ------------------------------------------------------------------------------------
def _apply_labels(raw: np.ndarray, labels: LabelPolicy) -> np.ndarray:
    if raw.dtype.kind == "f" and not (np.all(np.isfinite(raw)) and np.all(raw == np.round(raw))):
        raise VolumeError("label map holds non-integer values")
    values = np.unique(raw).astype(np.int64)
    table = labels.lookup()
    unknown = [int(v) for v in values if int(v) not in table]
    if unknown and labels.unmapped == "reject":
        raise VolumeError(f"label map holds values the policy does not map: {unknown[:10]}")
    out = np.zeros(raw.shape, dtype=np.uint8)
    as_int = raw.astype(np.int64)
    for v in values:
        out[as_int == v] = table.get(int(v), 0)
    return out


def _grid_distance(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between the two affines' positions of the grid's corner voxels."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.max(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0)))


def read_nifti_map(path: Path, volume: Volume, labels: LabelPolicy, tol_mm: float) -> np.ndarray:
    """A NIfTI label map resampled onto nothing: it must describe the image's own grid.

    A map stored with its axes permuted or flipped relative to the image (as dcm2niix and most
    viewers write them) is reoriented; any other difference of grid is a rejection.
    """
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise VolumeError(f"unreadable NIfTI map ({type(e).__name__})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"label map is {data.ndim}D, not 3D")
    affine = img.affine
    start = nib.orientations.io_orientation(affine)
    target = nib.orientations.io_orientation(volume.affine)
    transform = nib.orientations.ornt_transform(start, target)
    data = nib.orientations.apply_orientation(data, transform)
    affine = affine @ nib.orientations.inv_ornt_aff(transform, img.shape[:3])
    if data.shape != volume.array.shape:
        raise VolumeError(f"label map shape {data.shape} differs from image {volume.array.shape}")
    distance = _grid_distance(affine, volume.affine, data.shape)
    if distance > tol_mm:
        raise VolumeError(f"label map grid lies {distance:.3f} mm from the image grid")
    return _apply_labels(np.ascontiguousarray(data), labels)


def seg_referenced_series(ds: Dataset) -> str | None:
    ref = _item(ds, "ReferencedSeriesSequence")
    return str(ref.SeriesInstanceUID) if ref is not None and "SeriesInstanceUID" in ref else None


def read_seg_map(ds: Dataset, volume: Volume, labels: LabelPolicy, tol_mm: float) -> np.ndarray:
    """A DICOM SEG as a label map (segment number = local label) on the image's grid."""
    if str(ds.get("Modality", "")) != "SEG":
        raise VolumeError("not a DICOM SEG")
    frames = frames_of(ds, Path("seg"))
    first = volume.frames[0]
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as e:
        raise VolumeError(f"cannot decode SEG pixels ({type(e).__name__})") from None
    if pixels.ndim == 2:
        pixels = pixels[None]
    if str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        pixels = pixels >= (int(ds.get("MaximumFractionalValue", 255)) + 1) // 2
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    slice_at = {round(float(f.position @ normal), 2): k for k, f in enumerate(volume.frames)}
    raw = np.zeros(volume.array.shape, dtype=np.int64)
    per_frame = ds.PerFrameFunctionalGroupsSequence
    for i, frame in enumerate(frames):
        if frame.shape != first.shape or not np.allclose(frame.spacing, first.spacing, rtol=1e-4):
            raise VolumeError("SEG frames do not match the image's rows, columns or spacing")
        if np.max(np.abs(frame.orientation - first.orientation)) > 1e-3:
            raise VolumeError("SEG orientation differs from the image's")
        k = slice_at.get(round(float(frame.position @ normal), 2))
        if k is None or np.linalg.norm(frame.position - volume.frames[k].position) > tol_mm:
            raise VolumeError(f"SEG frame {i + 1} lies on no slice of the image")
        ident = _item(per_frame[i], "SegmentIdentificationSequence")
        segment = int(ident.ReferencedSegmentNumber) if ident is not None else 1
        raw[k][pixels[i] > 0] = segment
    return _apply_labels(raw, labels)


# -- cropping and writing ------------------------------------------------------------------------
def crop_to_labels(
    image: np.ndarray, label_map: np.ndarray, affine: np.ndarray, margin: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nonzero = np.argwhere(label_map > 0)
    if nonzero.size == 0:
        raise VolumeError("label map is empty: nothing to crop to")
    lo = np.maximum(nonzero.min(axis=0) - margin, 0)
    hi = np.minimum(nonzero.max(axis=0) + margin + 1, label_map.shape)
    window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return image[window], label_map[window], shifted
