"""The coordinator's federation state: the shared models, the round counter, each site's privacy
record, and the checkpoint that holds them between rounds (and across a restart: a resumed run
starts after the checkpoint's last completed round).

Rounds are numbered 1..R over the whole run: rounds 1..R1 train the VQ-GAN, rounds
R1+1..R1+R2 the latent diffusion model against the shared VQ-GAN, frozen.
"""

from __future__ import annotations

import json

import torch

from lsdm.atomic import atomic_write_text
from lsdm.checkpoint import (
    checkpoint_identity,
    file_sha256,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from lsdm.config import LSDMConfig, preset
from lsdm.diffusion import build_ldm
from lsdm.vqgan import VQGAN
from policies.protocol import DPRecord
from server.aggregate import combined_privacy
from server.settings import Coordinator, CoordinatorSettings

VQGAN_PHASE, DIFFUSION_PHASE, CALIBRATE = "vqgan", "diffusion", "calibrate"
Privacy = dict[str, DPRecord]  # per site


def run_config(policy, settings: CoordinatorSettings) -> LSDMConfig:
    config = preset(policy.model_preset)
    if settings.shape is not None:
        config = config.with_overrides(data={"shape": list(settings.shape)})
    return config


def privacy_metadata(privacy: Privacy) -> dict[str, dict]:
    return {site: record.model_dump() for site, record in privacy.items()}


class Federation:
    """The shared models, the round counter and the checkpoint of one coordinator."""

    def __init__(self, coordinator: Coordinator, resume: bool):
        self.coordinator = coordinator
        self.settings = coordinator.settings()
        self.policy = coordinator.policy()
        self.config = run_config(self.policy, self.settings)
        self.labels = dict(self.policy.labels)
        torch.manual_seed(self.settings.seed)
        self.vqgan = VQGAN(self.config.vqgan)
        self.ldm = build_ldm(self.config, len(self.labels))
        self.completed = 0
        self.calibrated = False
        # per phase, per site: the privacy record of its last accepted reply
        self.privacy: dict[str, Privacy] = {VQGAN_PHASE: {}, DIFFUSION_PHASE: {}}
        if resume and coordinator.checkpoint.is_file():
            meta = read_metadata(coordinator.checkpoint)
            load_checkpoint(coordinator.checkpoint, {"vqgan": self.vqgan, "ldm": self.ldm})
            self.completed = int(meta["completed_round"])
            self.calibrated = bool(meta["calibrated"])
            for phase, sites in meta.get("privacy", {}).items():
                self.privacy[phase] = {s: DPRecord.model_validate(r) for s, r in sites.items()}
        elif coordinator.checkpoint.is_file():
            raise RuntimeError("a checkpoint exists; start with --resume or use a fresh folder")

    @property
    def total_rounds(self) -> int:
        return self.policy.rounds.vqgan + self.policy.rounds.diffusion

    def phase_of(self, round_: int) -> str:
        return VQGAN_PHASE if round_ <= self.policy.rounds.vqgan else DIFFUSION_PHASE

    def model_of(self, phase: str) -> torch.nn.Module:
        return self.vqgan if phase == VQGAN_PHASE else self.ldm

    def save(self) -> None:
        metadata = {
            "kind": "federation",
            "completed_round": self.completed,
            "calibrated": self.calibrated,
            "policy": self.policy.name,
            "privacy": {phase: privacy_metadata(p) for phase, p in self.privacy.items()},
            **checkpoint_identity(self.config, self.labels),
        }
        save_checkpoint(
            self.coordinator.checkpoint, {"vqgan": self.vqgan, "ldm": self.ldm}, None, metadata
        )

    def export(self) -> None:
        """Standalone VQ-GAN and LDM checkpoints, the formats ``lsdm sample`` reads."""
        state = self.coordinator.state
        identity = checkpoint_identity(self.config, self.labels)
        steps = self.settings.local_steps
        vqgan_privacy = self.privacy[VQGAN_PHASE]
        save_checkpoint(
            state / "vqgan.safetensors",
            {"vqgan": self.vqgan},
            None,
            {
                "kind": "vqgan",
                "step": self.policy.rounds.vqgan * steps.vqgan,
                "privacy": privacy_metadata(vqgan_privacy),
                **identity,
            },
        )
        save_checkpoint(
            state / "ldm.safetensors",
            {"ldm": self.ldm},
            None,
            {
                "kind": "ldm",
                "step": self.policy.rounds.diffusion * steps.diffusion,
                "vqgan_sha256": file_sha256(state / "vqgan.safetensors"),
                "privacy": privacy_metadata(
                    combined_privacy(vqgan_privacy, self.privacy[DIFFUSION_PHASE])
                ),
                **identity,
            },
        )

    def log(self, entry: dict) -> None:
        """Append one JSON line to the run log (rewritten atomically: it is small)."""
        path = self.coordinator.round_log
        lines = path.read_text() if path.is_file() else ""
        atomic_write_text(path, lines + json.dumps(entry) + "\n")
