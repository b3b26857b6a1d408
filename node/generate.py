"""``lsdm-node verify`` and ``lsdm-node generate``: a site checks the coordinator's bundle, makes
a synthetic dataset from label maps with it, and measures the result against its own cohort.

Output folder: ``images/`` and ``maps/`` (the dataset), ``generation.json`` (the settings it
was made with and a checksum of every file, :mod:`lsdm.synthetic_folder`), ``report.json``,
``report.html`` and ``report/`` (the release report, :mod:`lsdm.release_report`),
``site-private/`` (the report's feature extractor, trained on patient images: never published).
The site policy's release gate decides ``releasable``; a dataset that fails it is still written,
marked not releasable. A folder begun with other settings is refused; while volumes are being
added the folder has no report, and its record says it is unfinished.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from node.errors import UserError
from policies.site import ReleaseGate, SitePolicy

if TYPE_CHECKING:  # torch-heavy: imported when a report is made
    from lsdm.memorisation import Memorisation
    from lsdm.release_report import ReleaseDecision, ReleaseReport


AUGMENTED_STAGING = ".augmented-maps."


# -- map augmentation ------------------------------------------------------------------------------
def augment_map(labels: np.ndarray, seed: int) -> np.ndarray:
    """A label-preserving random deformation of a (X, Y, Z) map: a smooth elastic displacement
    with a small rotation, scaling and shift, nearest-neighbour interpolation (so every voxel
    keeps a value of the original vocabulary), background outside. Deterministic in ``seed``."""
    from monai.transforms import Rand3DElastic

    transform = Rand3DElastic(
        sigma_range=(4.0, 6.0),
        magnitude_range=(80.0, 160.0),
        prob=1.0,
        rotate_range=(0.08, 0.08, 0.08),
        scale_range=(0.06, 0.06, 0.06),
        translate_range=tuple(max(1.0, 0.04 * n) for n in labels.shape),
        mode="nearest",
        padding_mode="zeros",
    )
    transform.set_random_state(seed=seed % (2**32))
    out = transform(labels[None].astype(np.float32))
    return np.asarray(out)[0].round().astype(labels.dtype)


def write_augmented_maps(paths: list[Path], folder: Path, seed: int) -> tuple[list[Path], dict]:
    """Deform every map of ``paths`` into ``folder`` (same names and affines); returns the new
    paths and, per map, the share of its voxels whose label changed."""
    from lsdm.generate import map_seed

    folder.mkdir(parents=True, exist_ok=True)
    changed, out = {}, []
    for path in paths:
        img = nib.load(path)
        original = np.asarray(img.dataobj)
        name = path.name
        deformed = augment_map(original, map_seed(seed + 1, name))
        target = folder / name
        nib.save(nib.Nifti1Image(deformed, img.affine), target)
        changed[name.split(".")[0]] = float((deformed != original).mean())
        out.append(target)
    return out, changed


# -- the release gate ------------------------------------------------------------------------------
def apply_gate(
    memorisation: Memorisation,
    frechet_distance: float | None,
    gate: ReleaseGate,
    epsilon: float,
    scan_findings: int | None,
    policy: str | None = None,
    *,
    finished: bool,
) -> ReleaseDecision:
    """The site policy's decision on a report's memorisation check and Fréchet distance.

    Rules: a finished dataset whose files are those its ``generation.json`` records (always);
    no near-copy of a training volume (always); median nearest-training distance ratio at
    least ``min_nn_distance_ratio``; the largest site ε at most ``max_epsilon`` (a site that
    trained without DP counts as ε = ∞); Fréchet distance at most ``max_fid``; a clean PHI scan
    of the dataset when ``require_clean_scan``.
    """
    from lsdm.release_report import ReleaseDecision

    reasons = []
    if not finished:
        reasons.append(
            "the dataset is unfinished or altered: its files are not those of a complete "
            "generation.json"
        )
    if memorisation.near_copies:
        reasons.append(
            f"{len(memorisation.near_copies)} synthetic volume(s) are near-copies of training "
            f"volumes: {', '.join(memorisation.near_copies)}"
        )
    ratio = memorisation.median_ratio
    if ratio is None or ratio < gate.min_nn_distance_ratio:
        shown = "undefined" if ratio is None else f"{ratio:.3f}"
        reasons.append(
            f"median nearest-training distance ratio {shown} is below the policy's "
            f"{gate.min_nn_distance_ratio}"
        )
    if gate.max_epsilon is not None and not epsilon <= gate.max_epsilon:
        if np.isinf(epsilon):
            reasons.append(
                "the generator was trained without differential privacy (at one site or more); "
                f"the policy allows at most epsilon {gate.max_epsilon}"
            )
        else:
            reasons.append(f"epsilon {epsilon:.3g} is above the policy's {gate.max_epsilon}")
    fid = frechet_distance
    if gate.max_fid is not None and not (fid is not None and fid <= gate.max_fid):
        reasons.append(f"Fréchet distance {fid:.4g} is above the policy's {gate.max_fid}")
    if gate.require_clean_scan and scan_findings:
        reasons.append(f"the PHI scan found {scan_findings} problem(s) in images/ and maps/")
    return ReleaseDecision(
        policy=policy,
        releasable=not reasons,
        reasons=reasons,
        gate=gate.model_dump(mode="json"),
        worst_epsilon=None if np.isinf(epsilon) else epsilon,
        phi_scan_findings=scan_findings,
    )


def is_finished(out: Path) -> bool:
    """True for a complete dataset whose files are exactly what its record holds."""
    from lsdm.errors import InputError
    from lsdm.synthetic_folder import SyntheticFolder

    try:
        SyntheticFolder(out).verify()
    except InputError:
        return False
    return True


def scan_dataset(out: Path, policy: SitePolicy) -> int:
    from deid.scan import scan_path

    return sum(len(scan_path(out / sub, policy=policy)) for sub in ("images", "maps"))


# -- generate --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateSpec:
    bundle: Path
    coordinator_key: Path
    out: Path
    maps: Path | None = None
    from_cohort: Path | None = None
    real: Path | None = None  # the site's real cohort for the report (default: from_cohort)
    holdout: Path | None = None
    steps: int | None = None  # None: the bundle's model config's sampling_steps
    guidance: float | None = None  # None: the bundle's model config's guidance_scale
    seed: int = 0
    batch_size: int | None = None
    augment_maps: bool = False
    segmentation_steps: int = 200
    report: bool = True


@dataclass
class GenerateResult:
    generated: int
    total: int
    report: ReleaseReport | None


def verify(bundle: Path, coordinator_key: Path):
    from lsdm.bundle import load_public_key, verify_bundle

    return verify_bundle(bundle, load_public_key(coordinator_key))


def generate(
    spec: GenerateSpec,
    policy: SitePolicy,
    on_done: Callable[[int, int], None] | None = None,
    on_stage: Callable[[str, int], Callable | None] | None = None,
) -> GenerateResult:
    """Verify and load the bundle, check every map and the real cohort, generate (resuming a
    folder begun with the same settings, refusing one begun with others), then build the
    release report from what the folder's record verifies and apply the policy's gate."""
    from lsdm.bundle import load_bundle, load_public_key
    from lsdm.data import open_cohort
    from lsdm.release_report import (
        PICTURES_DIR,
        REPORT_HTML,
        REPORT_JSON,
        Generation,
        ReleaseProvenance,
        build_report,
    )
    from lsdm.report_html import write_report
    from lsdm.synthetic_folder import SyntheticFolder

    if (spec.maps is None) == (spec.from_cohort is None):
        raise UserError("give exactly one of --maps DIR or --from-cohort COHORT")
    key = load_public_key(spec.coordinator_key)
    bundle = load_bundle(spec.bundle, key)
    generator, manifest = bundle.generator, bundle.manifest
    sampling = manifest.config.diffusion  # what an option left out (None) means
    spec = replace(
        spec,
        steps=spec.steps or sampling.sampling_steps,
        guidance=sampling.guidance_scale if spec.guidance is None else spec.guidance,
    )
    maps_dir = spec.maps if spec.maps is not None else spec.from_cohort / "maps"
    if spec.from_cohort is not None:
        open_cohort(spec.from_cohort)
    paths = generator.check_folder(maps_dir)
    real_path = spec.real or spec.from_cohort
    real = holdout = None
    if spec.report:
        if real_path is None:
            raise UserError("the release report needs the site's real cohort: --real COHORT")
        real = open_cohort(real_path)
        holdout = open_cohort(spec.holdout) if spec.holdout else None
        if sorted(real.labels) != sorted(manifest.labels):
            raise UserError(
                f"the cohort's labels {sorted(real.labels)} differ from the bundle's "
                f"{sorted(manifest.labels)}: {real_path}"
            )
    spec.out.mkdir(parents=True, exist_ok=True)
    for leftover in spec.out.glob(f"{AUGMENTED_STAGING}*"):  # of a run that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=AUGMENTED_STAGING, dir=spec.out))
    try:
        changed = None
        if spec.augment_maps:
            paths, changed = write_augmented_maps(paths, staging, spec.seed)
        settings = generator.settings(
            paths, spec.seed, spec.steps, spec.guidance, maps_augmented=spec.augment_maps
        )
        if SyntheticFolder(spec.out).plan(settings):  # refuses a folder of other settings
            # volumes will be added: the old report no longer describes the folder
            for stale in (REPORT_JSON, REPORT_HTML):
                (spec.out / stale).unlink(missing_ok=True)
            shutil.rmtree(spec.out / PICTURES_DIR, ignore_errors=True)
        made = generator.generate_folder(
            paths,
            spec.out,
            seed=spec.seed,
            steps=spec.steps,
            guidance_scale=spec.guidance,
            batch_size=spec.batch_size,
            on_done=on_done,
            maps_augmented=spec.augment_maps,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not spec.report:
        return GenerateResult(len(made), len(paths), None)
    generation = Generation(
        maps=maps_dir.name if spec.maps is not None else "the cohort's own maps",
        maps_augmented=spec.augment_maps,
        steps=spec.steps,
        guidance=spec.guidance,
        seed=spec.seed,
        bundle=spec.bundle.name,
        sampler=manifest.config.diffusion.objective,
        augmented_voxel_share_changed_mean=(
            float(np.mean(list(changed.values()))) if changed is not None else None
        ),
    )
    provenance = ReleaseProvenance(
        **manifest.provenance.model_dump(),
        source=manifest.source,
        signer=manifest.signer,
        bundle_verified=True,
    )
    report = build_report(
        spec.out,
        real,
        manifest.config,
        provenance,
        generation,
        holdout=holdout,
        segmentation_steps=spec.segmentation_steps,
        seed=spec.seed,
        on_stage=on_stage,
        device=generator.device,
    )
    decision = apply_gate(
        report.memorisation,
        report.fidelity.frechet_distance.value,
        policy.release,
        manifest.worst_epsilon,
        scan_dataset(spec.out, policy),
        policy=policy.name,
        finished=is_finished(spec.out),
    )
    report = report.model_copy(update={"release": decision})
    write_report(report, spec.out)
    return GenerateResult(len(made), len(paths), report)
