"""Bundled policies. ``strict`` is the default everywhere a policy is optional."""

from __future__ import annotations

from policies.federation import FederationPolicy
from policies.site import CropPolicy, DeidPolicy, DPSettings, RetainPolicy, SitePolicy

STRICT = SitePolicy(
    name="strict",
    description=(
        "Basic profile with no options: every date, name, ID, descriptor and private tag goes, "
        "every UID is remapped, no patient characteristic is kept, volumes are cropped to the "
        "labelled anatomy, training uses differential privacy."
    ),
    deid=DeidPolicy(options=[]),
    retain=RetainPolicy(age="none", sex=False),
    crop=CropPolicy(mode="labelled", margin_voxels=4),
    dp=DPSettings(enabled=True, target_epsilon=8.0),
)

RESEARCH = SitePolicy(
    name="research",
    description=(
        "For an IRB-approved study: Basic profile plus keyed per-patient date shifting (intervals "
        "between a patient's scans survive), cleaned descriptors and structured content, sex and "
        "age in 5-year bands; volumes are not cropped."
    ),
    deid=DeidPolicy(
        options=[
            "Retain Longitudinal Temporal Information Modified Dates",
            "Clean Descriptors",
            "Clean Structured Content",
            "Retain Patient Characteristics",
        ]
    ),
    retain=RetainPolicy(age="5y-bands", sex=True),
    crop=CropPolicy(mode="none", margin_voxels=0),
    dp=DPSettings(enabled=True, target_epsilon=10.0),
)

FEDERATION_DEFAULT = FederationPolicy(
    name="default",
    description="Breast MRI vocabulary, reference model, DP required, at least two sites.",
)

SITE_PRESETS: dict[str, SitePolicy] = {"strict": STRICT, "research": RESEARCH}
FEDERATION_PRESETS: dict[str, FederationPolicy] = {"federation": FEDERATION_DEFAULT}
DEFAULT_SITE_POLICY = "strict"
