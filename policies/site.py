"""The schema of a site policy: how a hospital de-identifies, labels, crops and releases its data.

A policy is data read from YAML, JSON or TOML and validated here, at the edge; everything below the
CLI receives a ``SitePolicy`` object. Unknown fields are errors, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from policies.vocabulary import BREAST_MRI_LABELS, LabelVocabulary, validate_vocabulary

# DICOM PS3.16 CID 7050 "De-identification Method": the code meanings of the options that can be
# layered on the Basic Application Level Confidentiality Profile (113100).
BASIC_PROFILE = "Basic Application Confidentiality Profile"
CID7050: dict[str, str] = {
    BASIC_PROFILE: "113100",
    "Clean Pixel Data": "113101",
    "Clean Recognizable Visual Features": "113102",
    "Clean Graphics": "113103",
    "Clean Structured Content": "113104",
    "Clean Descriptors": "113105",
    "Retain Longitudinal Temporal Information Full Dates": "113106",
    "Retain Longitudinal Temporal Information Modified Dates": "113107",
    "Retain Patient Characteristics": "113108",
    "Retain Device Identity": "113109",
    "Retain UIDs": "113110",
    "Retain Safe Private": "113111",
    "Retain Institution Identity": "113112",
}
DeidOption = Literal[
    "Clean Pixel Data",
    "Clean Recognizable Visual Features",
    "Clean Graphics",
    "Clean Structured Content",
    "Clean Descriptors",
    "Retain Longitudinal Temporal Information Full Dates",
    "Retain Longitudinal Temporal Information Modified Dates",
    "Retain Patient Characteristics",
    "Retain Device Identity",
    "Retain UIDs",
    "Retain Safe Private",
    "Retain Institution Identity",
]
# Options that would let an identifying value through unchanged: a policy may hold them only if it
# says so explicitly (``allow_identifying_options``), never by accident.
IDENTIFYING_OPTIONS = frozenset(
    {
        "Retain Longitudinal Temporal Information Full Dates",
        "Retain UIDs",
        "Retain Device Identity",
        "Retain Institution Identity",
    }
)


class _Strict(BaseModel):
    # every float is finite: an infinite ε (target or release limit) would read as "DP enabled"
    # while promising nothing; "no limit" is written null
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PixelBox(_Strict):
    """A rectangle of pixels (0-based, end exclusive) blanked to remove burned-in text."""

    row0: int = Field(ge=0)
    row1: int = Field(gt=0)
    col0: int = Field(ge=0)
    col1: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> PixelBox:
        if self.row1 <= self.row0 or self.col1 <= self.col0:
            raise ValueError("box must have row1 > row0 and col1 > col0")
        return self


class PixelMask(_Strict):
    """Where a given kind of image carries burned-in text (as in CTP's pixel anonymizer scripts)."""

    modality: str = Field(description="DICOM Modality this mask applies to, e.g. US")
    rows: int = Field(gt=0, description="image height the boxes were drawn for")
    columns: int = Field(gt=0, description="image width the boxes were drawn for")
    manufacturer: str | None = Field(None, description="restrict to one manufacturer (exact)")
    boxes: list[PixelBox] = Field(min_length=1)


class SafePrivateTag(_Strict):
    """A private element a site has checked holds no identity (kept under Retain Safe Private)."""

    creator: str = Field(description="Private Creator string, e.g. 'SIEMENS CSA HEADER'")
    element: int = Field(
        ge=0x00, le=0xFF, description="element offset within the block (0x00-0xFF)"
    )
    group: int = Field(description="odd group number, e.g. 0x0029")

    @field_validator("group")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0 or not 0x0009 <= v <= 0xFFFF:
            raise ValueError("private groups are odd numbers from 0x0009")
        return v


class DeidPolicy(_Strict):
    profile: Literal["Basic Application Confidentiality Profile"] = BASIC_PROFILE
    options: list[DeidOption] = Field(
        default_factory=list, description="CID 7050 options applied on top of the Basic profile"
    )
    allow_identifying_options: bool = Field(
        False, description="must be true to use options that keep identifying values unchanged"
    )
    date_shift_max_days: int = Field(
        3650,
        ge=1,
        le=36500,
        description="keyed per-patient shift is drawn from 1..this many days back",
    )
    burned_in_modalities: list[str] = Field(
        default_factory=lambda: ["US", "SC", "XA", "XC", "ES", "OT", "GM", "SM", "DOC", "ECG"],
        description="modalities treated as carrying burned-in text even without BurnedInAnnotation",
    )
    pixel_masks: list[PixelMask] = Field(
        default_factory=list,
        description="under Clean Pixel Data: boxes to blank; images no mask fits are quarantined",
    )
    face_body_parts: list[str] = Field(
        default_factory=lambda: ["HEAD", "BRAIN", "SKULL", "FACE", "NECK", "HEADNECK", "WHOLEBODY"],
        description="BodyPartExamined values whose images may show a face: quarantined unless the "
        "Clean Recognizable Visual Features option is declared (the site defaced them upstream)",
    )
    safe_private_tags: list[SafePrivateTag] = Field(
        default_factory=list, description="private elements kept under Retain Safe Private"
    )

    @field_validator("options")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("an option is listed twice")
        return v

    @field_validator("burned_in_modalities", "face_body_parts")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [s.strip().upper() for s in v]

    @model_validator(mode="after")
    def _consistent(self) -> DeidPolicy:
        opts = set(self.options)
        dates = {o for o in opts if o.startswith("Retain Longitudinal")}
        if len(dates) > 1:
            raise ValueError(
                "choose one of the two Retain Longitudinal Temporal Information options"
            )
        risky = sorted(opts & IDENTIFYING_OPTIONS)
        if risky and not self.allow_identifying_options:
            raise ValueError(
                f"options {risky} keep identifying values; set allow_identifying_options: true "
                "if that is really intended"
            )
        if self.pixel_masks and "Clean Pixel Data" not in opts:
            raise ValueError("pixel_masks given but the 'Clean Pixel Data' option is not enabled")
        if self.safe_private_tags and "Retain Safe Private" not in opts:
            raise ValueError("safe_private_tags given but 'Retain Safe Private' is not enabled")
        return self

    def has(self, option: str) -> bool:
        return option in self.options

    @property
    def shifts_dates(self) -> bool:
        return self.has("Retain Longitudinal Temporal Information Modified Dates")


class RetainPolicy(_Strict):
    """Patient characteristics kept, coarsened, in the outputs (nothing by default)."""

    age: Literal["none", "5y-bands"] = Field(
        "none", description="5y-bands keeps age as the start of a 5-year band (90+ pooled)"
    )
    sex: bool = Field(False, description="keep PatientSex (M/F/O)")


class LabelPolicy(_Strict):
    vocabulary: LabelVocabulary = Field(
        default_factory=lambda: dict(BREAST_MRI_LABELS),
        description="the federation's label values and names; 0 is background",
    )
    local_to_vocabulary: dict[int, int] = Field(
        default_factory=dict,
        description="this site's map values -> vocabulary values; empty means identity",
    )
    unmapped: Literal["reject", "background"] = Field(
        "reject",
        description="what to do with a map value that is neither mapped nor in the vocabulary",
    )

    @field_validator("vocabulary")
    @classmethod
    def _vocab(cls, v: dict[int, str]) -> dict[int, str]:
        return validate_vocabulary(v)

    @model_validator(mode="after")
    def _targets_known(self) -> LabelPolicy:
        unknown = sorted({t for t in self.local_to_vocabulary.values() if t not in self.vocabulary})
        if unknown:
            raise ValueError(f"local_to_vocabulary maps to values not in the vocabulary: {unknown}")
        return self

    def lookup(self) -> dict[int, int]:
        """Local value -> vocabulary value; the vocabulary's own values map to themselves."""
        table = {v: v for v in self.vocabulary}
        table.update(self.local_to_vocabulary)
        return table


class CropPolicy(_Strict):
    mode: Literal["none", "labelled"] = Field(
        "labelled", description="labelled: crop each volume to the bounding box of non-zero labels"
    )
    margin_voxels: int = Field(4, ge=0, description="voxels kept around the labelled box, per side")


class VolumePolicy(_Strict):
    min_slices: int = Field(4, ge=2, description="series with fewer slices are rejected")
    slice_spacing_tolerance: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="allowed relative deviation of a slice gap from the median gap",
    )
    orientation_tolerance: float = Field(
        1e-3, gt=0, lt=0.1, description="allowed difference of direction cosines between slices"
    )
    map_affine_tolerance_mm: float = Field(
        0.01, gt=0, description="how far a label map's grid may lie from its image's grid, in mm"
    )


class DPSettings(_Strict):
    """Differential privacy for local training: DP-SGD with a lifetime (ε, δ) budget per cohort
    (node/privacy.py, node/ledger.py)."""

    enabled: bool = True
    target_epsilon: float = Field(8.0, gt=0)
    target_delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping bound")
    accountant: Literal["rdp", "prv"] = "rdp"
    max_noise_multiplier: float = Field(
        10.0,
        gt=0,
        description="refuse a round whose planned steps would need more noise than this to "
        "stay within the budget (the model would learn nothing)",
    )


class ReleaseGate(_Strict):
    """Thresholds a synthetic release must meet before it may leave the site or the federation."""

    max_epsilon: float | None = Field(10.0, gt=0, description="refuse a release above this ε")
    min_nn_distance_ratio: float = Field(
        0.9,
        gt=0,
        description="median synthetic-to-train nearest-neighbour distance over holdout-to-train "
        "(a generator as far from the training set as new patients scores 1 up to sampling noise)",
    )
    max_fid: float | None = Field(None, gt=0, description="refuse a release with a worse 3D-FID")
    require_clean_scan: bool = Field(True, description="the PHI scanner must find nothing")


class SitePolicy(_Strict):
    kind: Literal["site"] = "site"
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    deid: DeidPolicy = Field(default_factory=DeidPolicy)
    retain: RetainPolicy = Field(default_factory=RetainPolicy)
    labels: LabelPolicy = Field(default_factory=LabelPolicy)
    crop: CropPolicy = Field(default_factory=CropPolicy)
    volumes: VolumePolicy = Field(default_factory=VolumePolicy)
    dp: DPSettings = Field(default_factory=DPSettings)
    release: ReleaseGate = Field(default_factory=ReleaseGate)

    @model_validator(mode="after")
    def _retain_needs_option(self) -> SitePolicy:
        if (self.retain.age != "none" or self.retain.sex) and not self.deid.has(
            "Retain Patient Characteristics"
        ):
            raise ValueError(
                "retain.age/retain.sex need 'Retain Patient Characteristics' in deid.options"
            )
        return self

    def method_description(self) -> str:
        """The text recorded in DeIdentificationMethod (0012,0063)."""
        parts = [BASIC_PROFILE, *self.deid.options]
        return f"Med-LSDM policy {self.name}: " + "; ".join(parts)

    def method_codes(self) -> list[tuple[str, str]]:
        """(code value, meaning) pairs for DeIdentificationMethodCodeSequence (0012,0064)."""
        return [(CID7050[m], m) for m in [BASIC_PROFILE, *self.deid.options]]
