"""DICOM de-identification: PS3.15 Annex E Basic profile plus a site policy's options.

:class:`Deidentifier` applies the profile to a pydicom ``Dataset`` recursively (into every sequence
item), replaces UIDs and identifiers with keyed values from the site's :class:`~deid.keys.SiteKeys`,
removes or shifts dates, drops private tags, records what it did in the dataset, and refuses
(:class:`Quarantined`) objects it cannot make safe: burned-in annotation without a cleaning rule,
and images that may show a face.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from deid.keys import SiteKeys
from deid.phi import (
    TEXT_VRS,
    KnownValueSearch,
    identifying_text,
    identifying_values,
    phi_kind,
    text_values,
)
from deid.profile import (
    PrivateTagRule,
    action_table,
    basic_action,
    is_checked_text,
    is_class_uid,
    resolve,
    unlisted_text_action,
)
from deid.values import age_band, age_in_years, as_text, clean_text, identifier_words, shift_date
from policies.site import PixelMask, SitePolicy

# Constants that identify no one, written where the profile says D (dummy). The scanner accepts
# exactly these, the keyed pseudonyms and the keyed UIDs, and nothing else, in places the profile
# covers.
DUMMY_TEXT = "ANONYMIZED"
DUMMY_BY_VR: dict[str, object] = {
    "PN": DUMMY_TEXT, "LO": DUMMY_TEXT, "SH": DUMMY_TEXT, "ST": DUMMY_TEXT, "LT": DUMMY_TEXT,
    "UT": DUMMY_TEXT, "UC": DUMMY_TEXT, "AE": DUMMY_TEXT, "CS": DUMMY_TEXT,
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D",
    "IS": "0", "DS": "0", "UR": "",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "UV": 0, "SV": 0,
}  # fmt: skip
DUMMY_VALUES = frozenset(str(v) for v in DUMMY_BY_VR.values()) | {""}
# Our implementation's UID (UUID-derived arc): pydicom's own root would equal the org root that
# InstanceCreatorUID holds in files pydicom wrote, and a UID must never be echoed from an input.
IMPLEMENTATION_CLASS_UID = "2.25.208421736598410389712904632257418403521"
# File-meta elements that may carry the sending site's identity.
_META_DROP = ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
              "ReceivingApplicationEntityTitle", "SourcePresentationAddress",
              "SendingPresentationAddress", "ReceivingPresentationAddress",
              "PrivateInformationCreatorUID", "PrivateInformation")  # fmt: skip


class Quarantined(Exception):
    """The object cannot be made safe under the policy; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class DeidOutcome:
    dataset: Dataset
    patient: str  # keyed patient pseudonym
    study: str  # keyed study pseudonym
    series: str  # keyed series pseudonym
    instance: str  # keyed instance pseudonym
    links: list[dict] = field(default_factory=list)  # pseudonym -> original, for the key store
    actions: dict[str, int] = field(default_factory=dict)  # how often each action was applied


@dataclass
class _Context:
    date_offset: int | None  # days subtracted from every date (None: dates are not shifted)
    identifiers: frozenset[str]  # lower-case words that must not survive a clean
    own: KnownValueSearch  # this object's names, IDs and institution data, found in any spelling
    counts: dict[str, int]


class Deidentifier:
    """Apply a site policy to DICOM datasets. One instance serves a whole run."""

    def __init__(self, policy: SitePolicy, keys: SiteKeys):
        self.policy = policy
        self.keys = keys
        self.options = frozenset(policy.deid.options)
        self.table = action_table(self.options)
        self.private_rule = PrivateTagRule.of(policy)

    # -- public ----------------------------------------------------------------------------------
    def check_releasable(self, ds: Dataset) -> None:
        """Raise :class:`Quarantined` for objects the policy does not let through."""
        if (
            "PixelData" not in ds
            and "FloatPixelData" not in ds
            and "DoubleFloatPixelData" not in ds
        ):
            return
        body = as_text(ds.get("BodyPartExamined")).upper().replace(" ", "")
        if body in self.policy.deid.face_body_parts and not self._has(
            "Clean Recognizable Visual Features"
        ):
            raise Quarantined(f"may show a face (BodyPartExamined={body})")
        burned = as_text(ds.get("BurnedInAnnotation")).upper() == "YES"
        modality = as_text(ds.get("Modality")).upper()
        suspect = modality in self.policy.deid.burned_in_modalities
        if (burned or suspect) and self._mask_for(ds) is None:
            why = "BurnedInAnnotation=YES" if burned else f"modality {modality} usually carries it"
            raise Quarantined(f"burned-in annotation ({why}) and no pixel mask in the policy")

    def apply(self, ds: Dataset) -> DeidOutcome:
        """De-identify ``ds`` in place and return it with its pseudonyms."""
        self.check_releasable(ds)
        patient_key = (
            as_text(ds.get("PatientID"))
            or as_text(ds.get("PatientName"))
            or as_text(ds.get("StudyInstanceUID"))
        )
        study_uid = as_text(ds.get("StudyInstanceUID"))
        series_uid = as_text(ds.get("SeriesInstanceUID"))
        sop_uid = as_text(ds.get("SOPInstanceUID"))
        patient = self.keys.pseudonym("p", patient_key)
        outcome = DeidOutcome(
            dataset=ds,
            patient=patient,
            study=self.keys.pseudonym("t", study_uid),
            series=self.keys.pseudonym("s", series_uid),
            instance=self.keys.pseudonym("i", sop_uid),
        )
        outcome.links = [
            {"pseudonym": patient, "kind": "patient", "original": patient_key},
            {"pseudonym": outcome.study, "kind": "study", "original": study_uid},
            {"pseudonym": outcome.series, "kind": "series", "original": series_uid},
        ]
        retained = self._retained_characteristics(ds)
        mask = self._mask_for(ds)
        if mask is not None:
            self._blank_pixels(ds, mask)
        shifts = self.policy.deid.shifts_dates
        identity = identifying_values(ds)
        ctx = _Context(
            date_offset=self.keys.date_offset_days(
                patient_key, self.policy.deid.date_shift_max_days
            )
            if shifts
            else None,
            identifiers=identifier_words(identity),
            own=KnownValueSearch(identity, min_length=3),
            counts={},
        )
        self._walk(ds, ctx)
        self._record(ds, patient, retained, cleaned_pixels=mask is not None)
        self._fix_meta(ds)
        outcome.actions = ctx.counts
        return outcome

    # -- the recursive walk ---------------------------------------------------------------------
    def _has(self, option: str) -> bool:
        return option in self.options

    def _walk(self, ds: Dataset, ctx: _Context) -> None:
        kept_private_blocks: set[tuple[int, int]] = set()
        private_creators: list[DataElement] = []
        for elem in list(ds):
            tag = elem.tag
            if tag.element == 0x0000:  # group lengths: meaningless after editing
                del ds[tag]
                continue
            if tag.is_private:
                if tag.is_private_creator:
                    private_creators.append(elem)
                elif self.private_rule.keeps(ds, elem):
                    kept_private_blocks.add((tag.group, tag.element >> 8))
                    self._count(ctx, "K-private")
                    # a private element the site declared safe is still an attribute the table
                    # does not list: no name, date, UID or identifying text gets through
                    self._unlisted(ds, elem, ctx)
                else:
                    del ds[tag]
                    self._count(ctx, "X-private")
                continue
            action = self.table.get(int(tag))
            if action is None:
                action = basic_action(int(tag))  # repeating groups (overlays, curves)
            if action is None:
                self._unlisted(ds, elem, ctx)
            else:
                self._act(ds, elem, resolve(action, elem.VR), ctx)
        for creator in private_creators:
            if (creator.tag.group, creator.tag.element) not in kept_private_blocks:
                del ds[creator.tag]

    def _act(self, ds: Dataset, elem: DataElement, action: str, ctx: _Context) -> None:
        self._count(ctx, action)
        vr = elem.VR
        if action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = Sequence() if vr == "SQ" else (b"" if vr in ("OB", "OW", "UN") else "")
        elif action == "D":
            self._dummy(elem)
        elif action == "U":
            self._remap_uid(elem)
        elif action == "K":
            if vr == "SQ":
                for item in elem.value:
                    self._walk(item, ctx)
        elif action == "C":
            self._clean(ds, elem, ctx)
        else:  # pragma: no cover - the table holds no other codes
            raise ValueError(f"unknown Annex E action {action!r} for {elem.tag}")

    def _unlisted(self, ds: Dataset, elem: DataElement, ctx: _Context) -> None:
        """Attributes Annex E does not list: kept, but never a name, a raw date, a raw UID or text
        that identifies (see :func:`deid.profile.unlisted_text_action`)."""
        vr = elem.VR
        if is_checked_text(elem):
            if unlisted_text_action(elem, self.options) == "X":
                self._act(ds, elem, "X", ctx)
            elif identifying_text(elem, text_values(elem), ctx.own):
                self._act(ds, elem, "Z", ctx)
            else:
                self._count(ctx, "C")
        elif vr == "SQ":
            for item in elem.value:
                self._walk(item, ctx)
        elif vr == "PN":
            self._act(ds, elem, "Z", ctx)
        elif vr in ("DA", "DT"):
            self._act(ds, elem, self._date_action(), ctx)
        elif vr == "UI" and not is_class_uid(elem):
            self._act(ds, elem, "K" if self._has("Retain UIDs") else "U", ctx)

    def _date_action(self) -> str:
        if self._has("Retain Longitudinal Temporal Information Full Dates"):
            return "K"
        if self.policy.deid.shifts_dates:
            return "C"
        return "Z"

    # -- the actions ------------------------------------------------------------------------------
    def _dummy(self, elem: DataElement) -> None:
        vr = elem.VR
        if vr == "SQ":
            elem.value = Sequence()
        elif vr == "UI":
            self._remap_uid(elem)
        elif vr in DUMMY_BY_VR:
            elem.value = DUMMY_BY_VR[vr]
        else:  # binary and unknown VRs have no meaningful dummy
            elem.value = b""

    def _remap_uid(self, elem: DataElement) -> None:
        if elem.VR != "UI":
            elem.value = b"" if elem.VR in ("OB", "OW", "UN") else ""
            return
        values = elem.value if elem.VM > 1 else [elem.value]
        new = [self.keys.uid(as_text(v)) if as_text(v) else "" for v in values]
        elem.value = new if elem.VM > 1 else new[0]

    def _clean(self, ds: Dataset, elem: DataElement, ctx: _Context) -> None:
        vr = elem.VR
        if vr == "SQ":
            for item in elem.value:
                self._walk(item, ctx)
        elif vr in ("DA", "DT"):
            if ctx.date_offset is None:
                elem.value = ""
            else:
                values = elem.value if elem.VM > 1 else [elem.value]
                shifted = [shift_date(as_text(v), ctx.date_offset) for v in values]
                elem.value = shifted if elem.VM > 1 else shifted[0]
        elif vr == "TM":
            if ctx.date_offset is None:  # times are only meaningful next to a kept date
                elem.value = ""
        elif vr in TEXT_VRS:
            values = elem.value if elem.VM > 1 else [elem.value]
            cleaned = [clean_text(as_text(v), ctx.identifiers) for v in values]
            # what the token clean leaves must not still hold the object's own values
            # (``DorotheaMbeki``, ``mbeki's``): then nothing of it is kept
            if identifying_text(elem, cleaned, ctx.own):
                cleaned = [""] * len(cleaned)
            elem.value = cleaned if elem.VM > 1 else cleaned[0]
        elif vr in ("AS", "CS", "DS", "IS", "US", "FL", "FD"):
            pass  # patient characteristics under Retain Patient Characteristics: handled after
        else:
            elem.value = b"" if vr in ("OB", "OW", "UN") else ""

    @staticmethod
    def _count(ctx: _Context, action: str) -> None:
        ctx.counts[action] = ctx.counts.get(action, 0) + 1

    # -- patient characteristics, pixels, records --------------------------------------------------
    def _retained_characteristics(self, ds: Dataset) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.policy.retain.sex:
            sex = as_text(ds.get("PatientSex")).upper()
            if sex in ("M", "F", "O"):
                out["PatientSex"] = sex
        if self.policy.retain.age == "5y-bands":
            years = age_in_years(ds)
            if years is not None:
                out["PatientAge"] = f"{age_band(years):03d}Y"
        return out

    def _mask_for(self, ds: Dataset) -> PixelMask | None:
        if not self._has("Clean Pixel Data"):
            return None
        modality = as_text(ds.get("Modality")).upper()
        manufacturer = as_text(ds.get("Manufacturer"))
        for mask in self.policy.deid.pixel_masks:
            if (
                mask.modality.upper() == modality
                and mask.rows == ds.get("Rows")
                and mask.columns == ds.get("Columns")
                and (mask.manufacturer is None or mask.manufacturer == manufacturer)
            ):
                return mask
        return None

    def _blank_pixels(self, ds: Dataset, mask: PixelMask) -> None:
        try:
            arr = np.array(ds.pixel_array)  # decodes compressed data if a decoder is installed
        except Exception as e:
            raise Quarantined(f"cannot decode pixels to clean them ({type(e).__name__})") from None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        view = arr.reshape((frames, ds.Rows, ds.Columns, -1))
        for box in mask.boxes:
            view[:, box.row0 : box.row1, box.col0 : box.col1, :] = 0
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            if as_text(ds.get("PhotometricInterpretation")).startswith("YBR"):
                ds.PhotometricInterpretation = "RGB"  # pydicom decodes YBR JPEG to RGB
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
        ds.BurnedInAnnotation = "NO"

    def _record(
        self, ds: Dataset, patient: str, retained: dict[str, str], cleaned_pixels: bool
    ) -> None:
        ds.PatientName = patient
        ds.PatientID = patient
        for kw, value in retained.items():
            setattr(ds, kw, value)
        ds.PatientIdentityRemoved = "YES"
        label = f"Med-LSDM policy {self.policy.name}"[:64]
        if phi_kind(label):  # a policy named like a date or a number would fail our own scan
            label = "Med-LSDM policy"
        ds.DeidentificationMethod = [label] + [m for _, m in self.policy.method_codes()]
        codes = Sequence()
        for value, meaning in self.policy.method_codes():
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = codes
        if self._has("Retain Longitudinal Temporal Information Full Dates"):
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif self.policy.deid.shifts_dates:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"
        if "PixelData" in ds and not cleaned_pixels and "BurnedInAnnotation" not in ds:
            ds.BurnedInAnnotation = "NO"  # checked above: not flagged, modality not suspect

    def _fix_meta(self, ds: Dataset) -> None:
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            meta = FileMetaDataset()
            ds.file_meta = meta
        for kw in _META_DROP:
            if kw in meta:
                delattr(meta, kw)
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = "MED-LSDM-DEID"
        if "TransferSyntaxUID" not in meta:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.preamble = b"\x00" * 128  # a preamble can hold a whole TIFF with its own metadata


def reading_config() -> None:
    """Read leniently: real exports hold odd VRs and bad values; we rewrite them anyway."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE


__all__ = [
    "DUMMY_VALUES",
    "TEXT_VRS",
    "DeidOutcome",
    "Deidentifier",
    "Quarantined",
    "reading_config",
]
