"""A site's part of each round, as plain functions of (site, round settings, weights): what
:mod:`node.client_app` calls between decoding a message and encoding the reply. It trains with
the same ``train_step`` functions as central training (:mod:`lsdm.vqgan`, :mod:`lsdm.diffusion`).

- :func:`vqgan_round`: local steps of the VQ-GAN (autoencoder and discriminator);
- :func:`calibration_round`: the per-channel range of the cohort's latents under the shared
  VQ-GAN (:meth:`lsdm.vqgan.VQGAN.latent_range`), nothing else;
- :func:`diffusion_round`: local steps of the latent diffusion model against the frozen VQ-GAN.

Each is plain or, with ``dp.enabled`` in the site policy, private: the noise is set from what is
left of the cohort's budget (:mod:`node.ledger`) and the steps the coordinator still plans; a
round that does not fit is refused before any step, and the round's spend is written to the
ledger before its first step (:func:`begin_private_round`). A DP site reports no loss values
(they are computed from its data without noise), and in the calibration no latent range.

The SuperNode starts a fresh process for every message, so what must last between rounds lives
in the site's work folder: the cohort's latents under the shared VQ-GAN are encoded once per
VQ-GAN and cached there (they are the site's own data and stay on the site).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

from lsdm.config import LSDMConfig
from lsdm.data import Cohort
from policies.protocol import DPRecord, DPRound, NodeConfig, RoundConfig, SiteReply
from policies.site import SitePolicy

State = dict[str, torch.Tensor]


class Refusal(Exception):
    """The site will not take part in this round; the reason is sent back to the coordinator."""


class PrivateRound(NamedTuple):
    """A DP round: the site's privacy once the round is spent, and how it trains."""

    privacy: DPRecord
    settings: DPRound


@dataclass(frozen=True)
class Site:
    cohort: Cohort
    policy: SitePolicy
    workdir: Path

    @property
    def private(self) -> bool:
        return self.policy.dp.enabled

    def log(self, text: str) -> None:
        """A line for the site's operator: on stderr (the SuperNode's log) and in
        WORKDIR/node.log."""
        line = f"{datetime.now(UTC).isoformat(timespec='seconds')} {text}"
        print(f"lsdm-node: {line}", file=sys.stderr, flush=True)
        with open(self.workdir / "node.log", "a") as f:
            f.write(line + "\n")


def open_site(node: NodeConfig) -> Site:
    from lsdm.data import open_cohort
    from policies import load_site_policy

    torch.set_num_threads(node.threads)
    node.workdir.mkdir(parents=True, exist_ok=True)
    return Site(open_cohort(node.cohort), load_site_policy(node.policy), node.workdir)


def check_round(config: RoundConfig, site: Site) -> None:
    """Raise :class:`Refusal` for a round this site's policy or cohort rules out."""
    from lsdm.config import PRESETS

    if config.preset not in PRESETS:
        raise Refusal(f"unknown model preset {config.preset!r}")
    if config.dp_required and not site.private:
        raise Refusal(
            f"the federation requires differential privacy and this site's policy "
            f"{site.policy.name!r} does not enable it (dp.enabled: false)"
        )
    if config.labels != site.cohort.labels:
        raise Refusal(
            f"the federation's label vocabulary {config.labels} differs from the cohort's "
            f"{site.cohort.labels}"
        )


def model_config(config: RoundConfig) -> LSDMConfig:
    from lsdm.config import preset

    return preset(config.preset).with_overrides(data={"shape": list(config.shape)})


# -- the three rounds --------------------------------------------------------------------------


def vqgan_round(site: Site, config: RoundConfig, weights: State) -> tuple[State, SiteReply]:
    """``config.local_steps`` steps of the VQ-GAN from ``weights``: new weights and reply."""
    from lsdm import vqgan as vq
    from lsdm.data import make_dataset, make_loader
    from node.privacy import make_private_vqgan, private_vqgan_step

    started, dp = _begin(site, config)
    settings = model_config(config)
    model = vq.VQGAN(settings.vqgan)
    model.load_state_dict(weights)
    dataset = make_dataset(site.cohort, settings.data)
    start, steps = config.step_offset, config.local_steps
    label_balanced = settings.vqgan.recon_label_balance > 0  # only then does the loss read maps
    if dp:
        empty = torch.zeros((0, 1, *settings.data.shape))

        def step(indices: list[int], private, i: int) -> None:
            images = torch.stack([dataset[j]["image"] for j in indices]) if indices else empty
            maps = (
                torch.stack([dataset[j]["map"] for j in indices])
                if indices and label_balanced
                else None
            )
            private_vqgan_step(model, images, private, start + i, maps)

        make_private = partial(make_private_vqgan, model)
        _private_steps(
            make_private, len(dataset), settings.data.batch_size, dp.settings, steps, step
        )
        history = []  # losses are statistics of the data without noise: not reported
    else:
        optimisers = vq.make_optimisers(model)
        loader = make_loader(dataset, settings.data, config.seed, start, start + steps)
        history = [
            vq.train_step(
                model,
                batch["image"],
                optimisers,
                start + i,
                batch["map"] if label_balanced else None,
            )
            for i, batch in enumerate(loader)
        ]
    return model.state_dict(), _reply(len(dataset), history, started, dp)


def calibration_round(site: Site, config: RoundConfig, vqgan_weights: State) -> SiteReply:
    """The per-channel range of the cohort's latents under the shared VQ-GAN. A DP site reports
    none: the latents' extremes are a statistic of the data that no DP-SGD covers; it clips its
    latents to [-1, 1] under the range the others agree (:func:`diffusion_round`)."""
    from lsdm.data import make_dataset
    from node.ledger import Ledger

    if site.private:
        site.log("calibration: DP site, no latent range reported")
        delta = site.policy.dp.target_delta
        spent = Ledger.of_cohort(site.cohort.root).epsilon(delta, site.policy.dp.accountant)
        return SiteReply(  # nothing spent by this message
            num_samples=len(site.cohort.pairs),
            latent_range_public=True,
            privacy=DPRecord(dp=True, epsilon=spent, delta=delta),
        )
    torch.manual_seed(config.seed)
    settings = model_config(config)
    vqgan = _frozen_vqgan(settings, vqgan_weights)
    dataset = make_dataset(site.cohort, settings.data)
    low, high = vqgan.latent_range(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
    return SiteReply(num_samples=len(dataset), latent_low=low.tolist(), latent_high=high.tolist())


def diffusion_round(
    site: Site, config: RoundConfig, weights: State, vqgan_weights: State
) -> tuple[State, SiteReply]:
    """``config.local_steps`` steps of the latent diffusion model from ``weights``, on the
    cohort's latents under the frozen VQ-GAN ``vqgan_weights``; its new weights and the reply."""
    from lsdm import diffusion
    from lsdm.data import StepBatchSampler
    from lsdm.diffusion import build_ldm
    from node.privacy import make_private_ldm, private_ldm_step

    started, dp = _begin(site, config)
    settings = model_config(config)
    vqgan = _frozen_vqgan(settings, vqgan_weights)
    encoded, latent_bound = _encoded(site, vqgan, vqgan_weights, settings), vqgan.latent_bound
    del vqgan  # only its latents are needed from here on
    ldm = build_ldm(settings, len(site.cohort.labels))
    ldm.load_state_dict(weights)
    batch_size, num_items = settings.diffusion.batch_size, len(encoded.latents)
    history = []
    if dp:
        # the agreed range, not one computed from our data
        encoded.latents.clamp_(-latent_bound, latent_bound)

        def step(indices: list[int], private, i: int) -> None:
            private_ldm_step(ldm, *encoded.batch(indices, "cpu"), private)

        make_private = partial(make_private_ldm, ldm)
        _private_steps(make_private, num_items, batch_size, dp.settings, config.local_steps, step)
    else:
        optimiser = diffusion.make_optimiser(ldm)
        start = config.step_offset
        sampler = StepBatchSampler(
            num_items, batch_size, config.seed, start, start + config.local_steps
        )
        for indices in sampler:
            latents, maps = encoded.batch(indices, "cpu")
            history.append(diffusion.train_step(ldm, latents, maps, optimiser))
    return ldm.state_dict(), _reply(num_items, history, started, dp)


# -- what the rounds share ---------------------------------------------------------------------


def _begin(site: Site, config: RoundConfig) -> tuple[float, PrivateRound | None]:
    """Seed the round, start its clock and, at a DP site, its privacy accounting."""
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    return started, begin_private_round(site, config) if site.private else None


def _reply(
    num_samples: int,
    history: list[dict[str, float]],
    started: float,
    dp: PrivateRound | None,
) -> SiteReply:
    keys = {k for h in history for k in h}
    losses = {k: sum(h[k] for h in history if k in h) / sum(k in h for h in history) for k in keys}
    return SiteReply(
        num_samples=num_samples,
        losses=losses,
        train_seconds=time.perf_counter() - started,
        privacy=dp.privacy if dp else DPRecord(),
        dp_round=dp.settings if dp else None,
    )


def _frozen_vqgan(settings: LSDMConfig, weights: State):
    from lsdm.vqgan import VQGAN

    vqgan = VQGAN(settings.vqgan)
    vqgan.load_state_dict(weights)
    return vqgan.eval()


def _state_digest(state: State) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _encoded(site: Site, vqgan, vqgan_weights: State, settings: LSDMConfig):
    """The cohort's latents under this VQ-GAN, from the site's cache or encoded now."""
    from safetensors.torch import load_file, save_file

    from lsdm.atomic import atomic_path
    from lsdm.train_ldm import EncodedCohort, encode_cohort

    cache = site.workdir / f"latents-{_state_digest(vqgan_weights)}.safetensors"
    if cache.is_file():
        data = load_file(str(cache))
        return EncodedCohort(data["latents"], data["label_index"], len(site.cohort.labels))
    encoded = encode_cohort(vqgan, site.cohort, settings)
    with atomic_path(cache) as tmp:
        save_file({"latents": encoded.latents, "label_index": encoded.label_index}, str(tmp))
    return encoded


def _private_steps(
    make_private: Callable,
    num_items: int,
    batch_size: int,
    dp: DPRound,
    steps: int,
    step: Callable[[list[int], object, int], None],
) -> None:
    """``steps`` DP-SGD steps: ``make_private(noise, clip, batch_size, generator)`` wraps the
    model, then ``step(indices, private, i)`` runs on each Poisson batch drawn with a secret
    generator (a batch may be empty: a noise-only step)."""
    from node.privacy import poisson_batches, sample_rate, secret_generator

    generator = secret_generator()
    private = make_private(dp.noise_multiplier, dp.max_grad_norm, batch_size, generator)
    q = sample_rate(num_items, batch_size)
    try:
        for i, indices in enumerate(poisson_batches(num_items, q, steps, generator)):
            step(indices, private, i)
    finally:
        private.close()


# -- privacy accounting ------------------------------------------------------------------------


def planned_segments(config: RoundConfig, settings: LSDMConfig, num_items: int):
    """The DP steps of this round and of the rest of the federation's plan, as ledger
    segments; without a plan from the coordinator, the rest is taken to be empty."""
    from node.ledger import Segment
    from node.privacy import sample_rate, vqgan_mechanisms

    start, steps, plan = config.step_offset, config.local_steps, config.plan
    q_vqgan = sample_rate(num_items, settings.data.batch_size)
    q_diffusion = sample_rate(num_items, settings.diffusion.batch_size)
    adversarial = settings.vqgan.adversarial_start_step

    def vqgan(a: int, b: int) -> list[Segment]:
        return [Segment(q_vqgan, n, k) for n, k in vqgan_mechanisms(a, b, adversarial)]

    diffusion_total = plan.rounds_diffusion * plan.local_steps_diffusion if plan else 0
    if config.phase == "vqgan":
        this = vqgan(start, start + steps)
        rest = vqgan(start + steps, plan.rounds_vqgan * plan.local_steps_vqgan) if plan else []
        if diffusion_total:
            rest.append(Segment(q_diffusion, diffusion_total))
    else:
        this = [Segment(q_diffusion, steps)]
        left = diffusion_total - (start + steps)
        rest = [Segment(q_diffusion, left)] if left > 0 else []
    return this, rest


def privacy_budget(config: RoundConfig, policy: SitePolicy) -> float:
    """The site's target ε, capped by the federation's ``max_epsilon`` when it sets one."""
    if config.max_epsilon is None:
        return policy.dp.target_epsilon
    return min(policy.dp.target_epsilon, config.max_epsilon)


def begin_private_round(site: Site, config: RoundConfig) -> PrivateRound:
    """Choose the noise for this round, refuse it if it does not fit in the budget, and write
    its spend to the ledger before any step; returns the site's privacy after the round and the
    round's DP settings, for the reply."""
    from node.ledger import BudgetExceeded, Ledger, LedgerError, plan_noise

    dp = site.policy.dp
    this, rest = planned_segments(config, model_config(config), len(site.cohort.pairs))
    target = privacy_budget(config, site.policy)
    where = f"round {config.round} ({config.phase})"
    try:
        ledger = Ledger.of_cohort(site.cohort.root)
        sigma = plan_noise(
            ledger.history, this + rest, target, dp.target_delta, dp.accountant,
            dp.max_noise_multiplier,
        )  # fmt: skip
    except (BudgetExceeded, LedgerError) as e:
        site.log(f"REFUSED {where}: privacy budget: {e}")
        raise Refusal(f"privacy budget: {e}") from None
    before = ledger.epsilon(dp.target_delta, dp.accountant)
    ledger.record(
        [s.at(sigma) for s in this],
        {
            "phase": config.phase,
            "round": config.round,
            "steps": config.local_steps,
            "noise_multiplier": sigma,
            "max_grad_norm": dp.max_grad_norm,
        },
    )
    after = ledger.epsilon(dp.target_delta, dp.accountant)
    site.log(
        f"{where}: DP-SGD, noise multiplier {sigma:.3g}, clip {dp.max_grad_norm:g}; "
        f"ε {before:.3g} -> {after:.3g} of {target:g} at δ = {dp.target_delta:g} "
        f"({dp.accountant})"
    )
    return PrivateRound(
        DPRecord(dp=True, epsilon=after, delta=dp.target_delta),
        DPRound(noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm, epsilon_budget=target),
    )
