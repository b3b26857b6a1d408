"""The coordinator folder and its settings.

``lsdm-server init DIR`` makes::

    DIR/coordinator.yaml     settings of this coordinator (CoordinatorSettings)
    DIR/federation.yaml      the federation policy every site agrees to
    DIR/tls/                 ca.pem (give to sites), ca.key, server.pem, server.key
    DIR/signing.key          Ed25519 key for signing generator bundles (+ signing.pub.pem)
    DIR/sites/NAME.pub       registered site keys (``lsdm-server register``)
    DIR/app/pyproject.toml   the Flower app: no code, only references to installed modules
    DIR/state/               the SuperLink database, the run log, checkpoints, kept updates
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lsdm.atomic import atomic_path, atomic_write_text, staged_directory
from lsdm.errors import InputError
from lsdm.phases import per_phase_setting
from policies import FederationPolicy, load_policy, policy_to_yaml

# VQ-GAN (phase 1) and diffusion (phase 2) training steps a site runs per round: 20 each.
LocalSteps = per_phase_setting(
    vqgan=20, diffusion=20, minimum=1, description="training steps a site runs per round"
)


class CoordinatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hosts: list[str] = Field(min_length=1, description="names/addresses in the server certificate")
    local_steps: LocalSteps
    max_update_norm: float = Field(
        100.0, gt=0, description="largest L2 norm of a site's change to the shared weights"
    )
    shape: tuple[int, int, int] | None = Field(
        None, description="(D, H, W) volumes are cropped or padded to; default: the preset's"
    )
    round_timeout_s: float = Field(900.0, gt=0, description="how long a round waits for sites")
    wait_for_sites_s: float = Field(600.0, gt=0, description="how long to wait for min_sites")
    all_sites_grace_s: float = Field(
        30.0, ge=0, description="how long a round waits for registered sites beyond min_sites"
    )
    keep_updates: bool = Field(
        False, description="keep every accepted site update on disk (for audits and tests)"
    )
    seed: int = 0


APP_PYPROJECT = """\
# The Med-LSDM Flower app. It carries no code: both components are modules of the installed
# med-lsdm package, so a site runs what it installed, never what it is sent.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "med-lsdm-federation"
version = "1.0.0"
description = "Med-LSDM federated training (components come from the installed package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "med-lsdm"

[tool.flwr.app.components]
serverapp = "server.server_app:app"
clientapp = "node.client_app:app"

[tool.flwr.app.config]
coordinator-dir = ""
resume = false
"""


class Coordinator:
    """Paths inside a coordinator folder."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    settings_file = property(lambda self: self.root / "coordinator.yaml")
    policy_file = property(lambda self: self.root / "federation.yaml")
    tls = property(lambda self: self.root / "tls")
    ca = property(lambda self: self.tls / "ca.pem")
    signing_key = property(lambda self: self.root / "signing.key")
    sites = property(lambda self: self.root / "sites")
    app = property(lambda self: self.root / "app")
    state = property(lambda self: self.root / "state")
    database = property(lambda self: self.state / "superlink.db")
    checkpoint = property(lambda self: self.state / "federation.safetensors")
    round_log = property(lambda self: self.state / "rounds.jsonl")
    updates = property(lambda self: self.state / "updates")
    flwr_home = property(lambda self: self.state / "flwr-home")

    def check(self) -> None:
        if not self.settings_file.is_file():
            raise InputError(f"not a coordinator folder (run lsdm-server init): {self.root}")

    def settings(self) -> CoordinatorSettings:
        self.check()
        try:
            return CoordinatorSettings.model_validate(
                yaml.safe_load(self.settings_file.read_text())
            )
        except (ValidationError, yaml.YAMLError, TypeError) as e:
            first = str(e).strip().splitlines()[0]
            raise InputError(f"{self.settings_file}: {first}") from None

    def policy(self) -> FederationPolicy:
        self.check()
        policy = load_policy(self.policy_file)  # a PolicyError is an InputError
        if not isinstance(policy, FederationPolicy):
            raise InputError(f"{self.policy_file}: not a federation policy")
        return policy

    def registered_sites(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.sites.glob("*.pub"))}

    def rounds(self) -> list[dict]:
        if not self.round_log.is_file():
            return []
        return [json.loads(line) for line in self.round_log.read_text().splitlines() if line]


def init_coordinator(
    folder: Path, federation: FederationPolicy, settings: CoordinatorSettings
) -> Coordinator:
    """Make a coordinator folder (``lsdm-server init``): CA and server certificate for
    ``settings.hosts``, signing key, the federation policy, the settings, the code-free Flower app.
    ``folder`` must not exist or be empty; it appears complete or not at all."""
    from server.pki import make_signing_key, make_tls

    with staged_directory(folder) as stage:
        make_tls(stage / "tls", federation.name, settings.hosts)
        make_signing_key(stage / "signing.key")
        atomic_write_text(stage / "federation.yaml", policy_to_yaml(federation))
        atomic_write_text(
            stage / "coordinator.yaml",
            yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False),
        )
        atomic_write_text(stage / "app" / "pyproject.toml", APP_PYPROJECT)
        (stage / "sites").mkdir()
        (stage / "state").mkdir()
    return Coordinator(folder)


def register_site(folder: Path, key: Path, name: str) -> Path:
    """Allow a site in (``lsdm-server register``): record its OpenSSH EC public key as
    ``sites/NAME.pub``. Refuses a bad name, a taken name and a key registered under another name."""
    from server.pki import read_site_public_key

    coordinator = Coordinator(folder)
    coordinator.check()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
        raise InputError(f"site name {name!r}: use 1-64 letters, digits, - or _")
    data = read_site_public_key(key)
    target = coordinator.sites / f"{name}.pub"
    if target.exists():
        raise FileExistsError(f"a site named {name} is registered already: {target}")
    for other, path in coordinator.registered_sites().items():
        if path.read_bytes().strip() == data.strip():
            raise InputError(f"this key is registered already, as {other}")
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target
