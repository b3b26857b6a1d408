"""The Flower ClientApp a site runs: one round of local training on the site's cohort.

Thin: it checks the round against the site's policy and cohort, trains with the same
``train_step`` functions as central training, and replies with the weights and aggregate metrics
(sample count, mean losses, seconds of local training). Images, maps and per-subject values
never leave.

The SuperNode starts a fresh process for every message, so what must last between rounds lives
in the site's work folder: the cohort's latents under the shared VQ-GAN are encoded once per
VQ-GAN and cached there (they are the site's own data and stay on the site).

Node configuration (``flower-supernode --node-config``, set by ``lsdm-node join``):
``cohort`` (folder), ``policy`` (preset or file), ``workdir`` (folder), ``threads`` (int).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

PHASES = ("vqgan", "calibrate", "diffusion")


class Refusal(Exception):
    """The site will not take part in this round; the reason is sent back to the coordinator."""


def _labels(text: str) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(text).items()}


def check_round(config, policy, cohort) -> None:
    """Raise :class:`Refusal` for a round this site's policy or cohort rules out."""
    from lsdm.config import PRESETS

    phase = str(config["phase"])
    if phase not in PHASES:
        raise Refusal(f"unknown phase {phase!r}")
    if str(config["preset"]) not in PRESETS:
        raise Refusal(f"unknown model preset {config['preset']!r}")
    if policy.dp.enabled or bool(config["dp_required"]):
        raise Refusal(
            "differential privacy is required (by the site policy or the federation) and this "
            "node does not train with DP-SGD yet"
        )
    labels = _labels(str(config["labels"]))
    if labels != cohort.labels:
        raise Refusal(
            f"the federation's label vocabulary {labels} differs from the cohort's {cohort.labels}"
        )


def pack(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as ONE Flower array (see ``server.server_app.pack``: one object instead of
    hundreds of authenticated round trips)."""
    from lsdm.checkpoint import state_to_bytes

    return ArrayRecord({"state": Array(np.frombuffer(state_to_bytes(state), dtype=np.uint8))})


def unpack(record: ArrayRecord) -> dict[str, torch.Tensor]:
    from lsdm.checkpoint import state_from_bytes

    return state_from_bytes(record["state"].numpy().tobytes())


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _mean(history: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for h in history for k in h}
    return {k: sum(h[k] for h in history if k in h) / sum(k in h for h in history) for k in keys}


def _encoded(vqgan, vqgan_state, cohort, config, workdir: Path):
    """The cohort's latents under this VQ-GAN, from the site's cache or encoded now."""
    from safetensors.torch import load_file, save_file

    from lsdm.atomic import atomic_path
    from lsdm.train_ldm import EncodedCohort, encode_cohort

    cache = workdir / f"latents-{_state_digest(vqgan_state)}.safetensors"
    if cache.is_file():
        data = load_file(str(cache))
        return EncodedCohort(data["latents"], data["label_index"], len(cohort.labels))
    encoded = encode_cohort(vqgan, cohort, config)
    with atomic_path(cache) as tmp:
        save_file({"latents": encoded.latents, "label_index": encoded.label_index}, str(tmp))
    return encoded


def run_round(content: RecordDict, node_config: dict) -> RecordDict:
    """Everything a site does for one message; importable for tests without Flower processes."""
    from lsdm import diffusion
    from lsdm import vqgan as vq
    from lsdm.config import preset
    from lsdm.data import StepBatchSampler, make_dataset, make_loader, open_cohort
    from lsdm.train_ldm import build_ldm
    from policies import load_site_policy

    torch.set_num_threads(int(node_config.get("threads", torch.get_num_threads())))
    config_record = content.config_records["config"]
    cohort = open_cohort(Path(str(node_config["cohort"])))
    policy = load_site_policy(str(node_config["policy"]))
    check_round(config_record, policy, cohort)
    workdir = Path(str(node_config["workdir"]))
    workdir.mkdir(parents=True, exist_ok=True)

    phase = str(config_record["phase"])
    config = preset(str(config_record["preset"])).with_overrides(
        data={"shape": json.loads(str(config_record["shape"]))}
    )
    seed = int(config_record["seed"])
    started = time.perf_counter()
    start = int(config_record["step_offset"])
    steps = int(config_record["local_steps"])
    torch.manual_seed(seed)

    if phase == "vqgan":
        model = vq.VQGAN(config.vqgan)
        model.load_state_dict(unpack(content.array_records["arrays"]))
        optimisers = vq.make_optimisers(model)
        dataset = make_dataset(cohort, config.data)
        loader = make_loader(dataset, config.data, seed, start, start + steps)
        history = [
            vq.train_step(model, batch["image"], optimisers, start + i)
            for i, batch in enumerate(loader)
        ]
        metrics = {"num_samples": len(dataset), **_mean(history)}
        metrics["train_seconds"] = time.perf_counter() - started
        return RecordDict({"arrays": pack(model.state_dict()), "metrics": MetricRecord(metrics)})

    vqgan_state = content.array_records["arrays" if phase == "calibrate" else "vqgan"]
    vqgan_state = unpack(vqgan_state)
    shared_vqgan = vq.VQGAN(config.vqgan)
    shared_vqgan.load_state_dict(vqgan_state)
    shared_vqgan.eval()
    if phase == "calibrate":
        dataset = make_dataset(cohort, config.data)
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        with torch.no_grad():
            z = torch.cat([shared_vqgan.autoencoder.encode(c) for c in images.split(2)])
        z = z.transpose(0, 1).flatten(1)
        metrics = {"num_samples": len(dataset)}
        for c, (low, high) in enumerate(zip(z.min(dim=1).values, z.max(dim=1).values, strict=True)):
            metrics[f"latent_low_{c}"] = float(low)
            metrics[f"latent_high_{c}"] = float(high)
        return RecordDict({"metrics": MetricRecord(metrics)})

    encoded = _encoded(shared_vqgan, vqgan_state, cohort, config, workdir)
    del shared_vqgan
    ldm = build_ldm(config, len(cohort.labels))
    ldm.load_state_dict(unpack(content.array_records["arrays"]))
    optimiser = diffusion.make_optimiser(ldm)
    sampler = StepBatchSampler(
        len(encoded.latents), config.diffusion.batch_size, seed, start, start + steps
    )
    history = []
    for indices in sampler:
        latents, maps = encoded.batch(indices, "cpu")
        history.append(diffusion.train_step(ldm, latents, maps, optimiser))
    metrics = {"num_samples": len(encoded.latents), **_mean(history)}
    metrics["train_seconds"] = time.perf_counter() - started
    return RecordDict({"arrays": pack(ldm.state_dict()), "metrics": MetricRecord(metrics)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        content = run_round(msg.content, dict(context.node_config))
    except Refusal as refusal:
        content = RecordDict({"refusal": ConfigRecord({"reason": str(refusal)})})
    return Message(content=content, reply_to=msg)
