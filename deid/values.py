"""What de-identification does to single values: the text of a value, dates shifted by a keyed
offset, free text cleaned of the object's own identifiers, age kept as a 5-year band. Used by the
clean (C) action and the retained patient characteristics of :mod:`deid.dicom`."""

from __future__ import annotations

import datetime as dt
import re

from pydicom.dataset import Dataset

from deid.phi import strip_phi

_DATE8 = re.compile(r"^(\d{8})(.*)$")
_WORD = re.compile(r"[A-Za-z0-9]+")
_LONG_NUMBER = re.compile(r"\d{4,}")


def as_text(value: object) -> str:
    """A DICOM value as stripped text; None as empty."""
    return "" if value is None else str(value).strip()


def identifier_words(values: set[str]) -> frozenset[str]:
    """The words (2 characters or more, lower case) of an object's names, IDs and institution
    data (:func:`deid.phi.identifying_values`), to scrub from descriptors word by word."""
    return frozenset(w.lower() for v in values for w in _WORD.findall(v) if len(w) >= 2)


def shift_date(value: str, days: int) -> str:
    """A DA/DT value (or DA range) ``days`` earlier; a date that cannot be read becomes empty."""
    m = _DATE8.match(value)
    if not m:
        return ""  # partial or malformed dates cannot be shifted safely: removed
    try:
        day = dt.datetime.strptime(m.group(1), "%Y%m%d").date()
    except ValueError:
        return ""
    rest = m.group(2)
    if rest.startswith("-") and len(rest) >= 9:  # a DA range: shift both ends
        rest = "-" + shift_date(rest[1:9], days) + rest[9:]
    return (day - dt.timedelta(days=days)).strftime("%Y%m%d") + rest


def age_in_years(ds: Dataset) -> float | None:
    """PatientAge (AS), or birth date to study date; None if neither is usable."""
    age = as_text(ds.get("PatientAge"))
    m = re.fullmatch(r"(\d{3})([DWMY])", age)
    if m:
        n = int(m.group(1))
        return n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[m.group(2)]
    birth = as_text(ds.get("PatientBirthDate"))
    when = (
        as_text(ds.get("StudyDate"))
        or as_text(ds.get("SeriesDate"))
        or as_text(ds.get("ContentDate"))
    )
    try:
        b = dt.datetime.strptime(birth[:8], "%Y%m%d")
        w = dt.datetime.strptime(when[:8], "%Y%m%d")
    except ValueError:
        return None
    years = (w - b).days / 365.25
    return years if years >= 0 else None


def age_band(years: float) -> int:
    """Start of the 5-year band; 90 and over are pooled (HIPAA Safe Harbor)."""
    return 90 if years >= 90 else int(years // 5) * 5


def clean_text(text: str, identifiers: frozenset[str]) -> str:
    """Keep the words of a descriptor that are not identifiers, dates, phone or record numbers,
    e-mail addresses, UIDs or long numbers."""
    if "^" in text:  # a person name in DICOM notation: nothing in it is a descriptor
        return ""
    kept = []
    for token in re.split(r"(\s+)", strip_phi(text)):
        words = {w.lower() for w in _WORD.findall(token)}
        if words & identifiers or _LONG_NUMBER.search(token):
            continue
        kept.append(token)
    return re.sub(r"\s+", " ", "".join(kept)).strip()
