"""The schema of a federation policy: what every site in a federation agrees on."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lsdm.phases import per_phase_setting
from policies.vocabulary import BREAST_MRI_LABELS, LabelVocabulary, validate_vocabulary

# Federated rounds of VQ-GAN training (phase 1; 20 by default) and latent diffusion (phase 2; 40).
FederatedRounds = per_phase_setting(
    vqgan=20, diffusion=40, minimum=1, description="federated rounds per phase"
)


class FederationPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["federation"] = "federation"
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    labels: LabelVocabulary = Field(default_factory=lambda: dict(BREAST_MRI_LABELS))
    model_preset: Literal["tiny", "reference"] = "reference"
    rounds: FederatedRounds
    min_sites: int = Field(2, ge=1, description="a round starts only with this many sites")
    dp_required: bool = Field(True, description="sites must train with differential privacy")
    max_epsilon: float | None = Field(10.0, gt=0, description="largest ε a site may report")

    @field_validator("labels")
    @classmethod
    def _vocab(cls, v: dict[int, str]) -> dict[int, str]:
        return validate_vocabulary(v)
