"""The Flower ClientApp a site runs: one round of local training on the site's cohort.

Thin: it checks the round against the site's policy and cohort, trains with the same
``train_step`` functions as central training, and replies with the weights and aggregate metrics
(sample count, mean losses, seconds of local training). Images, maps and per-subject values
never leave.

The SuperNode starts a fresh process for every message, so what must last between rounds lives
in the site's work folder: the cohort's latents under the shared VQ-GAN are encoded once per
VQ-GAN and cached there (they are the site's own data and stay on the site).

With ``dp.enabled`` in the site policy, phases 1 and 2 train with DP-SGD (:mod:`node.privacy`):
the noise is set from what is left of the cohort's budget (:mod:`node.ledger`) and the steps the
coordinator still plans; a round that does not fit is refused before any step, and the round's
spend is written to the ledger before its first step. A DP site replies with no loss values (they
are computed from its data without noise), and in the calibration it reports no latent range.

Node configuration (``flower-supernode --node-config``, set by ``lsdm-node join``):
``cohort`` (folder), ``policy`` (preset or file), ``workdir`` (folder), ``threads`` (int).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

PHASES = ("vqgan", "calibrate", "diffusion")
BENCH_WAIT_ENV = "LSDM_BENCH_FIXED_WAIT_S"  # benchmark only, see fixed_wait_reply


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
    if bool(config["dp_required"]) and not policy.dp.enabled:
        raise Refusal(
            f"the federation requires differential privacy and this site's policy "
            f"{policy.name!r} does not enable it (dp.enabled: false)"
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


def fixed_wait_reply(content: RecordDict, num_samples: int, wait_s: float) -> RecordDict:
    """Benchmark only (``bench/bench_federation.py --reference-size``, set through the
    ``LSDM_BENCH_FIXED_WAIT_S`` environment variable of the site): local training replaced by a
    fixed wait, the received weights sent back unchanged, so that a round of a model too big to
    train here still measures the federation's own cost (transfers, checks, averaging)."""
    time.sleep(wait_s)
    config = content.config_records["config"]
    metrics = {"num_samples": num_samples, "train_seconds": wait_s}
    if str(config["phase"]) == "calibrate":
        from lsdm.config import preset

        for c in range(preset(str(config["preset"])).vqgan.embedding_dim):
            metrics |= {f"latent_low_{c}": -1.0, f"latent_high_{c}": 1.0}
        return RecordDict({"metrics": MetricRecord(metrics)})
    return RecordDict({"arrays": content.array_records["arrays"], "metrics": MetricRecord(metrics)})


def operator_log(workdir: Path, text: str) -> None:
    """A line for the site's operator: on stderr (the SuperNode's log) and in WORKDIR/node.log."""
    line = f"{datetime.now(UTC).isoformat(timespec='seconds')} {text}"
    print(f"lsdm-node: {line}", file=sys.stderr, flush=True)
    with open(workdir / "node.log", "a") as f:
        f.write(line + "\n")


def _plan_value(config, key: str) -> int | None:
    return int(config[key]) if key in config else None


def planned_segments(config_record, config, num_items: int):
    """The DP steps of this round and of the rest of the federation's plan, as ledger
    segments; without a plan from the coordinator, the rest is taken to be empty."""
    from node.ledger import Segment
    from node.privacy import sample_rate, vqgan_mechanisms

    phase = str(config_record["phase"])
    start, steps = int(config_record["step_offset"]), int(config_record["local_steps"])
    q_vqgan = sample_rate(num_items, config.data.batch_size)
    q_diffusion = sample_rate(num_items, config.diffusion.batch_size)
    adversarial = config.vqgan.adversarial_start_step

    def vqgan(a: int, b: int) -> list[Segment]:
        return [Segment(q_vqgan, n, k) for n, k in vqgan_mechanisms(a, b, adversarial)]

    rounds = [_plan_value(config_record, f"rounds_{p}") for p in ("vqgan", "diffusion")]
    local = [_plan_value(config_record, f"local_steps_{p}") for p in ("vqgan", "diffusion")]
    known = None not in rounds and None not in local
    diffusion_total = rounds[1] * local[1] if known else 0
    if phase == "vqgan":
        this = vqgan(start, start + steps)
        rest = vqgan(start + steps, rounds[0] * local[0]) if known else []
        if diffusion_total:
            rest.append(Segment(q_diffusion, diffusion_total))
    else:
        this = [Segment(q_diffusion, steps)]
        left = diffusion_total - (start + steps)
        rest = [Segment(q_diffusion, left)] if left > 0 else []
    return this, rest


def privacy_budget(config_record, policy) -> float:
    """The site's target ε, capped by the federation's ``max_epsilon`` when it sets one."""
    cap = float(config_record["max_epsilon"]) if "max_epsilon" in config_record else 0.0
    return min(policy.dp.target_epsilon, cap) if cap > 0 else policy.dp.target_epsilon


def begin_private_round(config_record, config, policy, cohort, workdir: Path) -> dict:
    """Choose the noise for this round, refuse it if it does not fit in the budget, and write
    its spend to the ledger before any step; returns the round's DP figures for the reply."""
    from node.ledger import BudgetExceeded, Ledger, LedgerError, plan_noise

    dp = policy.dp
    this, rest = planned_segments(config_record, config, len(cohort.pairs))
    target = privacy_budget(config_record, policy)
    where = f"round {config_record['round']} ({config_record['phase']})"
    try:
        ledger = Ledger.of_cohort(cohort.root)
        sigma = plan_noise(
            ledger.history,
            this + rest,
            target,
            dp.target_delta,
            dp.accountant,
            dp.max_noise_multiplier,
        )
    except (BudgetExceeded, LedgerError) as e:
        operator_log(workdir, f"REFUSED {where}: privacy budget: {e}")
        raise Refusal(f"privacy budget: {e}") from None
    before = ledger.epsilon(dp.target_delta, dp.accountant)
    ledger.record(
        [s.at(sigma) for s in this],
        {
            "phase": str(config_record["phase"]),
            "round": int(config_record["round"]),
            "steps": int(config_record["local_steps"]),
            "noise_multiplier": sigma,
            "max_grad_norm": dp.max_grad_norm,
        },
    )
    after = ledger.epsilon(dp.target_delta, dp.accountant)
    operator_log(
        workdir,
        f"{where}: DP-SGD, noise multiplier {sigma:.3g}, clip {dp.max_grad_norm:g}; "
        f"ε {before:.3g} -> {after:.3g} of {target:g} at δ = {dp.target_delta:g} "
        f"({dp.accountant})",
    )
    return {
        "dp": 1,
        "epsilon": after,
        "delta": dp.target_delta,
        "epsilon_budget": target,
        "noise_multiplier": sigma,
        "max_grad_norm": dp.max_grad_norm,
    }


def _private_vqgan(model, dataset, config, dp_metrics: dict, start: int, steps: int) -> None:
    from node.privacy import (
        make_private_vqgan,
        poisson_batches,
        private_vqgan_step,
        sample_rate,
        secret_generator,
    )

    generator = secret_generator()
    private = make_private_vqgan(
        model,
        dp_metrics["noise_multiplier"],
        dp_metrics["max_grad_norm"],
        config.data.batch_size,
        generator,
    )
    q = sample_rate(len(dataset), config.data.batch_size)
    empty = torch.zeros((0, 1, *config.data.shape))
    try:
        for i, indices in enumerate(poisson_batches(len(dataset), q, steps, generator)):
            images = torch.stack([dataset[j]["image"] for j in indices]) if indices else empty
            private_vqgan_step(model, images, private, start + i)
    finally:
        private.close()


def _private_ldm(ldm, encoded, config, dp_metrics: dict, steps: int) -> None:
    from node.privacy import (
        make_private_ldm,
        poisson_batches,
        private_ldm_step,
        sample_rate,
        secret_generator,
    )

    generator = secret_generator()
    private = make_private_ldm(
        ldm,
        dp_metrics["noise_multiplier"],
        dp_metrics["max_grad_norm"],
        config.diffusion.batch_size,
        generator,
    )
    n = len(encoded.latents)
    try:
        for indices in poisson_batches(
            n, sample_rate(n, config.diffusion.batch_size), steps, generator
        ):
            latents, maps = encoded.batch(indices, "cpu")
            private_ldm_step(ldm, latents, maps, private)
    finally:
        private.close()


def run_round(content: RecordDict, node_config: dict) -> RecordDict:
    """Everything a site does for one message; importable for tests without Flower processes."""
    from lsdm import diffusion
    from lsdm import vqgan as vq
    from lsdm.config import preset
    from lsdm.data import StepBatchSampler, make_dataset, make_loader, open_cohort
    from lsdm.diffusion import build_ldm
    from policies import load_site_policy

    torch.set_num_threads(int(node_config.get("threads", torch.get_num_threads())))
    config_record = content.config_records["config"]
    cohort = open_cohort(Path(str(node_config["cohort"])))
    policy = load_site_policy(str(node_config["policy"]))
    check_round(config_record, policy, cohort)
    if float(os.environ.get(BENCH_WAIT_ENV, "0")) > 0:
        return fixed_wait_reply(content, len(cohort.ids), float(os.environ[BENCH_WAIT_ENV]))
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

    private = policy.dp.enabled
    if phase == "calibrate" and private:
        # The latents' extremes are a statistic of the data that no DP-SGD covers: a DP site
        # reports none, and clips its latents to [-1, 1] under the range the others agree.
        from node.ledger import Ledger

        operator_log(workdir, "calibration: DP site, no latent range reported")
        delta = policy.dp.target_delta
        spent = Ledger.of_cohort(cohort.root).epsilon(delta, policy.dp.accountant)
        metrics = {"num_samples": len(cohort.pairs), "dp": 1, "latent_range_public": 1}
        metrics |= {"epsilon": spent, "delta": delta}  # nothing spent by this message
        return RecordDict({"metrics": MetricRecord(metrics)})
    dp_metrics = (
        begin_private_round(config_record, config, policy, cohort, workdir)
        if private and phase in ("vqgan", "diffusion")
        else {}  # no "dp": the coordinator reads a missing flag as "trained without DP"
    )

    if phase == "vqgan":
        model = vq.VQGAN(config.vqgan)
        model.load_state_dict(unpack(content.array_records["arrays"]))
        dataset = make_dataset(cohort, config.data)
        if private:
            _private_vqgan(model, dataset, config, dp_metrics, start, steps)
            history = []  # losses are statistics of the data without noise: not reported
        else:
            optimisers = vq.make_optimisers(model)
            loader = make_loader(dataset, config.data, seed, start, start + steps)
            history = [
                vq.train_step(model, batch["image"], optimisers, start + i)
                for i, batch in enumerate(loader)
            ]
        metrics = {"num_samples": len(dataset), **_mean(history), **dp_metrics}
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
    history = []
    if private:
        encoded.latents.clamp_(-1.0, 1.0)  # the agreed range, not one computed from our data
        _private_ldm(ldm, encoded, config, dp_metrics, steps)
    else:
        optimiser = diffusion.make_optimiser(ldm)
        sampler = StepBatchSampler(
            len(encoded.latents), config.diffusion.batch_size, seed, start, start + steps
        )
        for indices in sampler:
            latents, maps = encoded.batch(indices, "cpu")
            history.append(diffusion.train_step(ldm, latents, maps, optimiser))
    metrics = {"num_samples": len(encoded.latents), **_mean(history), **dp_metrics}
    metrics["train_seconds"] = time.perf_counter() - started
    return RecordDict({"arrays": pack(ldm.state_dict()), "metrics": MetricRecord(metrics)})


def answer(msg: Message, context: Context, work) -> Message:
    """The reply to ``msg``: what ``work(content, node_config)`` returns, or its refusal reason."""
    try:
        content = work(msg.content, dict(context.node_config))
    except Refusal as refusal:
        content = RecordDict({"refusal": ConfigRecord({"reason": str(refusal)})})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return answer(msg, context, run_round)


def receive_bundle(content: RecordDict, node_config: dict) -> RecordDict:
    """The end of training: verify the generator bundle against the coordinator key pinned at
    join time and store it atomically; a bundle that fails the check is refused, not stored."""
    from lsdm.bundle import key_fingerprint, load_public_key, store_bundle
    from lsdm.errors import InputError

    if "coordinator_key" not in node_config:
        raise Refusal("no coordinator key pinned (lsdm-node join --coordinator-key): not stored")
    data = content.array_records["bundle"]["bytes"].numpy().tobytes()
    try:
        key = load_public_key(Path(str(node_config["coordinator_key"])))
        manifest = store_bundle(data, key, Path(str(node_config["bundle"])))
    except InputError as e:  # BundleError included: tampered, unsigned, another signer
        raise Refusal(f"generator bundle refused: {e}") from None
    return RecordDict(
        {
            "stored": ConfigRecord(
                {
                    "path": str(node_config["bundle"]),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "signer": key_fingerprint(key),
                    "created_at": manifest.provenance.created_at,
                }
            )
        }
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    return answer(msg, context, receive_bundle)
