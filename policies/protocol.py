"""The wire between coordinator and site: what each Flower message carries, as pydantic models.

- :class:`RoundConfig`: the coordinator's settings for one round (the message's ``config``
  ConfigRecord).
- :class:`NodeConfig`: the site's own settings, given to its SuperNode (``--node-config``) by
  ``lsdm-node join`` and read back by the ClientApp.
- :class:`SiteReply`: a site's answer to a round (the reply's ``metrics`` MetricRecord): sample
  count, mean losses, seconds of training, the latent range in the calibration, the privacy record.
- :class:`DPRecord`: a site's privacy so far, one shape from the site's reply through the
  coordinator's checkpoint to the bundle's provenance.

Each model turns into the flat mapping Flower's records hold (``to_record``) and back
(``from_record``), and nowhere else is a key spelled. Decoding validates: a malformed record
raises :class:`pydantic.ValidationError` (:func:`problems` says why in one line), so a bad reply
is one rejected update and a bad round one refusal, not a crash in the middle of a federation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Phase = Literal["vqgan", "calibrate", "diffusion"]
PHASES: tuple[str, ...] = get_args(Phase)
WireValue = int | float | str | bool | list[int] | list[float] | list[str]


def problems(error: ValidationError) -> str:
    """A validation error in one line: ``field: reason; field: reason``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in error.errors()
    )


def _take(values: dict[str, Any], keys) -> dict[str, Any]:
    """Remove ``keys`` from ``values``; what was there."""
    return {k: values.pop(k) for k in keys if k in values}


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RoundPlan(_Wire):
    """The federation's whole plan, so that a DP site can spread its budget over all of it."""

    rounds_vqgan: int = Field(ge=0)
    rounds_diffusion: int = Field(ge=0)
    local_steps_vqgan: int = Field(ge=0)
    local_steps_diffusion: int = Field(ge=0)


class RoundConfig(_Wire):
    """What the coordinator sends with every round. On the wire ``shape`` and ``labels`` are JSON
    text, ``max_epsilon`` is absent when the federation sets none, and the plan's four numbers sit
    beside the rest (absent together when the coordinator sends no plan)."""

    phase: Phase
    round: int = Field(ge=0, description="round number over the whole run, 1..R1+R2")
    preset: str = Field(min_length=1, description="model preset (lsdm.config.PRESETS)")
    shape: tuple[int, int, int] = Field(description="volume shape (D, H, W)")
    labels: dict[int, str] = Field(description="the federation's label vocabulary")
    local_steps: int = Field(ge=0, description="training steps of this round")
    step_offset: int = Field(ge=0, description="steps of this phase before this round")
    seed: int
    dp_required: bool
    max_epsilon: float | None = Field(None, gt=0, description="largest ε a site may report")
    plan: RoundPlan | None = None

    @field_validator("phase", mode="before")
    @classmethod
    def _known_phase(cls, value: Any) -> Any:
        if value not in PHASES:
            raise ValueError(f"unknown phase {value!r}")
        return value

    @field_validator("shape", "labels", mode="before")
    @classmethod
    def _from_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    def to_record(self) -> dict[str, WireValue]:
        record: dict[str, WireValue] = self.model_dump(exclude={"plan", "max_epsilon"})
        record["shape"] = json.dumps(list(self.shape))
        record["labels"] = json.dumps({str(k): v for k, v in self.labels.items()})
        if self.max_epsilon is not None:
            record["max_epsilon"] = self.max_epsilon
        if self.plan is not None:
            record |= self.plan.model_dump()
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundConfig:
        values = dict(record)
        plan = _take(values, RoundPlan.model_fields)
        return cls.model_validate(values | ({"plan": plan} if plan else {}))


class NodeConfig(_Wire):
    """A site's settings for its ClientApp, as ``flower-supernode --node-config`` carries them.
    The coordinator's pinned key and the bundle's path come together or not at all: without a
    pinned key the site refuses every bundle."""

    cohort: Path
    policy: str = Field(min_length=1, description="site policy: a preset's name or a file")
    workdir: Path
    threads: int = Field(1, ge=1)
    coordinator_key: Path | None = None
    bundle: Path | None = None

    @model_validator(mode="after")
    def _key_and_bundle_together(self) -> NodeConfig:
        if (self.coordinator_key is None) != (self.bundle is None):
            raise ValueError("coordinator_key and bundle come together")
        return self

    def to_flag(self) -> str:
        """The ``--node-config`` value: ``key=value`` pairs, strings TOML-quoted."""

        def toml(value: Any) -> str:
            if isinstance(value, int):
                return str(value)
            return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

        return " ".join(f"{k}={toml(v)}" for k, v in self.model_dump(exclude_none=True).items())

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> NodeConfig:
        return cls.model_validate(dict(record))


class DPRecord(_Wire):
    """A site's privacy: whether it trained with differential privacy, and if so the (ε, δ) its
    ledger has spent so far. In a reply, ``dp`` is sent as 1 beside ``epsilon`` and ``delta``,
    or not at all for a site without DP."""

    dp: bool = False
    epsilon: float | None = Field(None, ge=0)
    delta: float | None = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _figures_with_dp(self) -> DPRecord:
        if self.dp and (self.epsilon is None or self.delta is None):
            raise ValueError("a DP site must report the ε and δ it has spent")
        if not self.dp and (self.epsilon is not None or self.delta is not None):
            raise ValueError("ε and δ without DP")
        return self

    def then(self, later: DPRecord) -> DPRecord:
        """This record followed by a later phase's: DP only if both were, the larger ε and δ
        (ledgers are cumulative, so the later figures already include the earlier ones)."""
        if not (self.dp and later.dp):
            return DPRecord()
        return DPRecord(
            dp=True, epsilon=max(self.epsilon, later.epsilon), delta=max(self.delta, later.delta)
        )

    def to_metrics(self) -> dict[str, WireValue]:
        return {"dp": 1, "epsilon": self.epsilon, "delta": self.delta} if self.dp else {}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> DPRecord:
        return cls.model_validate({k: metrics[k] for k in cls.model_fields if k in metrics})


class DPRound(_Wire):
    """How a DP site trained this round: the noise it chose, its clipping norm, and the ε it
    allows itself in all (its own target, capped by the federation's ``max_epsilon``)."""

    noise_multiplier: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    epsilon_budget: float = Field(gt=0)


class SiteReply(_Wire):
    """A site's answer to a round. On the wire each loss travels under its own name
    (``recon_l1``, ``loss``, ...), beside the reserved names of the other fields."""

    num_samples: int = Field(ge=1)
    losses: dict[str, float] = Field(default_factory=dict)
    train_seconds: float | None = Field(None, ge=0)
    latent_low: list[float] | None = None
    latent_high: list[float] | None = None
    latent_range_public: bool = Field(
        False, description="a DP site in the calibration: no statistic of its data, no range"
    )
    privacy: DPRecord = Field(default_factory=DPRecord)
    dp_round: DPRound | None = None

    @field_validator("losses")
    @classmethod
    def _no_reserved_names(cls, losses: dict[str, float]) -> dict[str, float]:
        clash = set(losses) & _RESERVED
        if clash:
            raise ValueError(f"loss names {sorted(clash)} are reserved")
        return losses

    @model_validator(mode="after")
    def _one_range(self) -> SiteReply:
        if (self.latent_low is None) != (self.latent_high is None):
            raise ValueError("latent_low and latent_high come together")
        if self.latent_low is not None:
            if len(self.latent_low) != len(self.latent_high) or not self.latent_low:
                raise ValueError("latent_low and latent_high differ in length")
            if self.latent_range_public:
                raise ValueError("a latent range and latent_range_public")
        return self

    def to_record(self) -> dict[str, WireValue]:
        record: dict[str, WireValue] = {"num_samples": self.num_samples, **self.losses}
        if self.train_seconds is not None:
            record["train_seconds"] = self.train_seconds
        if self.latent_low is not None:
            record |= {"latent_low": self.latent_low, "latent_high": self.latent_high}
        if self.latent_range_public:
            record["latent_range_public"] = 1
        record |= self.privacy.to_metrics()
        if self.dp_round is not None:
            record |= self.dp_round.model_dump()
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteReply:
        values = dict(record)
        fields = _take(values, _OWN_FIELDS)
        fields["privacy"] = _take(values, DPRecord.model_fields)
        dp_round = _take(values, DPRound.model_fields)
        if dp_round:
            fields["dp_round"] = dp_round
        return cls.model_validate(fields | {"losses": values})


_OWN_FIELDS = ("num_samples", "train_seconds", "latent_low", "latent_high", "latent_range_public")
_RESERVED = {*_OWN_FIELDS, *DPRecord.model_fields, *DPRound.model_fields}
