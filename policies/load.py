"""Read a policy from a preset name or a YAML/JSON/TOML file, with one message per problem."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import yaml
from pydantic import ValidationError

from lsdm.errors import InputError
from policies.federation import FederationPolicy
from policies.presets import FEDERATION_PRESETS, SITE_PRESETS
from policies.site import SitePolicy

Policy = SitePolicy | FederationPolicy


class PolicyError(InputError):
    """A policy that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(
            str(path),
            [f"no such file (and not a preset: {', '.join([*SITE_PRESETS, *FEDERATION_PRESETS])})"],
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(str(path), [f"cannot read: {e}"]) from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        elif path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PolicyError(
            str(path), [f"not valid {path.suffix.lstrip('.') or 'YAML'}: {first}"]
        ) from None
    if not isinstance(data, dict):
        raise PolicyError(str(path), ["a policy must be a mapping of fields"])
    return data


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "policy"
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{where}: {msg}")
    return out


def parse_policy(data: dict, source: str = "<policy>") -> Policy:
    kind = data.get("kind", "site")
    model = {"site": SitePolicy, "federation": FederationPolicy}.get(kind)
    if model is None:
        raise PolicyError(source, [f"kind: must be 'site' or 'federation', not {kind!r}"])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise PolicyError(source, _problems(e)) from None


def load_policy(ref: str | Path) -> Policy:
    """A preset name (``strict``, ``research``, ``federation``) or a path to a policy file."""
    ref_s = str(ref)
    if ref_s in SITE_PRESETS:
        return SITE_PRESETS[ref_s]
    if ref_s in FEDERATION_PRESETS:
        return FEDERATION_PRESETS[ref_s]
    path = Path(ref_s).expanduser()
    return parse_policy(_read_mapping(path), str(path))


def load_site_policy(ref: str | Path) -> SitePolicy:
    policy = load_policy(ref)
    if not isinstance(policy, SitePolicy):
        raise PolicyError(str(ref), ["this is a federation policy; a site policy is needed here"])
    return policy


def policy_to_yaml(policy: Policy) -> str:
    return yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
