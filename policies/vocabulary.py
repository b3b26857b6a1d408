"""A label vocabulary: label value -> name, shared by site and federation policies.

The default, ``BREAST_MRI_LABELS``, is the one the phantoms draw; it is defined in the
dependency-free ``lsdm.labels`` (the one import of lsdm that policies may make besides
``lsdm.errors``).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

from lsdm.labels import BREAST_MRI_LABELS

__all__ = ["BREAST_MRI_LABELS", "LabelVocabulary", "validate_vocabulary"]

LabelVocabulary = Annotated[
    dict[int, str], Field(description="label value -> name; 0 is background")
]
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def validate_vocabulary(vocabulary: dict[int, str]) -> dict[int, str]:
    if vocabulary.get(0) != "background":
        raise ValueError("label 0 must be named 'background'")
    if any(not 0 <= v <= 255 for v in vocabulary):
        raise ValueError("label values must lie in 0..255 (they are stored as uint8)")
    bad = [n for n in vocabulary.values() if not _NAME.match(n)]
    if bad:
        raise ValueError(f"label names must be lowercase identifiers: {bad}")
    if len(set(vocabulary.values())) != len(vocabulary):
        raise ValueError("two labels share a name")
    return dict(sorted(vocabulary.items()))
