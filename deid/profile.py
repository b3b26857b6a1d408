"""Resolve the PS3.15 Annex E action for an attribute under a policy's options."""

from __future__ import annotations

from functools import lru_cache

from deid.annex_e_table import BASIC_PROFILE, BASIC_PROFILE_MASKED, OPTION_ACTIONS

# Options whose table column is applied as an override of the Basic action. "Clean Pixel Data",
# "Clean Recognizable Visual Features" and "Retain Safe Private" act on pixels and private tags and
# are handled where those are.
_COLUMN_OPTIONS = tuple(OPTION_ACTIONS)


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
