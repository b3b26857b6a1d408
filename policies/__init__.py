"""Site and federation policies: pydantic schemas, bundled presets, loading with clear errors."""

from policies.federation import FederationPolicy
from policies.load import PolicyError, load_policy, load_site_policy, parse_policy, policy_to_yaml
from policies.presets import DEFAULT_SITE_POLICY, FEDERATION_PRESETS, SITE_PRESETS
from policies.site import CID7050, DeidPolicy, SitePolicy

__all__ = [
    "CID7050",
    "DEFAULT_SITE_POLICY",
    "FEDERATION_PRESETS",
    "SITE_PRESETS",
    "DeidPolicy",
    "FederationPolicy",
    "PolicyError",
    "SitePolicy",
    "load_policy",
    "load_site_policy",
    "parse_policy",
    "policy_to_yaml",
]
