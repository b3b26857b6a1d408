"""What identifying data looks like in text, and how the input's own values are found again.

Shared by de-identification (:mod:`deid.dicom` keeps an attribute the Annex E table does not list
only when nothing in it looks identifying) and the PHI scanner (:mod:`deid.scan` flags the same
patterns in every text attribute and searches outputs for the input's values). Both sides use the
same rules, so whatever the scanner would flag, de-identification has already removed.

Two kinds of evidence:

- **patterns** that identify in any object: dates (DICOM, ISO, European, US and month-name
  spellings), phone numbers, record numbers (``MRN 1677161``, ``NHS123456789``, a bare run of 6+
  digits), e-mail addresses, DICOM person names (``^``) and instance UIDs;
- **known values**: the names, IDs and institution data of the object or the input, found again in
  any case, inside longer words, and by the digit core of an ID (``1677161`` of ``MRN1677161``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

# Text VRs: the first three hold free text of any length, the others short strings.
FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
CHECKED_TEXT_VRS = FREE_TEXT_VRS | {"LO", "SH", "UC"}
TEXT_VRS = CHECKED_TEXT_VRS | {"PN"}
# Codes from a coding scheme (SNOMED 76752008, UMLS C0018787, DCM 113100): digits by design, never
# matched against the patterns (the known-value search still covers them).
CODED_KEYWORDS = frozenset({
    "CodeValue", "LongCodeValue", "URNCodeValue", "CodingSchemeDesignator",
    "CodingSchemeVersion", "ContextIdentifier", "MappingResource",
})  # fmt: skip
KEYED_UID = re.compile(r"^2\.25\.\d{1,39}$")
DICOM_UID_PATTERN = re.compile(r"(?<![\d.])[012](?:\.(?:0|[1-9]\d*)){4,}(?![\d.])")
MIN_DIGIT_CORE = 6  # shorter digit runs collide with counts, sizes and binary data

_YEAR = r"(?:19|20)\d\d"
_MM = r"(?:0?[1-9]|1[0-2])"
_DD = r"(?:0?[1-9]|[12]\d|3[01])"
_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
# A calendar date as DICOM (YYYYMMDD) or ISO (YYYY-MM-DD) writes it, 1900-2099.
DATE_DIGITS = re.compile(rf"(?<!\d){_YEAR}-?(?:0[1-9]|1[0-2])-?(?:0[1-9]|[12]\d|3[01])(?!\d)")
_RECORD_LABEL = (  # what precedes a record number in notes: MRN, MR#, patient ID, NHS no, ...
    r"mrn|mr\s?#|mr\s?no\b\.?|med(?:ical)?\s?rec(?:ord)?s?(?:\s?(?:no|number|#))?|patient\s?id"
    r"|pat\s?id|pid|hosp(?:ital)?\s?(?:no|number|#)|nhs(?:\s?(?:no|number))?|chart\s?(?:no|number|#)"
    r"|case\s?(?:no|number|#)|acc(?:ession)?\s?(?:no|number|#)?"
)
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("email", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    # dates: 19610714, 1961-07-14, 1961/07/14, 14.07.1961, 07/14/1961, 14/07/61, 07/14/61,
    # 14 Jul 1961, 14-JUL-61, July 14, 1961, July 1961
    ("date", DATE_DIGITS),
    ("date", re.compile(rf"(?<!\d){_YEAR}([/.]){_MM}\1{_DD}(?!\d)")),
    ("date", re.compile(rf"(?<![\d.]){_DD}([-/.]){_MM}\1{_YEAR}(?!\d)")),
    ("date", re.compile(rf"(?<![\d.]){_MM}([-/.]){_DD}\1{_YEAR}(?!\d)")),
    ("date", re.compile(rf"(?<![\d/]){_DD}/{_MM}/\d\d(?![\d/])")),
    ("date", re.compile(rf"(?<![\d/]){_MM}/{_DD}/\d\d(?![\d/])")),
    ("date", re.compile(
        rf"(?i)\b{_DD}(?:st|nd|rd|th)?[ -]{_MONTH}\.?,?[ -](?:{_YEAR}|'?\d\d)\b")),
    ("date", re.compile(rf"(?i)\b{_MONTH}\.? {_DD}(?:st|nd|rd|th)?,? {_YEAR}\b")),
    ("date", re.compile(rf"(?i)\b{_MONTH}\.?,? {_YEAR}\b")),
    # phones: 555-0172, +1-555-123-4567, (555) 123-4567, +44 20 7946 0958, tel. 020 7946 0958
    ("phone", re.compile(
        r"(?<![\w.+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?|\d{2,5}[ .-])?\d{3,4}-\d{4}"
        r"(?![\w]|[.-]\d)")),
    ("phone", re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,5}(?![\w])")),
    ("phone", re.compile(
        r"(?i)\b(?:tel|phone|ph|mob(?:ile)?|cell|fax)\b\.?:?\s*[+(]?\d[\d ()./-]{5,}\d")),
    # record numbers: MRN 1677161, patient ID: A12345, ACC12345678, a bare 1677161 (not the
    # fraction of 0.1677161)
    ("id", re.compile(
        rf"(?i)(?<![a-z])(?:{_RECORD_LABEL})\s*[:#.=-]?\s*(?:no\.?\s*)?[a-z]{{0,3}}\d{{4,}}")),
    ("id", re.compile(rf"(?<![A-Za-z0-9])[A-Za-z]{{1,4}}[-_]?\d{{{MIN_DIGIT_CORE},}}(?!\d)")),
    ("id", re.compile(rf"(?<!\d)(?<!\d\.)\d{{{MIN_DIGIT_CORE},}}(?!\d|\.\d)")),
]  # fmt: skip


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _uids(text: str) -> list[re.Match[str]]:
    """Instance UIDs in text: not the standard's own UIDs, not our keyed ones."""
    return [
        m
        for m in DICOM_UID_PATTERN.finditer(text)
        if m.group(0) not in UID_dictionary and not KEYED_UID.match(m.group(0))
    ]


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


def _matches(text: str) -> list[tuple[str, re.Match[str]]]:
    if "@" not in text and not _digits(text):
        return []  # every pattern but e-mail holds a digit: most text is done here
    found = [("uid", m) for m in _uids(text)]
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(text):
            # a phone number has 7 digits or more: "+12 34" or "30-45" are not one
            if kind != "phone" or _digits(m.group(0)) >= 7:
                found.append((kind, m))
    return found


def phi_kind(text: str) -> str | None:
    """What identifying pattern ``text`` holds (name, email, date, phone, id, uid: the first of
    these that matches), or None."""
    if "^" in text:
        return "name"
    if "@" not in text and not _digits(text):
        return None
    for kind, pattern in _PATTERNS:  # in the order of the kinds above
        if any(kind != "phone" or _digits(m.group(0)) >= 7 for m in pattern.finditer(text)):
            return kind
    return "uid" if _uids(text) else None


def strip_phi(text: str) -> str:
    """``text`` with every identifying pattern cut out."""
    spans = sorted((m.start(), m.end()) for _, m in _matches(text))
    if not spans:
        return text
    out, at = [], 0
    for start, end in spans:
        if start >= at:
            out.append(text[at:start])
        at = max(at, end)
    out.append(text[at:])
    return " ".join(out)


def text_values(elem: DataElement) -> list[str]:
    """The text an element holds: its values for text VRs, and the bytes of an element of unknown
    VR (a private tag read without its dictionary) when they decode to printable text."""
    if elem.value is None:
        return []
    if elem.VR in TEXT_VRS:
        values = elem.value if elem.VM > 1 else [elem.value]
        return [_text(v) for v in values if _text(v)]
    if elem.VR == "UN" and isinstance(elem.value, bytes):
        text = elem.value.decode("latin-1").strip("\x00 ")
        if text and text.isprintable():
            return [v.strip() for v in text.split("\\") if v.strip()]
    return []


def kind_of(elem: DataElement) -> str:
    """What identity an element's keyword and VR say it holds."""
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


def name_parts(value: str) -> list[str]:
    """The components of a person name, ``DOE^JANE`` or ``Doe, Jane``."""
    return [p.strip() for p in re.split(r"[\^=,]", value) if p.strip()]


def digit_cores(value: str) -> list[str]:
    """The long digit runs of an ID (``1677161`` of ``MRN1677161``), which may be written apart
    from its letters."""
    return [run for run in re.findall(r"\d+", value) if len(run) >= MIN_DIGIT_CORE]


def date_spellings(value: str) -> list[str]:
    """Other ways of writing a DICOM date: 1961-07-14, 14.07.1961, 14/07/1961, 07/14/1961."""
    try:
        day = dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return []
    return [day.strftime(f) for f in ("%Y-%m-%d", "%d.%m.%Y", "%d/%m/%Y", "%m/%d/%Y")]


def element_identity(elem: DataElement) -> list[str]:
    """What in one element identifies: a person name whole and in parts, an ID whole and by its
    digit cores, institution data (names, addresses, stations, departments)."""
    if elem.VR not in TEXT_VRS or (elem.tag.is_private and elem.VR != "PN"):
        return []
    kind = kind_of(elem)
    out: list[str] = []
    for v in text_values(elem):
        if kind == "name":
            out += [v, *name_parts(v)]
        elif kind == "id":
            out += [v, *digit_cores(v)]
        elif kind == "institution":
            out.append(v)
    return out


def identifying_values(ds: Dataset) -> set[str]:
    """This object's identity (:func:`element_identity`) at any depth: what its text must not
    hold."""
    found: set[str] = set()
    ds.walk(lambda _, elem: found.update(element_identity(elem)))
    return found


# -- finding known values again --------------------------------------------------------------------
_DIGIT = frozenset(b"0123456789")
_UPPER = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LOWER = frozenset(b"abcdefghijklmnopqrstuvwxyz")
_LETTER = _UPPER | _LOWER | frozenset(range(0x80, 0x100))  # non-ASCII bytes: parts of letters
ANYWHERE_LENGTH = 6  # values this long (with a letter in them) are found inside any word


def _joined(blob: bytes, left: int, right: int) -> bool:
    """Whether the bytes at ``left`` and ``right`` (neighbours) belong to one word: two digits of
    one number (also across a decimal point), or two letters without a lower-to-upper case step
    (``PRIMARY`` is one word, ``DorotheaMbeki`` two)."""
    if left < 0 or right >= len(blob):
        return False
    a, b = blob[left], blob[right]
    if a in _DIGIT and b in _DIGIT:
        return True
    if a in _LETTER and b in _LETTER:
        return not (a in _LOWER and b in _UPPER)
    if a == 0x2E:  # "." between digits: a decimal fraction or a UID, one number
        return b in _DIGIT and left > 0 and blob[left - 1] in _DIGIT
    if b == 0x2E:
        return a in _DIGIT and right + 1 < len(blob) and blob[right + 1] in _DIGIT
    return False


class KnownValueSearch:
    """Find known values in bytes, in any case and encoding (UTF-8, Latin-1).

    A value of 6 or more characters with a letter in it is found anywhere, inside any word. A
    shorter one, or one made of digits (an ID's digit core, a date, a UID), is found where it does
    not continue a word or number of the text: MARY is found in ``MARY-ANNE``, ``mary_2`` and
    ``AnnaMary``, not in ``PRIMARY``; 1677161 in ``MRN1677161``, not in ``216771612`` or
    ``0.1677161``.

    One ``bytes.find`` per value (memchr speed) beats one alternation regex, which backtracks at
    every position of a megabyte of pixel data.
    """

    def __init__(self, values: Iterable[str], *, min_length: int = 4):
        self._needles: dict[bytes, tuple[str, bool]] = {}
        for value in sorted(set(values)):
            if len(value) < min_length:
                continue
            anywhere = len(value) >= ANYWHERE_LENGTH and any(c.isalpha() for c in value)
            for spelling in (value, value.lower(), value.upper()):
                for encoding in ("utf-8", "latin-1"):
                    try:
                        needle = spelling.encode(encoding).lower()
                    except UnicodeEncodeError:
                        continue
                    self._needles.setdefault(needle, (value, anywhere))

    def __bool__(self) -> bool:
        return bool(self._needles)

    def find(self, blob: bytes) -> list[str]:
        """The known values found in ``blob``, sorted."""
        low = blob.lower()
        hits: set[str] = set()
        for needle, (value, anywhere) in self._needles.items():
            if value in hits:
                continue
            start = low.find(needle)
            while start != -1:
                end = start + len(needle)
                if anywhere or not (_joined(blob, start - 1, start) or _joined(blob, end - 1, end)):
                    hits.add(value)
                    break
                start = low.find(needle, start + 1)
        return sorted(hits)

    def in_text(self, text: str) -> list[str]:
        return self.find(text.encode("utf-8"))


def identifying_text(elem: DataElement, values: list[str], own: KnownValueSearch) -> str | None:
    """Why the text of ``elem`` identifies someone (a pattern's kind, or ``known value`` when it
    holds one of the object's own names, IDs or institution values), or None."""
    coded = (elem.keyword or "") in CODED_KEYWORDS
    for v in values:
        kind = None if coded else phi_kind(v)
        if kind is None and own.in_text(v):
            kind = "known value"
        if kind is not None:
            return kind
    return None


__all__ = [
    "CHECKED_TEXT_VRS",
    "FREE_TEXT_VRS",
    "TEXT_VRS",
    "KnownValueSearch",
    "date_spellings",
    "digit_cores",
    "element_identity",
    "identifying_text",
    "identifying_values",
    "kind_of",
    "name_parts",
    "phi_kind",
    "strip_phi",
    "text_values",
]
