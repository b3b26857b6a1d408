"""The PHI scanner: what identifying data survives in a folder the site is about to publish.

It checks DICOM (every attribute the Annex E profile covers, recursively, plus names, dates and
UIDs anywhere, private tags, burned-in annotation), NIfTI headers (descrip, aux_file, intent_name,
db_name, extensions), JSON (keys and values), file names, and, when given the identifying values
harvested from the input, a byte-level search of every file for each of them.

Findings never repeat the identifying value itself, so a report can be shared: they name the file,
the place and the kind of data, and show a masked hint.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from deid.dicom import DUMMY_VALUES, TEXT_VRS
from deid.files import NotDicom, iter_files, read_dicom
from deid.profile import PrivateTagRule, action_table, basic_action, is_class_uid, resolve
from policies.presets import STRICT
from policies.site import SitePolicy

PSEUDONYM = re.compile(r"^[a-z]-[a-z]{16}$")
KEYED_UID = re.compile(r"^2\.25\.\d{1,39}$")
# A calendar date as DICOM (YYYYMMDD) or ISO (YYYY-MM-DD) writes it, 1900-2099.
DATE_PATTERN = re.compile(r"(?<!\d)(?:19|20)\d\d-?(?:0[1-9]|1[0-2])-?(?:0[1-9]|[12]\d|3[01])(?!\d)")
DICOM_UID_PATTERN = re.compile(r"(?<![\d.])[012](?:\.(?:0|[1-9]\d*)){4,}(?![\d.])")
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


def kind_of(elem: DataElement) -> str:
    kw = elem.keyword or ""
    if elem.VR == "PN":
        return "name"
    if elem.VR in ("DA", "DT", "TM"):
        return "date"
    if elem.VR == "UI":
        return "uid"
    if elem.tag.is_private:
        return "private"
    if any(s in kw for s in ("Institution", "Station", "Department", "Address")):
        return "institution"
    if kw.endswith(("ID", "IDs", "Number", "Identifier", "Numbers")) or "Accession" in kw:
        return "id"
    if elem.VR in TEXT_VRS:
        return "descriptor"
    return "other"


def _values(elem: DataElement) -> list[str]:
    if elem.VR == "SQ" or elem.value is None:
        return []
    if elem.VR in ("OB", "OW", "UN", "OF", "OD", "OL", "OV"):
        return ["<binary>"] if elem.value else []
    values = elem.value if elem.VM > 1 else [elem.value]
    return [str(v).strip() for v in values if str(v).strip()]


# -- harvesting what must not survive --------------------------------------------------------------
class KnownValues:
    """The names, IDs, dates, instance UIDs and institution data of the input objects.

    Used for the byte-level search of outputs. Free-text descriptors and coded values (CS) are not
    harvested, nor values that any input also holds in attributes the profile keeps (a
    manufacturer entered as InstitutionName, a coding scheme called TEST): those would be found in
    every correct output. Purely numeric values under 6 digits collide with binary data.
    """

    def __init__(self) -> None:
        self._found: set[str] = set()
        self._kept: set[str] = set()

    def add(self, ds: Dataset) -> None:
        self._walk(ds, removed=False)

    @property
    def values(self) -> set[str]:
        kept = "\x00".join(self._kept)  # a value inside a kept one (OFFIS e.V. in its Manufacturer)
        return {v for v in self._found if v not in kept}

    def _walk(self, ds: Dataset, removed: bool) -> None:
        for elem in ds:
            if elem.tag.is_private:
                continue
            action = basic_action(int(elem.tag))
            if elem.VR == "SQ":
                # Everything inside a sequence the profile removes is removed with it: values
                # there are harvested, never counted as kept.
                gone = removed or (action is not None and resolve(action, "SQ") in ("X", "Z", "D"))
                for item in elem.value:
                    self._walk(item, gone)
            else:
                self._visit(elem, action, removed)

    def _visit(self, elem: DataElement, action: str | None, removed: bool) -> None:
        if elem.VR in ("OB", "OW", "UN"):
            return
        kind = kind_of(elem)
        if not removed and (
            elem.VR == "CS" or (action is None and kind not in ("name", "date", "uid"))
        ):
            self._kept.update(_values(elem))
            return
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
                candidates += [p.strip() for p in re.split(r"[\^=,]", v)]
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
            values = _values(elem)
            problem = self._problem(elem, values)
            if problem:
                out.append(Finding(rel, where, kind_of(elem), problem))
            if elem.VR == "SQ":
                for n, item in enumerate(elem.value):
                    self._walk(item, rel, f"{where}[{n}].", out)

    def _problem(self, elem: DataElement, values: list[str]) -> str | None:
        if not values:
            return None
        action = self.table.get(int(elem.tag)) or basic_action(int(elem.tag))
        vr = elem.VR
        bad = [v for v in values if not (v in DUMMY_VALUES or PSEUDONYM.match(v))]
        if action is None:
            if vr == "PN" and bad:
                return mask(bad[0])
            if vr in ("DA", "DT") and not self._dates_allowed() and bad:
                return mask(bad[0])
            if vr == "UI" and not is_class_uid(elem):
                return self._uid_problem(values)
            return None
        action = resolve(action, vr)
        if action in ("X", "Z", "D"):
            if vr == "UI":
                return self._uid_problem(values)
            return mask(bad[0]) if bad else None
        if action == "U":
            return self._uid_problem(values)
        if action == "C":
            if vr in ("DA", "DT", "TM"):
                return None  # shifted dates cannot be told from others; the byte search can
            for v in values:
                if "^" in v or DATE_PATTERN.search(v) or LONG_NUMBER.search(v):
                    return mask(v)
        return None

    def _uid_problem(self, values: list[str]) -> str | None:
        if "Retain UIDs" in self.options:
            return None
        for v in values:
            if not KEYED_UID.match(v):
                return "not remapped: " + mask(v)
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


_EDGE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


class KnownValueSearch:
    """Find whole-token occurrences of known values in bytes: MARY must not match in PRIMARY.

    One ``bytes.find`` per value (memchr speed) beats one alternation regex, which backtracks at
    every position of a megabyte of pixel data.
    """

    def __init__(self, values: Iterable[str]):
        self.needles = sorted({v.encode("utf-8") for v in values if len(v) >= MIN_KNOWN_VALUE})

    def __bool__(self) -> bool:
        return bool(self.needles)

    def find(self, blob: bytes) -> list[bytes]:
        hits = []
        for needle in self.needles:
            start = blob.find(needle)
            while start != -1:
                end = start + len(needle)
                before = blob[start - 1] if start > 0 else None
                after = blob[end] if end < len(blob) else None
                if before not in _EDGE and after not in _EDGE:
                    hits.append(needle)
                    break
                start = blob.find(needle, start + 1)
        return hits


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


def check_known_values(
    path: Path, rel: str, search: KnownValueSearch, pixels: bytes | None = None
) -> list[Finding]:
    """Byte-level search; gzip files are searched both as stored and decompressed."""
    data = _without_pixel_data(path.read_bytes(), pixels)
    blobs = [data, rel.encode("utf-8")]
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError):
            blobs.append(gzip.decompress(data))
    hits = {h for blob in blobs for h in search.find(blob)}
    return [
        Finding(rel, "file bytes", "known value", mask(h.decode("utf-8", "replace")))
        for h in sorted(hits)
    ]


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
