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


class AggregationRules(BaseModel):
    """How the coordinator keeps one registered site from taking over the shared model. A site is
    authenticated, not trusted: its sample count and every tensor it sends are bounded before
    FedAvg. The "round's median" is over the round's accepted updates, the lower median for an
    even count, so with two sites it is the smaller of the two."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_samples_per_site: int = Field(
        1_000_000, ge=1, description="a reply claiming more training samples is rejected"
    )
    weight_cap_vs_median: float | None = Field(
        1.0,
        ge=1,
        allow_inf_nan=False,
        description="a site's FedAvg weight is at most this multiple of the round's median "
        "sample count (null: weights as claimed)",
    )
    change_cap_vs_median: float | None = Field(
        1.0,
        ge=1,
        allow_inf_nan=False,
        description="each tensor's change, buffers and EMA weights included, is scaled down to at "
        "most this multiple of the round's median change of that tensor (null: no scaling)",
    )
    max_abs_value: float = Field(
        1e6,
        gt=0,
        allow_inf_nan=False,
        description="an update holding a floating value larger in magnitude is rejected",
    )
    latent_range_margin: float = Field(
        0.5,
        gt=0,
        allow_inf_nan=False,
        description="calibration: a site's latent range that reaches beyond the other sites' "
        "median range by more than this share of its width is left out",
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
    max_epsilon: float | None = Field(
        10.0, gt=0, allow_inf_nan=False, description="largest ε a site may report"
    )
    aggregation: AggregationRules = Field(default_factory=AggregationRules)

    @field_validator("labels")
    @classmethod
    def _vocab(cls, v: dict[int, str]) -> dict[int, str]:
        return validate_vocabulary(v)
