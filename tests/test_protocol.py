"""The wire protocol: every field of every model survives Flower's records, and a malformed
record is rejected at decoding (and, at the coordinator, becomes one rejected update)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MetricRecord
from pydantic import BaseModel, ValidationError

from policies.protocol import (
    DPRecord,
    DPRound,
    NodeConfig,
    RoundConfig,
    RoundPlan,
    SiteReply,
    problems,
)

ROUND = RoundConfig(
    phase="diffusion",
    round=7,
    preset="tiny",
    shape=(16, 32, 48),
    labels={0: "background", 1: "fat", 4: "lesion"},
    local_steps=20,
    step_offset=40,
    seed=1234,
    dp_required=True,
    max_epsilon=8.5,
    plan=RoundPlan(
        rounds_vqgan=4, rounds_diffusion=5, local_steps_vqgan=10, local_steps_diffusion=20
    ),
)
REPLY = SiteReply(
    num_samples=12,
    losses={"loss": 0.25, "recon_l1": 0.125},
    train_seconds=3.5,
    latent_low=[-1.5, -0.25],
    latent_high=[2.0, 0.75],
    privacy=DPRecord(dp=True, epsilon=3.25, delta=1e-5),
    dp_round=DPRound(noise_multiplier=1.1, max_grad_norm=1.0, epsilon_budget=8.0),
)


def _every_field_set(model, but: str = "") -> None:
    """The test objects leave no field at its default, so a field the wire drops shows."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if not field.is_required() and name != but:
            assert value != field.get_default(call_default_factory=True), name
        if isinstance(value, BaseModel):
            _every_field_set(value)


def test_round_config_round_trips_through_a_config_record():
    _every_field_set(ROUND)
    record = ConfigRecord(ROUND.to_record())
    assert RoundConfig.from_record(record) == ROUND
    # the keys a site reads, spelled as before
    assert set(record) == {
        "phase", "round", "preset", "shape", "labels", "local_steps", "step_offset", "seed",
        "dp_required", "max_epsilon", "rounds_vqgan", "rounds_diffusion", "local_steps_vqgan",
        "local_steps_diffusion",
    }  # fmt: skip
    bare = ROUND.model_copy(update={"max_epsilon": None, "plan": None})
    assert not {"max_epsilon", "rounds_vqgan"} & set(bare.to_record())
    assert RoundConfig.from_record(ConfigRecord(bare.to_record())) == bare


def test_site_reply_round_trips_through_a_metric_record():
    _every_field_set(REPLY, but="latent_range_public")  # it excludes a latent range
    record = MetricRecord(REPLY.to_record())
    assert SiteReply.from_record(record) == REPLY
    assert record["dp"] == 1 and record["latent_low"] == [-1.5, -0.25] and record["loss"] == 0.25
    public = SiteReply(num_samples=3, latent_range_public=True)
    assert public.latent_range_public
    assert SiteReply.from_record(MetricRecord(public.to_record())) == public
    assert public.to_record() == {"num_samples": 3, "latent_range_public": 1}  # no "dp": no DP


def test_dp_record_round_trips_and_combines_phases():
    private = DPRecord(dp=True, epsilon=2.0, delta=1e-5)
    _every_field_set(private)
    assert DPRecord.from_metrics(private.to_metrics()) == private
    assert DPRecord.model_validate(private.model_dump()) == private  # checkpoint metadata
    assert DPRecord.from_metrics({}) == DPRecord() and DPRecord().to_metrics() == {}
    later = DPRecord(dp=True, epsilon=3.0, delta=1e-6)
    assert private.then(later) == DPRecord(dp=True, epsilon=3.0, delta=1e-5)
    assert private.then(DPRecord()) == DPRecord() == DPRecord().then(private)


def test_node_config_round_trips_through_the_supernode_flag(tmp_path):
    from flwr.common.config import parse_config_args

    node = NodeConfig(
        cohort=tmp_path / "the cohort",
        policy="strict",
        workdir=tmp_path / "work",
        threads=3,
        coordinator_key=tmp_path / "coordinator.pub.pem",
        bundle=tmp_path / "generator.lsdm",
    )
    _every_field_set(node)
    # what the SuperNode makes of --node-config, and hands the ClientApp as its node_config
    assert NodeConfig.from_record(parse_config_args([node.to_flag()])) == node
    plain = NodeConfig(cohort=Path("c"), policy="default", workdir=Path("w"))
    assert "coordinator_key" not in plain.to_flag()
    assert NodeConfig.from_record(parse_config_args([plain.to_flag()])) == plain
    with pytest.raises(ValidationError, match="come together"):
        NodeConfig(cohort=Path("c"), policy="p", workdir=Path("w"), bundle=Path("b"))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_samples": None}, "num_samples"),  # missing
        ({"num_samples": math.nan}, "num_samples"),
        ({"num_samples": math.inf}, "num_samples"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": [3, 4]}, "num_samples"),  # wrong type
        ({"loss": math.nan}, "losses.loss"),
        ({"loss": [0.5]}, "losses.loss"),
        ({"train_seconds": -math.inf}, "train_seconds"),
        ({"latent_low": [0.0, math.inf]}, "latent_low.1"),
        ({"latent_high": None}, "record"),  # a range needs both ends
        ({"epsilon": math.nan}, "privacy.epsilon"),
        ({"epsilon": None}, "privacy"),  # a DP site must say what it spent
        ({"noise_multiplier": "a lot"}, "dp_round.noise_multiplier"),
    ],
)
def test_malformed_replies_are_rejected(change, field):
    metrics = {k: v for k, v in (REPLY.to_record() | change).items() if v is not None}
    with pytest.raises(ValidationError) as error:
        SiteReply.from_record(metrics)
    assert problems(error.value).startswith(f"{field}:")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"phase": "segmentation"}, "unknown phase"),
        ({"shape": "[16, 32"}, "shape"),
        ({"round": "seven"}, "round"),
        ({"seed": None}, "seed"),
        ({"max_epsilon": math.inf}, "max_epsilon"),
        ({"rounds_vqgan": None}, "plan.rounds_vqgan"),  # a plan comes whole
    ],
)
def test_malformed_round_settings_are_rejected(change, reason):
    values = {k: v for k, v in (ROUND.to_record() | change).items() if v is not None}
    with pytest.raises(ValidationError) as error:
        RoundConfig.from_record(values)
    assert reason in problems(error.value)


def test_the_coordinator_rejects_a_malformed_reply_with_its_reason():
    from flwr.app import RecordDict

    from server.exchange import decode_reply

    good = RecordDict({"metrics": MetricRecord(REPLY.to_record())})
    assert decode_reply(good) == REPLY
    bad = RecordDict({"metrics": MetricRecord(REPLY.to_record() | {"num_samples": math.nan})})
    assert (
        decode_reply(bad)
        == "rejected: malformed reply: num_samples: Input should be a finite number"
    )
    assert decode_reply(RecordDict({})) == "rejected: malformed reply: no metrics"
