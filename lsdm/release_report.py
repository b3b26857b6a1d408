"""The release report of a synthetic dataset: ``report.json`` (a :class:`ReleaseReport`) and
``report.html`` (:mod:`lsdm.report_html`, pictures in ``report/``) beside the dataset's
``images/`` and ``maps/``.

The dataset must be a finished one whose files are what its ``generation.json`` records
(:mod:`lsdm.synthetic_folder`); the ``generation`` section states the settings recorded there.

Sections: ``provenance`` (from the generator bundle), ``generation`` (settings), ``dataset``,
``pictures`` (map, synthetic volume and overlay in three planes for a sample of subjects),
``fidelity`` against the site's real cohort (:func:`lsdm.fidelity.measure_fidelity`: the real
segmenter's Dice on real and synthetic volumes, Fréchet distance, diversity), ``memorisation``
(:mod:`lsdm.memorisation`) and ``release`` (the site policy's decision, made by the caller: this
package knows no policies).

The Fréchet extractor was trained on patient images: its weights are kept in ``site-private/``,
a folder never to be published.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from lsdm.bundle import Provenance
from lsdm.cohort import IMAGES_DIR, MAPS_DIR
from lsdm.config import LSDMConfig
from lsdm.data import Cohort
from lsdm.errors import InputError
from lsdm.fidelity import Fidelity, FidelitySettings, OnStage, measure_fidelity, open_synthetic
from lsdm.fidelity_plots import plot_dice, plot_memorisation, save_release_sheet
from lsdm.memorisation import Memorisation, check_memorisation
from lsdm.segmenter import load_volumes
from lsdm.synthetic_folder import RECORD_NAME, GenerationRecord, SyntheticFolder

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
PICTURES_DIR = "report"
PRIVATE_DIR = "site-private"
FORMAT = "med-lsdm-release-report"
FORMAT_VERSION = 2
SECTIONS = (
    "provenance",
    "generation",
    "dataset",
    "pictures",
    "fidelity",
    "memorisation",
    "release",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReleaseProvenance(Provenance):
    """The bundle's provenance, where its checkpoints came from, who signed it."""

    source: dict[str, Any] = Field(default_factory=dict)
    signer: dict[str, str] = Field(default_factory=dict)
    bundle_verified: bool


class Generation(_Section):
    """How the dataset was generated: the settings its ``generation.json`` records."""

    maps: str
    maps_augmented: bool
    steps: int
    guidance: float
    seed: int
    bundle: str
    sampler: str
    augmented_voxel_share_changed_mean: float | None = None
    generator_sha256: str | None = None  # filled from the record
    record: str = RECORD_NAME


def _recorded(generation: Generation, record: GenerationRecord, folder: Path) -> Generation:
    """``generation`` with the record's generator; refuses settings the record does not hold."""
    settings = record.settings
    wrong = [
        f"{field} {getattr(generation, field)} (recorded: {getattr(settings, field)})"
        for field in ("steps", "guidance", "seed", "maps_augmented", "sampler")
        if getattr(generation, field) != getattr(settings, field)
    ]
    if wrong:
        raise InputError(
            f"the report's generation settings differ from {folder / RECORD_NAME}: "
            + ", ".join(wrong)
        )
    return generation.model_copy(update={"generator_sha256": settings.generator_sha256})


class DatasetSummary(_Section):
    volumes: int
    ids: list[str]
    images: str = f"{IMAGES_DIR}/"
    maps: str = f"{MAPS_DIR}/"
    grid: list[int]
    intensity_scale: str = "[-1, 1] (the model's scale)"


class Pictures(_Section):
    sheet: str = f"{PICTURES_DIR}/sheet.png"
    sheet_subjects: list[str]
    sheet_columns: str = "map, synthetic, overlay; each in three planes"
    dice: str = f"{PICTURES_DIR}/dice.png"
    memorisation: str = f"{PICTURES_DIR}/memorisation.png"


class ReleaseDecision(_Section):
    """The site policy's release gate applied to the report (``node.generate.apply_gate``)."""

    policy: str | None = None
    releasable: bool
    reasons: list[str]
    gate: dict[str, Any] = Field(default_factory=dict)  # the policy's thresholds
    worst_epsilon: float | None = None  # None: some site trained without DP
    phi_scan_findings: int | None = None


class ReleaseReport(_Section):
    format: Literal["med-lsdm-release-report"] = FORMAT
    format_version: Literal[2] = FORMAT_VERSION
    created_at: str = Field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    provenance: ReleaseProvenance
    generation: Generation
    dataset: DatasetSummary
    pictures: Pictures
    fidelity: Fidelity
    memorisation: Memorisation
    release: ReleaseDecision | None = None  # None until the gate has decided


def build_report(
    synthetic_dir: Path,
    real: Cohort,
    config: LSDMConfig,
    provenance: ReleaseProvenance,
    generation: Generation,
    holdout: Cohort | None = None,
    segmentation_steps: int = 200,
    seed: int = 0,
    sample_subjects: int = 4,
    on_stage: OnStage | None = None,
    device: torch.device | str = "cpu",
) -> ReleaseReport:
    """Measure the dataset in ``synthetic_dir`` and write the report's pictures there; returns
    the report with ``release`` still empty (see :func:`lsdm.report_html.write_report`).
    Refuses (:class:`InputError`) a dataset that is unfinished, altered or not recorded, and a
    ``generation`` whose settings are not the recorded ones."""
    synthetic_dir = Path(synthetic_dir)
    generation = _recorded(generation, SyntheticFolder(synthetic_dir).verify(), synthetic_dir)
    if len(real.ids) < 3:
        raise InputError(f"the real cohort needs at least 3 subjects, has {len(real.ids)}")
    synthetic = open_synthetic(synthetic_dir, real.labels)
    if len(synthetic.ids) < 2:
        raise InputError("the report needs at least 2 synthetic volumes")
    syn = load_volumes(synthetic, config, synthetic.ids)
    real_all = load_volumes(real, config, real.ids)

    shown = sorted(
        np.random.default_rng(seed).choice(
            len(syn.ids), min(sample_subjects, len(syn.ids)), replace=False
        )
    )
    pictures = Pictures(sheet_subjects=[syn.ids[i] for i in shown])
    save_release_sheet(syn, shown, real.labels, synthetic_dir / pictures.sheet)

    settings = FidelitySettings(segmentation_steps=segmentation_steps, seed=seed)
    extractor = Path(PRIVATE_DIR) / "extractor.safetensors"
    fidelity = measure_fidelity(
        real_all,
        syn,
        real.labels,
        settings,
        synthetic_dir / extractor,
        extractor_record=extractor.as_posix(),
        on_stage=on_stage,
        device=device,
    )
    plot_dice(fidelity.dice, synthetic_dir / pictures.dice)

    stage = on_stage("memorisation check", 1) if on_stage else None
    held = None
    if holdout is not None:
        held_volumes = load_volumes(holdout, config, holdout.ids)
        held = (held_volumes.ids, held_volumes.images, held_volumes.labels)
    memorisation = check_memorisation(
        syn.ids,
        syn.images,
        syn.labels,
        real_all.ids,
        real_all.images,
        real_all.labels,
        holdout=held,
    )
    plot_memorisation(memorisation, synthetic_dir / pictures.memorisation)
    if stage:
        stage(1)
    return ReleaseReport(
        provenance=provenance,
        generation=generation,
        dataset=DatasetSummary(volumes=len(syn.ids), ids=syn.ids, grid=list(config.data.shape)),
        pictures=pictures,
        fidelity=fidelity,
        memorisation=memorisation,
    )


def load_report(path: Path) -> ReleaseReport:
    """A ``report.json``, validated."""
    try:
        return ReleaseReport.model_validate_json(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"not a release report: {path}: {err}") from None
