"""A whole number for each training phase: phase 1 trains the 3D VQ-GAN, phase 2 the latent
diffusion.

The one model of every "ints per phase": the rounds a federation policy plans
(``policies.FederationPolicy.rounds``), the steps a coordinator asks of a site per round
(``server.settings.CoordinatorSettings.local_steps``) and the rounds a generator bundle records
(``lsdm.bundle.Provenance.rounds``). Standard library and pydantic only, so ``policies`` may import
it (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


class PerPhase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vqgan: int = Field(ge=0, description="phase 1: the 3D VQ-GAN")
    diffusion: int = Field(ge=0, description="phase 2: the latent diffusion")


def per_phase_setting(*, vqgan: int, diffusion: int, minimum: int, description: str) -> Any:
    """The type of a ``PerPhase`` setting read from a file: a phase left out takes its default
    (``vqgan``, ``diffusion``), so does the whole setting, and every phase must be at least
    ``minimum``."""
    defaults = PerPhase(vqgan=vqgan, diffusion=diffusion)

    def fill(value: object) -> object:
        return {**defaults.model_dump(), **value} if isinstance(value, dict) else value

    def check(value: PerPhase) -> PerPhase:
        if min(value.vqgan, value.diffusion) < minimum:
            raise ValueError(f"every phase needs at least {minimum} ({description})")
        return value

    return Annotated[
        PerPhase,
        BeforeValidator(fill),
        AfterValidator(check),
        Field(default_factory=lambda: defaults, description=description),
    ]
