"""The coordinator's side of each round: the calibration of the latent scale and a training round.

Before the first diffusion round the latent scale is agreed: every site encodes its volumes with
the shared VQ-GAN and reports only the per-channel minimum and maximum of its latents; the
coordinator leaves out a range that reaches far beyond the others' (one site could otherwise
squash everyone's scale) and takes the minimum of the remaining minima and the maximum of the
maxima, so every honest site's latents fall in [-1, 1] under one shared scaling (the same rule
central training applies to one cohort).

A training round sends the shared weights and the round's settings to every connected site,
checks each reply, bounds the accepted ones against each other and averages them weighted by
sample count (:mod:`server.aggregate`); the loop (:mod:`server.server_app`) checkpoints and logs
it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from policies.protocol import RoundConfig, RoundPlan
from server.aggregate import (
    Update,
    bound_updates,
    calibration_ranges,
    change_norm,
    privacy_problem,
    trainable_keys,
    update_problem,
    weighted_average,
)
from server.exchange import pack, payload_bytes, site_replies, unpack
from server.federation import CALIBRATE, DIFFUSION_PHASE, VQGAN_PHASE, Federation


def round_config(fed: Federation, phase: str, round_: int) -> RoundConfig:
    steps = fed.settings.local_steps
    if phase == DIFFUSION_PHASE:
        local_round = round_ - fed.policy.rounds.vqgan
        local_steps = steps.diffusion
    else:
        local_round, local_steps = round_, steps.vqgan
    return RoundConfig(
        phase=phase,
        round=round_,
        preset=fed.policy.model_preset,
        shape=fed.config.data.shape,
        labels=fed.labels,
        local_steps=local_steps,
        step_offset=(local_round - 1) * local_steps,
        seed=fed.settings.seed + round_,
        dp_required=fed.policy.dp_required,
        max_epsilon=fed.policy.max_epsilon,
        plan=RoundPlan(
            rounds_vqgan=fed.policy.rounds.vqgan,
            rounds_diffusion=fed.policy.rounds.diffusion,
            local_steps_vqgan=steps.vqgan,
            local_steps_diffusion=steps.diffusion,
        ),
    )


def _content(fed: Federation, phase: str, round_: int, **arrays) -> RecordDict:
    config = ConfigRecord(round_config(fed, phase, round_).to_record())
    return RecordDict({"config": config, **{k: pack(v) for k, v in arrays.items()}})


def calibrate(grid: Grid, fed: Federation) -> dict:
    """Agree the latent scale: min of the sites' per-channel minima, max of their maxima."""
    round_ = fed.policy.rounds.vqgan
    content = _content(fed, CALIBRATE, round_, arrays=fed.vqgan.state_dict())
    replies = (
        (site, reply if isinstance(reply, str) else reply[0])
        for site, reply in site_replies(grid, fed, content, round_)
    )
    ranges, sites, problems = calibration_ranges(
        replies,
        fed.config.vqgan.embedding_dim,
        fed.policy.dp_required,
        fed.policy.aggregation.latent_range_margin,
    )
    if len(sites) < fed.policy.min_sites:
        raise RuntimeError(f"calibration: too few sites answered ({problems})")
    if ranges:
        lows = torch.tensor([low for low, _ in ranges.values()])
        highs = torch.tensor([high for _, high in ranges.values()])
        low, high = lows.min(dim=0).values, highs.max(dim=0).values
    else:  # every site is DP: the codebook's range, a function of the shared model alone
        low, high = fed.vqgan.codebook_latent_range()
    fed.vqgan.set_latent_range(low, high)
    fed.calibrated = True
    return {
        "event": "calibrated",
        "sites": sites,
        "problems": problems,
        "range_from": "sites" if ranges else "codebook",
        "latent_low": fed.vqgan.latent_low.tolist(),
        "latent_high": fed.vqgan.latent_high.tolist(),
    }


def train_round(grid: Grid, fed: Federation, round_: int) -> dict:
    phase = fed.phase_of(round_)
    model = fed.model_of(phase)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained_keys = trainable_keys(model)
    arrays = {"arrays": reference}
    if phase == DIFFUSION_PHASE:
        arrays["vqgan"] = fed.vqgan.state_dict()
    content = _content(fed, phase, round_, **arrays)
    started = time.monotonic()
    bytes_down = sum(payload_bytes(record) for record in content.array_records.values())
    bytes_up: dict[str, int] = {}
    accepted: list[Update] = []
    rejected: dict[str, str] = {}
    for site, reply in site_replies(grid, fed, content, round_):
        if isinstance(reply, str):
            rejected[site] = reply
            continue
        reply, message = reply
        bytes_up[site] = sum(payload_bytes(r) for r in message.content.array_records.values())
        try:
            state = unpack(message.content.array_records["arrays"])
        except Exception as e:  # a malformed record is the site's fault, not ours
            rejected[site] = f"rejected: unreadable weights ({e})"
            continue
        metrics = reply.to_record()
        del metrics["num_samples"]
        update = Update(site, state, reply.num_samples, metrics, reply.privacy)
        problem = privacy_problem(
            reply.privacy,
            fed.policy.dp_required,
            fed.policy.max_epsilon,
            reply.dp_round,
            previous=fed.privacy[phase].get(site) or fed.privacy[VQGAN_PHASE].get(site),
            trained=True,
        ) or update_problem(
            update, reference, fed.settings.max_update_norm, trained_keys, fed.policy.aggregation
        )
        if problem:
            rejected[site] = f"rejected: {problem}"
        else:
            accepted.append(update)
    entry = {
        "event": "round",
        "round": round_,
        "phase": phase,
        "accepted": {u.site: {"num_samples": u.num_samples, **u.metrics} for u in accepted},
        "rejected": rejected,
        "bytes_down": bytes_down,
        "bytes_up": bytes_up,
    }
    if len(accepted) < fed.policy.min_sites:
        entry["outcome"] = f"too few valid updates ({len(accepted)} < {fed.policy.min_sites})"
        return entry
    for u in accepted:
        fed.privacy[phase][u.site] = u.privacy
    bounded_updates, entry["bounded"] = bound_updates(accepted, reference, fed.policy.aggregation)
    average = weighted_average(bounded_updates)
    entry["change_norm"] = change_norm(average, reference, trained_keys)
    model.load_state_dict(average)
    if fed.settings.keep_updates:  # what the sites sent, before bounding
        folder = fed.coordinator.updates / f"round-{round_:04d}"
        for u in accepted:
            _save_state(folder / f"{u.site}.safetensors", u.state, u.site, u.num_samples)
        _save_state(folder / "reference.safetensors", reference, "reference", 0)
    entry["outcome"] = "aggregated"
    entry["seconds"] = round(time.monotonic() - started, 3)
    return entry


def _save_state(path: Path, state: dict, site: str, num_samples: int) -> None:
    from safetensors.torch import save_file

    from lsdm.atomic import atomic_path

    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"site": site, "num_samples": str(num_samples)})
