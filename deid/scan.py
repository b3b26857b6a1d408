"""The PHI scanner: what identifying data survives in a folder the site is about to publish.

It checks DICOM (every attribute the Annex E profile covers, recursively, plus names, dates and
UIDs anywhere, dates, phone and record numbers in any text attribute, private tags, burned-in
annotation), NIfTI headers (descrip, aux_file, intent_name, db_name, extensions), JSON (keys and
values), file names, and, when given the identifying values harvested from the input, a byte-level
search of every file for each of them in any case and spelling (``deid.phi.KnownValueSearch``).

Findings never repeat the identifying value itself, so a report can be shared: they name the file,
the place and the kind of data, and show a masked hint.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from deid.dicom import DUMMY_VALUES
from deid.files import NotDicom, iter_files, read_dicom
from deid.phi import (
    CHECKED_TEXT_VRS,
    CODED_KEYWORDS,
    DATE_DIGITS,
    DICOM_UID_PATTERN,
    KEYED_UID,
    KnownValueSearch,
    date_spellings,
    digit_cores,
    element_identity,
    identifying_text,
    kind_of,
    name_parts,
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
from policies.presets import STRICT
from policies.site import SitePolicy

PSEUDONYM = re.compile(r"^[a-z]-[a-z]{16}$")
DATE_PATTERN = DATE_DIGITS
LONG_NUMBER = re.compile(r"(?<!\d)\d{6,}(?!\d)")
PHI_KEY = re.compile(
    r"patient|birth|accession|mrn|physician|institution|address|phone|operator|"
    r"^name$|_name$|^dob$|ssn|email",
    re.IGNORECASE,
)
NIFTI_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz")
MIN_KNOWN_VALUE = 4


@dataclass(frozen=True)
class Finding:
    path: str  # relative to the scanned root
    where: str  # the attribute, header field, JSON path or "file name"
    kind: str  # name, id, date, uid, institution, descriptor, private, burned-in, marker, ...
    hint: str  # masked: never the identifying value itself

    def line(self) -> str:
        return f"{self.path}: {self.where}: {self.kind} ({self.hint})"


def mask(value: str) -> str:
    value = value.strip()
    if len(value) <= 2:
        return "*" * len(value)
    return value[0] + "*" * (len(value) - 2) + value[-1] + f" [{len(value)} chars]"


def _harmless_text(value: str) -> bool:
    """A value de-identification writes: empty, a dummy or a keyed pseudonym."""
    return value in DUMMY_VALUES or bool(PSEUDONYM.match(value))


def _values(elem: DataElement) -> list[str]:
    if elem.VR == "SQ" or elem.value is None:
        return []
    if elem.VR in ("OB", "OW", "UN", "OF", "OD", "OL", "OV"):
        return ["<binary>"] if elem.value else []
    values = elem.value if elem.VM > 1 else [elem.value]
    return [str(v).strip() for v in values if str(v).strip()]


_LENIENT = frozenset({"Clean Descriptors"})  # the option under which unlisted free text is kept


# -- harvesting what must not survive --------------------------------------------------------------
class KnownValues:
    """The names, IDs, dates, instance UIDs and institution data of the input objects.

    Used for the byte-level search of outputs. Names are also harvested by component, IDs also by
    their digit cores, dates also in their ISO, European and US spellings. Text the profile removes
    is harvested whole (inside removed sequences, unlisted text that de-identification drops);
    descriptors it keeps or cleans and coded values (CS) are not, nor values that any input also
    holds in attributes the profile keeps (a manufacturer entered as InstitutionName, a coding
    scheme called TEST): those would be found in every correct output. Purely numeric values
    under 6 digits collide with binary data.
    """

    def __init__(self) -> None:
        self._found: set[str] = set()
        self._kept: set[str] = set()

    def add(self, ds: Dataset) -> None:
        own: set[str] = set()  # the object's identity, against which its unlisted text is judged
        unlisted: list[DataElement] = []
        self._walk(ds, False, own, unlisted)
        search = KnownValueSearch(own, min_length=3)
        for elem in unlisted:
            # unlisted text is kept only when de-identification would keep it (under the most
            # lenient policy); what it removes is harvested like the content of removed sequences
            if unlisted_text_action(elem, _LENIENT) == "X" or identifying_text(
                elem, _values(elem), search
            ):
                self._harvest(elem, basic_action(int(elem.tag)), removed=True)
            else:
                self._kept.update(_values(elem))

    @property
    def values(self) -> set[str]:
        # found, by the search the outputs get, in a kept value (OFFIS e.V. in its Manufacturer)
        kept = "\x00".join(sorted(self._kept)).encode("utf-8")
        return self._found - set(KnownValueSearch(self._found).find(kept))

    def _walk(self, ds: Dataset, removed: bool, own: set[str], unlisted: list[DataElement]) -> None:
        for elem in ds:
            own.update(element_identity(elem))
            if elem.tag.is_private:
                continue
            action = basic_action(int(elem.tag))
            if elem.VR == "SQ":
                # Everything inside a sequence the profile removes is removed with it: values
                # there are harvested, never counted as kept.
                gone = removed or (action is not None and resolve(action, "SQ") in ("X", "Z", "D"))
                for item in elem.value:
                    self._walk(item, gone, own, unlisted)
            elif elem.VR in ("OB", "OW", "UN"):
                continue
            elif not removed and elem.VR == "CS":
                self._kept.update(_values(elem))
            elif not removed and action is None and kind_of(elem) not in ("name", "date", "uid"):
                if is_checked_text(elem):
                    unlisted.append(elem)  # judged once the object's identity is known
                else:
                    self._kept.update(_values(elem))
            else:
                self._harvest(elem, action, removed)

    def _harvest(self, elem: DataElement, action: str | None, removed: bool) -> None:
        kind = kind_of(elem)
        if elem.VR == "CS":
            return
        if kind == "uid" and (action is None or "U" not in action):
            return  # class UIDs and transfer syntaxes are public constants
        if elem.VR == "TM":
            return  # a time of day alone identifies no one and collides with other numbers
        if kind not in ("name", "id", "date", "uid", "institution") and not removed:
            return
        for v in _values(elem):
            if v in DUMMY_VALUES or PSEUDONYM.match(v) or not any(c.isalnum() for c in v):
                continue
            candidates = [v]
            if kind == "name":
                candidates += name_parts(v)
            elif kind == "id":
                candidates += digit_cores(v)
            elif elem.VR in ("DA", "DT"):
                candidates += date_spellings(v)
            for c in candidates:
                if len(c) >= MIN_KNOWN_VALUE and not (c.isdigit() and len(c) < 6):
                    self._found.add(c)


# -- DICOM -----------------------------------------------------------------------------------------
class DicomChecker:
    def __init__(self, policy: SitePolicy):
        self.policy = policy
        self.options = frozenset(policy.deid.options)
        self.table = action_table(self.options)
        self.private_rule = PrivateTagRule.of(policy)

    def check(self, ds: Dataset, rel: str) -> list[Finding]:
        out: list[Finding] = []
        self._walk(ds, rel, "", out)
        if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
            out.append(Finding(rel, "PatientIdentityRemoved", "marker", "not YES"))
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            out.append(Finding(rel, "BurnedInAnnotation", "burned-in", "YES"))
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            for kw in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                       "PrivateInformation"):  # fmt: skip
                if meta.get(kw):
                    out.append(Finding(rel, f"file meta {kw}", "institution", "present"))
        return out

    def _walk(self, ds: Dataset, rel: str, prefix: str, out: list[Finding]) -> None:
        for elem in ds:
            where = f"{prefix}{elem.keyword or elem.tag}"
            if elem.tag.is_private:
                if elem.tag.is_private_creator:
                    continue
                if not self.private_rule.keeps(ds, elem):
                    out.append(Finding(rel, where, "private", f"private tag {elem.tag}"))
                    continue
            problem = self._problem(elem, _values(elem))
            if problem:
                out.append(Finding(rel, where, *problem))
            if elem.VR == "SQ":
                for n, item in enumerate(elem.value):
                    self._walk(item, rel, f"{where}[{n}].", out)

    def _problem(self, elem: DataElement, values: list[str]) -> tuple[str, str] | None:
        """(kind, masked hint) of what identifies in ``elem``, or None."""
        if not values:
            return None
        action = self.table.get(int(elem.tag)) or basic_action(int(elem.tag))
        vr = elem.VR
        kind = kind_of(elem)
        bad = [v for v in values if not _harmless_text(v)]
        if action is None:
            if is_checked_text(elem):
                return self._text_problem(elem, unlisted=True)
            if vr == "PN" and bad:
                return kind, mask(bad[0])
            if vr in ("DA", "DT") and not self._dates_allowed() and bad:
                return kind, mask(bad[0])
            if vr == "UI" and not is_class_uid(elem):
                return self._uid_problem(values)
            return None
        action = resolve(action, vr)
        if action in ("X", "Z", "D"):
            if vr == "UI":
                return self._uid_problem(values)
            return (kind, mask(bad[0])) if bad else None
        if action == "U":
            return self._uid_problem(values)
        if action == "C" and vr in CHECKED_TEXT_VRS:
            return self._text_problem(elem, unlisted=False)
        return None  # K; shifted dates cannot be told from others (the byte search can)

    def _text_problem(self, elem: DataElement, *, unlisted: bool) -> tuple[str, str] | None:
        """Text left in a cleaned or unlisted attribute: anything where the profile removes it,
        else a name, date, phone or record number, e-mail address or UID in it."""
        texts = [v for v in text_values(elem) if not _harmless_text(v)]
        if not texts:
            return None
        if unlisted and unlisted_text_action(elem, self.options) == "X":
            return kind_of(elem), mask(texts[0])
        if (elem.keyword or "") in CODED_KEYWORDS:
            return None
        for v in texts:
            found = phi_kind(v)
            if found:
                return found, mask(v)
        return None

    def _uid_problem(self, values: list[str]) -> tuple[str, str] | None:
        if "Retain UIDs" in self.options:
            return None
        for v in values:
            if not KEYED_UID.match(v):
                return "uid", "not remapped: " + mask(v)
        return None

    def _dates_allowed(self) -> bool:
        return self.policy.deid.shifts_dates or (
            "Retain Longitudinal Temporal Information Full Dates" in self.options
        )


# -- other file types ------------------------------------------------------------------------------
def _text_problems(text: str) -> list[str]:
    out = []
    if DATE_PATTERN.search(text):
        out.append("date")
    if (m := DICOM_UID_PATTERN.search(text)) and not KEYED_UID.match(m.group(0)):
        out.append("uid")
    if "^" in text:
        out.append("name")
    return out


def check_filename(rel: str) -> list[Finding]:
    out = []
    for part in Path(rel).parts:
        for suffix in (".gz", ".nii", ".dcm", ".json", ".jsonl"):
            part = part.removesuffix(suffix)
        kinds = _text_problems(part)
        # a run of digits that is neither a date nor a UID: a record number, an accession number
        if LONG_NUMBER.search(part) and not kinds:
            kinds.append("id")
        out.extend(Finding(rel, "file name", kind, mask(part)) for kind in kinds)
    return out


def check_nifti(path: Path, rel: str) -> list[Finding]:
    out = []
    try:
        img = nib.load(path)
        header = img.header
    except Exception as e:
        return [Finding(rel, "NIfTI", "unreadable", type(e).__name__)]
    for name in NIFTI_TEXT_FIELDS:
        if name in header:
            raw = header[name].tobytes().rstrip(b"\x00").strip()
            if raw:
                out.append(
                    Finding(rel, f"NIfTI {name}", "header text", mask(raw.decode("latin-1")))
                )
    extensions = getattr(header, "extensions", None)
    if extensions:
        out.append(
            Finding(rel, "NIfTI extensions", "header extension", f"{len(extensions)} present")
        )
    return out


def _harmless(value: object) -> bool:
    """Empty, a keyed pseudonym, a keyed UID, or a number: nothing a PHI-named field could leak."""
    if value in (None, "", [], {}) or isinstance(value, bool | int | float):
        return True
    return isinstance(value, str) and bool(PSEUDONYM.match(value) or KEYED_UID.match(value))


def check_json(path: Path, rel: str) -> list[Finding]:
    try:
        text = path.read_text(encoding="utf-8")
        records = (
            [json.loads(text)]
            if not path.name.endswith(".jsonl")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except (ValueError, UnicodeDecodeError) as e:
        return [Finding(rel, "JSON", "unreadable", type(e).__name__)]
    out: list[Finding] = []

    def visit(node: object, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if PHI_KEY.search(str(k)) and not _harmless(v):
                    out.append(Finding(rel, f"{where}.{k}", "json key", "identifying field"))
                visit(v, f"{where}.{k}")
        elif isinstance(node, list):
            for n, v in enumerate(node):
                visit(v, f"{where}[{n}]")
        elif isinstance(node, str):
            for kind in _text_problems(node):
                out.append(Finding(rel, where or "$", kind, mask(node)))

    for n, record in enumerate(records):
        visit(record, f"$[{n}]" if len(records) > 1 else "$")
    return out


def _without_pixel_data(data: bytes, pixels: bytes | None) -> bytes:
    """The file's bytes less the Pixel Data value: names are not searched for in pixels (burned-in
    text is handled by quarantine), and a megabyte of pixels costs more than everything else."""
    if not pixels:
        return data
    for tag in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"):
        start = data.rfind(pixels[:64])
        if start != -1 and data[start : start + len(pixels)] == pixels:
            header = data.rfind(tag, max(0, start - 16), start)
            if header != -1:
                return data[:header] + data[start + len(pixels) :]
    return data


def _gzip_header(data: bytes) -> bytes:
    """The member header of a gzip file: it may hold the original file name and a comment."""
    flags, at = (data[3], 10) if len(data) >= 10 else (0, len(data))
    if flags & 0x04:  # FEXTRA
        at += 2 + int.from_bytes(data[at : at + 2], "little")
    for flag in (0x08, 0x10):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            end = data.find(b"\x00", at)
            at = len(data) if end == -1 else end + 1
    return data[:at]


def _nifti_header(path: Path) -> bytes | None:
    """The bytes of a NIfTI/Analyze file before its voxels (header and extensions); None where
    that cannot be told (the whole file is searched then)."""
    name = path.name.lower()
    if name.endswith((".img", ".img.gz")):
        return b""  # the voxels of an Analyze pair; its .hdr is searched whole
    try:
        offset = int(nib.load(path).header.get_data_offset())
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
            return f.read(offset) if offset > 0 else f.read()
    except Exception:
        return None


def searchable_bytes(path: Path, pixels: bytes | None = None) -> list[bytes]:
    """Where a file can hold identifying text: all of it, less DICOM pixel data and NIfTI voxels
    (burned-in text is handled by quarantine; a case-blind search would find letters in a
    megabyte of intensities); of a gzip file, its member header and its decompressed content."""
    data = _without_pixel_data(path.read_bytes(), pixels)
    nifti = path.name.lower().endswith(NIFTI_SUFFIXES)
    header = _nifti_header(path) if nifti else None
    if data[:2] != b"\x1f\x8b":
        return [data if header is None else header]
    blobs = [_gzip_header(data)]
    if header is not None:
        blobs.append(header)
    else:
        with contextlib.suppress(OSError, EOFError, zlib.error):
            blobs.append(gzip.decompress(data))
    return blobs


def check_known_values(
    path: Path, rel: str, search: KnownValueSearch, pixels: bytes | None = None
) -> list[Finding]:
    """Byte-level search of :func:`searchable_bytes` and the file's path."""
    blobs = [*searchable_bytes(path, pixels), rel.encode("utf-8")]
    hits = {h for blob in blobs for h in search.find(blob)}
    return [Finding(rel, "file bytes", "known value", mask(h)) for h in sorted(hits)]


# -- the whole folder ------------------------------------------------------------------------------
def scan_path(
    root: Path,
    *,
    policy: SitePolicy = STRICT,
    known_values: Iterable[str] = (),
) -> list[Finding]:
    """Every finding in every file under ``root`` (or in the one file ``root``)."""
    root = Path(root)
    checker = DicomChecker(policy)
    needles = KnownValueSearch(known_values)
    findings: list[Finding] = []
    for path in iter_files(root):
        rel = path.name if root.is_file() else str(path.relative_to(root))
        findings.extend(check_filename(rel))
        name = path.name.lower()
        pixels = None
        if name.endswith(NIFTI_SUFFIXES):
            findings.extend(check_nifti(path, rel))
        elif name.endswith((".json", ".jsonl")):
            findings.extend(check_json(path, rel))
        else:
            try:
                ds = read_dicom(path)
            except NotDicom as e:
                if e.reason != "not a DICOM file":
                    findings.append(Finding(rel, "DICOM", "unreadable", e.reason))
            else:
                findings.extend(checker.check(ds, rel))
                value = ds.get("PixelData")
                pixels = value if isinstance(value, bytes) and len(value) > 4096 else None
        if needles:
            findings.extend(check_known_values(path, rel, needles, pixels))
    return findings
