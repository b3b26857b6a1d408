"""The Flower ServerApp: the coordinator's training loop, run by the SuperLink.

Rounds are numbered 1..R over the whole run: rounds 1..R1 train the VQ-GAN (autoencoder and
discriminator), rounds R1+1..R1+R2 train the latent diffusion model against the shared VQ-GAN,
frozen. Before the first diffusion round the latent scale is agreed: every site encodes its
volumes with the shared VQ-GAN and reports only the per-channel minimum and maximum of its
latents; the coordinator takes the minimum of the minima and the maximum of the maxima, so every
site's latents fall in [-1, 1] under one shared scaling (the same rule central training applies
to one cohort).

Each round: send the shared weights and the round's settings to every connected site, check each
reply (:mod:`server.aggregate`), average the accepted ones weighted by sample count, write the
checkpoint atomically, append a line to ``state/rounds.jsonl``. A resumed run starts after the
checkpoint's last completed round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from lsdm.atomic import atomic_write_text
from lsdm.bundle import BUNDLE_NAME
from lsdm.checkpoint import (
    checkpoint_identity,
    file_sha256,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    state_from_bytes,
    state_to_bytes,
)
from lsdm.config import LSDMConfig, preset
from lsdm.diffusion import build_ldm
from lsdm.vqgan import VQGAN
from server.aggregate import (
    Update,
    change_norm,
    combined_privacy,
    privacy_of,
    privacy_problem,
    trainable_keys,
    update_problem,
    weighted_average,
)
from server.settings import Coordinator, CoordinatorSettings

app = ServerApp()

VQGAN_PHASE, DIFFUSION_PHASE, CALIBRATE = "vqgan", "diffusion", "calibrate"
MAX_FAILED_ATTEMPTS = 3  # attempts at one round before the run gives up


def run_config(policy, settings: CoordinatorSettings) -> LSDMConfig:
    config = preset(policy.model_preset)
    if settings.shape is not None:
        config = config.with_overrides(data={"shape": list(settings.shape)})
    return config


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
        # per phase, per site: DP or not and the (ε, δ) of its last accepted reply
        self.privacy: dict[str, dict[str, dict]] = {VQGAN_PHASE: {}, DIFFUSION_PHASE: {}}
        if resume and coordinator.checkpoint.is_file():
            meta = read_metadata(coordinator.checkpoint)
            load_checkpoint(coordinator.checkpoint, {"vqgan": self.vqgan, "ldm": self.ldm})
            self.completed = int(meta["completed_round"])
            self.calibrated = bool(meta["calibrated"])
            self.privacy |= meta.get("privacy", {})
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
            "privacy": self.privacy,
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
        save_checkpoint(
            state / "vqgan.safetensors",
            {"vqgan": self.vqgan},
            None,
            {
                "kind": "vqgan",
                "step": self.policy.rounds.vqgan * steps.vqgan,
                "privacy": self.privacy[VQGAN_PHASE],
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
                "privacy": combined_privacy(
                    self.privacy[VQGAN_PHASE], self.privacy[DIFFUSION_PHASE]
                ),
                **identity,
            },
        )


def log_line(coordinator: Coordinator, entry: dict) -> None:
    """Append one JSON line to the run log (rewritten atomically: it is small)."""
    lines = coordinator.round_log.read_text() if coordinator.round_log.is_file() else ""
    atomic_write_text(coordinator.round_log, lines + json.dumps(entry) + "\n")


def round_config(fed: Federation, phase: str, round_: int) -> ConfigRecord:
    steps = fed.settings.local_steps
    if phase == DIFFUSION_PHASE:
        local_round = round_ - fed.policy.rounds.vqgan
        local_steps = steps.diffusion
    else:
        local_round, local_steps = round_, steps.vqgan
    return ConfigRecord(
        {
            "phase": phase,
            "round": round_,
            "preset": fed.policy.model_preset,
            "shape": json.dumps(list(fed.config.data.shape)),
            "labels": json.dumps({str(k): v for k, v in fed.labels.items()}),
            "local_steps": local_steps,
            "step_offset": (local_round - 1) * local_steps,
            "seed": fed.settings.seed + round_,
            "dp_required": fed.policy.dp_required,
            "max_epsilon": float(fed.policy.max_epsilon or 0.0),  # 0: none
            # the whole plan, so that a DP site can spread its budget over all of it
            "rounds_vqgan": fed.policy.rounds.vqgan,
            "rounds_diffusion": fed.policy.rounds.diffusion,
            "local_steps_vqgan": steps.vqgan,
            "local_steps_diffusion": steps.diffusion,
        }
    )


def pack(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as ONE Flower array. Flower 1.42 moves every array of a message as separate
    objects, each its own authenticated request through the gateway; a UNet's hundreds of
    tensors then cost a minute of round trips per round, one blob costs a few requests."""
    return ArrayRecord({"state": Array(np.frombuffer(state_to_bytes(state), dtype=np.uint8))})


def unpack(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return state_from_bytes(record["state"].numpy().tobytes())


def payload_bytes(record: ArrayRecord) -> int:
    """Tensor bytes of a record (what travels, before Flower's framing)."""
    return sum(len(array.data) for array in record.values())


def node_names(grid: Grid) -> dict[int, str]:
    names = {}
    for node in grid.get_nodes():
        names[node.node_id] = node.name or str(node.node_id)
    return names


def wait_for_sites(grid: Grid, fed: Federation) -> list[int]:
    """The connected sites, once every registered site is there, or once ``min_sites`` are and
    the grace period for the others has passed."""
    registered = len(fed.coordinator.registered_sites())
    started = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        waited = time.monotonic() - started
        if len(nodes) >= fed.policy.min_sites and (
            len(nodes) >= registered or waited > fed.settings.all_sites_grace_s
        ):
            return nodes
        if waited > fed.settings.wait_for_sites_s:
            raise RuntimeError(
                f"only {len(nodes)} of {fed.policy.min_sites} sites connected in time"
            )
        time.sleep(1.0)


def exchange(
    grid: Grid, fed: Federation, content: RecordDict, round_: int, message_type: str = "train"
):
    """Send ``content`` to every connected site; yield (site name, reply or error text)."""
    nodes = wait_for_sites(grid, fed)
    names = node_names(grid)
    messages = [
        Message(content=content, dst_node_id=n, message_type=message_type, group_id=str(round_))
        for n in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=fed.settings.round_timeout_s)
    # A reply is matched to its site by the message it answers: when a site dies, the SuperLink
    # itself answers for it ("node unavailable"), with its own id as the sender.
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        site = names.get(node, str(node))
        if reply.has_error():
            yield site, f"site failed: {reply.error.reason}"
        elif "refusal" in reply.content.config_records:
            yield site, f"site refused: {reply.content.config_records['refusal']['reason']}"
        else:
            yield site, reply


def calibrate(grid: Grid, fed: Federation) -> dict:
    """Agree the latent scale: min of the sites' per-channel minima, max of their maxima."""
    content = RecordDict(
        {
            "arrays": pack(fed.vqgan.state_dict()),
            "config": round_config(fed, CALIBRATE, fed.policy.rounds.vqgan),
        }
    )
    lows, highs, sites, problems = [], [], [], {}
    for site, reply in exchange(grid, fed, content, fed.policy.rounds.vqgan):
        if isinstance(reply, str):
            problems[site] = reply
            continue
        m = reply.content.metric_records["metrics"]
        problem = privacy_problem(dict(m), fed.policy.dp_required, None)
        if problem:
            problems[site] = f"rejected: {problem}"
            continue
        if "latent_range_public" in m:  # a DP site: no statistic of its data
            sites.append(site)
            continue
        channels = fed.config.vqgan.embedding_dim
        low = torch.tensor([m[f"latent_low_{c}"] for c in range(channels)])
        high = torch.tensor([m[f"latent_high_{c}"] for c in range(channels)])
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            problems[site] = "rejected: latent range not finite"
            continue
        lows.append(low)
        highs.append(high)
        sites.append(site)
    if len(sites) < fed.policy.min_sites:
        raise RuntimeError(f"calibration: too few sites answered ({problems})")
    if lows:
        low, high = torch.stack(lows).min(dim=0).values, torch.stack(highs).max(dim=0).values
    else:  # every site is DP: the codebook's range, a function of the shared model alone
        codebook = fed.vqgan.codebook.detach()
        low, high = codebook.min(dim=0).values, codebook.max(dim=0).values
    high = torch.maximum(high, low + 1e-6)
    fed.vqgan.latent_low.copy_(low)
    fed.vqgan.latent_high.copy_(high)
    fed.calibrated = True
    return {
        "event": "calibrated",
        "sites": sites,
        "problems": problems,
        "range_from": "sites" if lows else "codebook",
        "latent_low": low.tolist(),
        "latent_high": high.tolist(),
    }


def train_round(grid: Grid, fed: Federation, round_: int) -> dict:
    phase = fed.phase_of(round_)
    model = fed.model_of(phase)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bounded = trainable_keys(model)
    content = RecordDict({"arrays": pack(reference), "config": round_config(fed, phase, round_)})
    if phase == DIFFUSION_PHASE:
        content["vqgan"] = pack(fed.vqgan.state_dict())
    started = time.monotonic()
    bytes_down = sum(payload_bytes(record) for record in content.array_records.values())
    bytes_up: dict[str, int] = {}
    accepted: list[Update] = []
    rejected: dict[str, str] = {}
    for site, reply in exchange(grid, fed, content, round_):
        if isinstance(reply, str):
            rejected[site] = reply
            continue
        metrics = dict(reply.content.metric_records["metrics"])
        bytes_up[site] = sum(payload_bytes(r) for r in reply.content.array_records.values())
        try:
            state = unpack(reply.content.array_records["arrays"])
        except Exception as e:  # a malformed record is the site's fault, not ours
            rejected[site] = f"rejected: unreadable weights ({e})"
            continue
        update = Update(site, state, int(metrics.pop("num_samples", 0)), metrics)
        problem = privacy_problem(
            metrics, fed.policy.dp_required, fed.policy.max_epsilon
        ) or update_problem(update, reference, fed.settings.max_update_norm, bounded)
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
        fed.privacy[phase][u.site] = privacy_of(u.metrics)
    average = weighted_average(accepted)
    entry["change_norm"] = change_norm(average, reference, bounded)
    model.load_state_dict(average)
    if fed.settings.keep_updates:
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


def hand_out(grid: Grid, fed: Federation) -> dict:
    """Sign the generator bundle of the final models (``state/generator.lsdm``) and send it to
    every connected site; each stores it only if the signature verifies against the coordinator
    key it pinned when it joined. The log line says which sites stored it (and its SHA-256)."""
    import hashlib

    from server.publish import publish

    path = fed.coordinator.state / BUNDLE_NAME
    publish(fed.coordinator.root, path)
    data = path.read_bytes()
    content = RecordDict(
        {"bundle": ArrayRecord({"bytes": Array(np.frombuffer(data, dtype=np.uint8))})}
    )
    stored, refused = [], {}
    for site, reply in exchange(grid, fed, content, fed.total_rounds, message_type="query"):
        if isinstance(reply, str):
            refused[site] = reply
        else:
            stored.append(site)
    return {
        "event": "handed_out",
        "bundle": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "stored": sorted(stored),
        "refused": refused,
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    coordinator = Coordinator(Path(str(context.run_config["coordinator-dir"])))
    fed = Federation(coordinator, resume=bool(context.run_config.get("resume", False)))
    log_line(
        coordinator,
        {
            "event": "start",
            "after_round": fed.completed,
            "total_rounds": fed.total_rounds,
            "run_id": context.run_id,
        },
    )
    round_, failures = fed.completed + 1, 0
    while round_ <= fed.total_rounds:
        if fed.phase_of(round_) == DIFFUSION_PHASE and not fed.calibrated:
            log_line(coordinator, calibrate(grid, fed))
            fed.save()
        entry = train_round(grid, fed, round_)
        if entry["outcome"] != "aggregated":
            log_line(coordinator, entry)
            failures += 1
            if failures >= MAX_FAILED_ATTEMPTS:
                raise RuntimeError(f"round {round_} failed {failures} times: {entry['outcome']}")
            continue  # the round is repeated with whoever is there next time
        failures = 0
        fed.completed = round_
        fed.save()
        log_line(coordinator, entry)
        round_ += 1
    fed.export()
    log_line(coordinator, hand_out(grid, fed))
    log_line(coordinator, {"event": "finished", "rounds": fed.total_rounds})
