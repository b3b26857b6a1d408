"""``lsdm-node prepare``: a PACS export and label maps in, a de-identified training cohort out."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from deid.audit import AUDIT_NAME, AuditLog
from deid.dicom import Deidentifier, Quarantined
from deid.files import NotDicom, Skipped, iter_files, read_dicom
from deid.keys import SiteKeys, ensure_outside
from deid.scan import KnownValues, scan_path
from deid.volumes import (
    IMAGE_MODALITIES_EXCLUDED,
    VolumeError,
    assemble_volume,
    crop_to_labels,
    read_nifti_map,
    read_seg_map,
    seg_referenced_series,
)
from lsdm.atomic import staged_directory
from lsdm.cohort import (
    IMAGES_DIR,
    MAPS_DIR,
    NIFTI_SUFFIX,
    declared_voxels,
    write_manifest,
    write_nifti,
)
from node.errors import ScanFailed, UserError
from policies.site import SitePolicy

COVARIATES_NAME = "covariates.json"


@dataclass
class Series:
    uid: str
    files: list[Path] = field(default_factory=list)
    folders: set[Path] = field(default_factory=set)
    patient_key: str = ""
    quarantined: str | None = None
    characteristics: dict[str, str] = field(default_factory=dict)


@dataclass
class PrepareReport:
    subjects: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (series pseudonym, reason)
    skipped: list[Skipped] = field(default_factory=list)  # files: not DICOM, corrupt, not images
    unpaired_maps: list[Path] = field(default_factory=list)


@dataclass
class MapSource:
    path: Path
    seg_uid: str | None = None  # set for DICOM SEG maps


def _inside_maps(target: Path, maps_dir: Path, line: int, pairs: Path) -> Path:
    """``maps_dir / target``, refused unless it lies inside ``maps_dir`` (links resolved): a
    pairs file must not make prepare read files the site did not hand over as maps."""
    inside = (maps_dir / target).resolve()
    if target.is_absolute() or not inside.is_relative_to(maps_dir.resolve()):
        raise UserError(
            f"pairs line {line}: map {target} lies outside --maps {maps_dir} "
            f"(with --maps, map paths are relative to it): {pairs}"
        )
    return maps_dir / target


def _read_pairs(pairs: Path, maps_dir: Path | None) -> dict[str, Path]:
    """CSV rows ``series UID or folder, map file``. With --maps, map paths are relative to it
    and must stay inside it; without, they are taken as given."""
    out: dict[str, Path] = {}
    try:
        with pairs.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or row[0].strip().startswith("#"):
                    continue
                if len(row) != 2:
                    raise UserError(f"pairs line {n}: expected 'series UID or folder,map': {pairs}")
                key, target = row[0].strip(), Path(row[1].strip())
                if n == 1 and key.lower() in ("series", "series_uid", "folder", "source"):
                    continue  # a header row
                if maps_dir is not None:
                    target = _inside_maps(target, maps_dir, n, pairs)
                out[key] = target
    except OSError as e:
        raise UserError(f"cannot read pairs file ({e.strerror}): {pairs}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"pairs file is not UTF-8 CSV text ({e}): {pairs}") from None
    return out


def _check_declared_size(path: Path, volume_shape: tuple[int, ...]) -> None:
    """Refuse a NIfTI map whose header declares another voxel count than its image's before any
    of its voxels is read (a forged header could otherwise make us allocate anything)."""
    try:
        header = nib.load(path)
    except Exception:  # an unreadable file: read_nifti_map says so
        return
    try:
        voxels = declared_voxels(header)
    except ValueError as e:
        raise VolumeError(f"label map: {e}") from None
    expected = int(np.prod(volume_shape))
    if voxels != expected:
        raise VolumeError(
            f"label map declares {voxels} voxels, the image has {expected} {tuple(volume_shape)}"
        )


def _nothing_prepared(report: PrepareReport, src: Path, out: Path) -> UserError:
    if not report.rejected:
        return UserError(f"no DICOM image series in {src}; nothing was written to {out}")
    reasons = Counter(reason for _, reason in report.rejected).most_common(3)
    shown = "; ".join(f"{count}x {reason}" for reason, count in reasons)
    return UserError(
        f"every series was rejected ({len(report.rejected)}: {shown}); nothing was written to {out}"
    )


def _group_input(
    src: Path, deid: Deidentifier, known: KnownValues, report: PrepareReport, on_file
) -> tuple[dict[str, Series], dict[str, Path]]:
    series: dict[str, Series] = {}
    segs: dict[str, Path] = {}
    for n, path in enumerate(iter_files(src), 1):
        try:
            ds = read_dicom(path, header_only=True)
        except NotDicom as e:
            report.skipped.append(Skipped(path, e.reason))
            continue
        finally:
            if on_file:
                on_file(n)
        known.add(ds)
        modality = str(ds.get("Modality", "")).upper()
        if modality == "SEG":
            ref = seg_referenced_series(ds)
            if ref:
                segs[ref] = path
            else:
                report.skipped.append(Skipped(path, "DICOM SEG without a referenced series"))
            continue
        if modality in IMAGE_MODALITIES_EXCLUDED or "Rows" not in ds:
            report.skipped.append(Skipped(path, f"not an image ({modality or 'no modality'})"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "")).strip()
        if not uid:
            report.skipped.append(Skipped(path, "image without a SeriesInstanceUID"))
            continue
        s = series.setdefault(uid, Series(uid))
        s.files.append(path)
        s.folders.add(path.parent)
        s.patient_key = (
            str(ds.get("PatientID", "")).strip() or str(ds.get("PatientName", "")).strip() or uid
        )
        if s.quarantined is None:
            try:
                deid.check_releasable(ds)
            except Quarantined as e:
                s.quarantined = e.reason
        retained = deid._retained_characteristics(ds)
        s.characteristics = {
            name: value
            for name, value in (
                ("sex", retained.get("PatientSex")),
                ("age_band", _band_label(retained.get("PatientAge"))),
            )
            if value
        }
    return series, segs


def _band_label(age: str | None) -> str | None:
    """``045Y`` -> ``45-49``; ``090Y`` -> ``90+``."""
    if not age:
        return None
    start = int(age[:3])
    return "90+" if start >= 90 else f"{start}-{start + 4}"


def _map_sources(
    series: dict[str, Series], segs: dict[str, Path], maps_dir: Path | None, pairs: dict[str, Path]
) -> tuple[dict[str, MapSource], list[Path]]:
    """Which map belongs to which series; and the maps that belong to none."""
    candidates: dict[str, MapSource] = {uid: MapSource(p, uid) for uid, p in segs.items()}
    all_maps: set[Path] = set()
    if maps_dir is not None:
        for path in iter_files(maps_dir):
            name = path.name
            if name.endswith((NIFTI_SUFFIX, ".nii")):
                all_maps.add(path)
                uid = name.removesuffix(NIFTI_SUFFIX).removesuffix(".nii")
                candidates.setdefault(uid, MapSource(path))
            else:
                try:
                    ds = read_dicom(path, header_only=True)
                except NotDicom:
                    continue
                ref = seg_referenced_series(ds) if ds.get("Modality") == "SEG" else None
                if ref:
                    all_maps.add(path)
                    candidates.setdefault(ref, MapSource(path, ref))
    folder_to_uid = {folder.resolve(): uid for uid, s in series.items() for folder in s.folders}
    for key, target in pairs.items():
        uid = key if key in series else folder_to_uid.get(Path(key).expanduser().resolve())
        if uid is None:
            uid = key  # reported below as a map without a series
        all_maps.add(target)
        is_seg = not target.name.endswith((NIFTI_SUFFIX, ".nii"))
        candidates[uid] = MapSource(target, uid if is_seg else None)
    used = {candidates[uid].path for uid in series if uid in candidates}
    unpaired = sorted(p for p in all_maps if p not in used)
    return candidates, unpaired


def prepare_cohort(
    src: Path,
    out: Path,
    policy: SitePolicy,
    keys: SiteKeys,
    *,
    maps_dir: Path | None = None,
    pairs: Path | None = None,
    on_file: Callable[[int], None] | None = None,
    on_series: Callable[[int, int], None] | None = None,
) -> PrepareReport:
    """Build ``out`` (images/, maps/, cohort.json, audit.jsonl) or leave nothing at all."""
    if not src.is_dir():
        raise UserError(f"input folder not found: {src}")
    if maps_dir is not None and not maps_dir.is_dir():
        raise UserError(f"maps folder not found: {maps_dir}")
    if pairs is not None and not pairs.is_file():
        raise UserError(f"pairs file not found: {pairs}")
    for other in (src, maps_dir):
        if other is not None:
            o, s = out.resolve(), other.resolve()
            if o == s or s in o.parents or o in s.parents:
                raise UserError(f"output must lie outside the input folders: {out}")
    ensure_outside(keys.root, out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output already exists and is not empty: {out}")

    deid = Deidentifier(policy, keys)
    report = PrepareReport()
    known = KnownValues()
    series, segs = _group_input(src, deid, known, report, on_file)
    pair_table = _read_pairs(pairs, maps_dir) if pairs is not None else {}
    sources, report.unpaired_maps = _map_sources(series, segs, maps_dir, pair_table)

    links: list[dict] = []
    covariates: dict[str, dict[str, str]] = {}
    with staged_directory(out) as stage:
        (stage / IMAGES_DIR).mkdir()
        (stage / MAPS_DIR).mkdir()
        audit = AuditLog(
            stage / AUDIT_NAME, command="prepare", policy=policy, key_fingerprint=keys.fingerprint
        )
        ordered = sorted(series.values(), key=lambda s: keys.pseudonym("s", s.uid))
        for i, s in enumerate(ordered, 1):
            pseudonym = keys.pseudonym("s", s.uid)
            patient = keys.pseudonym("p", s.patient_key)
            try:
                if s.quarantined:
                    raise VolumeError(f"quarantined: {s.quarantined}")
                source = sources.get(s.uid)
                if source is None:
                    raise VolumeError("no label map for this series")
                volume = assemble_volume(sorted(s.files), policy.volumes)
                if not np.isfinite(volume.array).all():
                    raise VolumeError("image has NaN or infinite values")
                tol = policy.volumes.map_affine_tolerance_mm
                if source.seg_uid is not None:
                    try:
                        seg = read_dicom(source.path)
                    except NotDicom as e:
                        raise VolumeError(f"label map: {e.reason}") from None
                    label_map = read_seg_map(seg, volume, policy.labels, tol)
                else:
                    _check_declared_size(source.path, volume.array.shape)
                    label_map = read_nifti_map(source.path, volume, policy.labels, tol)
                image, affine = volume.array, volume.affine
                if policy.crop.mode == "labelled":
                    image, label_map, affine = crop_to_labels(
                        image, label_map, affine, policy.crop.margin_voxels
                    )
            except VolumeError as e:
                report.rejected.append((pseudonym, e.reason))
                audit.add("rejected", series=pseudonym, patient=patient, reason=e.reason)
            else:
                write_nifti(stage / IMAGES_DIR / f"{pseudonym}{NIFTI_SUFFIX}", image, affine)
                write_nifti(stage / MAPS_DIR / f"{pseudonym}{NIFTI_SUFFIX}", label_map, affine)
                report.subjects.append(pseudonym)
                values, counts = np.unique(label_map, return_counts=True)
                audit.add(
                    "included",
                    series=pseudonym,
                    patient=patient,
                    slices=int(volume.array.shape[0]),
                    shape=[int(n) for n in image.shape],
                    cropped=policy.crop.mode == "labelled",
                    labels={int(v): int(c) for v, c in zip(values, counts, strict=True)},
                )
                links += [
                    {"pseudonym": pseudonym, "kind": "series", "original": s.uid},
                    {"pseudonym": patient, "kind": "patient", "original": s.patient_key},
                ]
                if s.characteristics:
                    covariates[pseudonym] = s.characteristics
            if on_series:
                on_series(i, len(ordered))
        if not report.subjects:  # an empty cohort is no cohort: publish nothing
            raise _nothing_prepared(report, src, out)
        for _ in report.unpaired_maps:
            audit.add("unpaired-map", reason="a label map that matches no series")
        for skipped in report.skipped:
            audit.add("skipped", reason=skipped.reason)
        write_manifest(stage, labels=dict(policy.labels.vocabulary))
        if covariates:
            (stage / COVARIATES_NAME).write_text(json.dumps(covariates, indent=2, sort_keys=True))
        audit.write()
        findings = scan_path(stage, policy=policy, known_values=known.values)
        if findings:
            raise ScanFailed(findings)
        keys.append_links(links)
    return report
