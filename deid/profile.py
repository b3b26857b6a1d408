"""The PS3.15 Annex E rules that de-identification (``deid.dicom``) and the PHI scan
(``deid.scan``) share: the action for an attribute under a policy's options, which private elements
a policy keeps, and which UIDs name a class rather than an instance."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

from deid.annex_e_table import BASIC_PROFILE, BASIC_PROFILE_MASKED, OPTION_ACTIONS
from deid.phi import CHECKED_TEXT_VRS, FREE_TEXT_VRS, kind_of
from deid.values import as_text
from policies.site import SitePolicy

# Options whose table column is applied as an override of the Basic action. "Clean Pixel Data",
# "Clean Recognizable Visual Features" and "Retain Safe Private" act on pixels and private tags and
# are handled where those are.
_COLUMN_OPTIONS = tuple(OPTION_ACTIONS)
# Unlisted UIDs that name a class, syntax or scheme rather than an instance: kept as they are.
_KEEP_UID_KEYWORD = re.compile(r"(ClassUID|TransferSyntaxUID|CodingSchemeUID|ContextUID)$")
# Unlisted text attributes whose name says they are about a person, a date or a contact
# (PatientBirthDateInAlternativeCalendar, PersonTelephoneNumbers in a new macro, ...).
_PERSONAL_KEYWORD = re.compile(r"Patient|Birth|Death|Person|Physician|Operator|Address|Telephone|"
                               r"Email|Date")  # fmt: skip


def basic_action(tag: int) -> str | None:
    action = BASIC_PROFILE.get(tag)
    if action is not None:
        return action
    for value, mask, masked_action in BASIC_PROFILE_MASKED:
        if tag & mask == value:
            return masked_action
    return None


@lru_cache(maxsize=64)
def action_table(options: frozenset[str]) -> dict[int, str]:
    """Tag -> action for every listed attribute, with the enabled options' columns applied."""
    table = dict(BASIC_PROFILE)
    for option in _COLUMN_OPTIONS:
        if option in options:
            table.update(OPTION_ACTIONS[option])
    return table


def resolve(action: str, vr: str) -> str:
    """Reduce a compound code (X/Z, Z/D, X/D, X/Z/D, X/Z/U*) to one of D, Z, X, K, C, U.

    Without IOD module tables we cannot know whether an attribute is Type 1, 2 or 3 in the object
    at hand, so each compound picks the choice that is valid for every type: a dummy (a constant
    that identifies no one) wherever D is allowed, since it keeps a Type 1 attribute valid; a
    zero-length value for X/Z, which keeps a Type 2 attribute present. Sequences under X/Z/U* are
    kept so their references survive, with the UIDs inside remapped.
    """
    if action == "X/Z/U*":
        return "U" if vr == "UI" else ("K" if vr == "SQ" else "Z")
    if action == "X/Z":
        return "Z"
    if action in ("Z/D", "X/D", "X/Z/D"):
        return "D"
    return action


def unlisted_text_action(elem: DataElement, options: frozenset[str]) -> str:
    """What happens to a text attribute (LO, SH, UC, LT, ST, UT, or a kept private element) that
    the Annex E table does not list: ``X`` removed, or ``C`` checked and emptied when anything in
    it looks identifying (:func:`deid.phi.identifying_text`). Never kept unchecked.

    Removed under every policy: attributes named for a person, date or contact, and IDs and
    institution data. Free text (LT, ST, UT) is removed too unless the policy cleans descriptors.
    """
    if not elem.tag.is_private and (
        _PERSONAL_KEYWORD.search(elem.keyword or "") or kind_of(elem) in ("id", "institution")
    ):
        return "X"
    if elem.VR in FREE_TEXT_VRS and "Clean Descriptors" not in options:
        return "X"
    return "C"


def is_checked_text(elem: DataElement) -> bool:
    """Whether ``elem`` is text that :func:`unlisted_text_action` governs when it is unlisted."""
    return elem.VR in CHECKED_TEXT_VRS or (elem.VR == "UN" and elem.tag.is_private)


def is_class_uid(elem: DataElement) -> bool:
    """True for a UID element that names a class, transfer syntax or coding scheme (kept as it is),
    by its keyword or because every value is a UID of the standard; false for instance UIDs."""
    kw = elem.keyword or keyword_for_tag(elem.tag) or ""
    if _KEEP_UID_KEYWORD.search(kw):
        return True
    values = elem.value if elem.VM > 1 else [elem.value]
    return all(as_text(v) in UID_dictionary for v in values if as_text(v))


@dataclass(frozen=True)
class PrivateTagRule:
    """Which private elements a policy keeps: only under Retain Safe Private, and only those the
    site listed as safe, matched by (group, private creator, element within the block)."""

    safe: frozenset[tuple[int, str, int]]

    @classmethod
    def of(cls, policy: SitePolicy) -> PrivateTagRule:
        if not policy.deid.has("Retain Safe Private"):
            return cls(frozenset())
        tags = policy.deid.safe_private_tags
        return cls(frozenset((t.group, t.creator.strip(), t.element) for t in tags))

    def keeps(self, ds: Dataset, elem: DataElement) -> bool:
        """Whether private element ``elem`` of ``ds`` (not a creator element) is kept."""
        if not self.safe:
            return False
        tag = elem.tag
        creator_tag = (tag.group << 16) | (tag.element >> 8)
        if creator_tag not in ds:
            return False
        creator = as_text(ds[creator_tag].value)
        return (tag.group, creator, tag.element & 0xFF) in self.safe
