"""Checking site updates, bounding them and averaging them (FedAvg weighted by sample count).

An update is a full state dict (the site's weights after its local steps, buffers and EMA weights
included). A registered site is authenticated, not trusted, so before an update is averaged:

1. It is checked (:func:`update_problem`): a sample count within the policy's cap; exactly the
   shared model's keys, with the same shapes and dtypes; every floating value finite and within
   the policy's ``max_abs_value``; a change of the trained weights (L2 over them together) within
   the coordinator's ``max_update_norm``. A rejected update is logged with its reason and never
   averaged in.
2. The accepted updates are bounded against each other (:func:`bound_updates`): a site's FedAvg
   weight is at most a multiple of the round's median sample count, and each floating tensor's
   change at most a multiple of the round's median change of that tensor. The static checks stop
   garbage; these stop a site that stays inside them but claims a large cohort or sends a scaled
   update, so that it moves the shared model about as far as one honest site does. Every bound
   applied is logged.
3. The result is averaged (:func:`weighted_average`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from policies.federation import AggregationRules
from policies.protocol import DPRecord, DPRound, SiteReply

State = dict[str, torch.Tensor]


@dataclass
class Update:
    site: str
    state: State
    num_samples: int  # as the site claims it
    metrics: dict[str, float]  # the reply's other metrics, as the round log records them
    privacy: DPRecord = field(default_factory=DPRecord)
    weight: float | None = None  # its FedAvg weight once bounded; None: num_samples

    @property
    def averaging_weight(self) -> float:
        return float(self.num_samples if self.weight is None else self.weight)


def trainable_keys(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def update_problem(
    update: Update,
    reference: State,
    max_norm: float,
    bounded: set[str],
    rules: AggregationRules | None = None,
) -> str | None:
    """Why ``update`` may not be averaged into ``reference``, or None if it may; the change of
    the ``bounded`` tensors must have an L2 norm within ``max_norm``."""
    rules = rules or AggregationRules()
    if update.num_samples < 1:
        return f"sample count {update.num_samples} is not positive"
    if update.num_samples > rules.max_samples_per_site:
        return (
            f"sample count {update.num_samples} exceeds the policy's max_samples_per_site "
            f"{rules.max_samples_per_site}"
        )
    missing = reference.keys() - update.state.keys()
    extra = update.state.keys() - reference.keys()
    if missing or extra:
        return f"keys differ (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    squared = 0.0
    for key, ref in reference.items():
        value = update.state[key]
        if value.shape != ref.shape:
            return f"{key}: shape {tuple(value.shape)} instead of {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype} instead of {ref.dtype}"
        if value.is_floating_point():
            if not torch.isfinite(value).all():
                return f"{key}: not finite"
            largest = float(value.abs().max()) if value.numel() else 0.0
            if largest > rules.max_abs_value:
                return f"{key}: value {largest:.3g} beyond the policy's max_abs_value"
        if key in bounded:
            squared += float((value.double() - ref.double()).square().sum())
    norm = squared**0.5
    if not norm <= max_norm:
        return f"change norm {norm:.3g} exceeds the bound {max_norm:.3g}"
    return None


def change_norm(state: State, reference: State, bounded: set[str]) -> float:
    return (
        sum(float((state[k].double() - reference[k].double()).square().sum()) for k in bounded)
        ** 0.5
    )


def lower_median(values: list[float]) -> float:
    """The median; of an even count the lower of the two middle values (with two sites: the
    smaller), so that one outlier can never raise it."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def bound_updates(
    updates: list[Update], reference: State, rules: AggregationRules
) -> tuple[list[Update], dict[str, dict]]:
    """The accepted updates with their weights capped at ``weight_cap_vs_median`` x the round's
    median sample count and each floating tensor's change scaled down to at most
    ``change_cap_vs_median`` x the round's median change of that tensor; and, per site that was
    bounded, what was done (for the round log)."""
    counts = [u.num_samples for u in updates]
    weight_cap = (
        None
        if rules.weight_cap_vs_median is None
        else rules.weight_cap_vs_median * lower_median(counts)
    )
    floating = [k for k, v in reference.items() if v.is_floating_point()]
    changes = {
        key: [float((u.state[key].double() - reference[key].double()).norm()) for u in updates]
        for key in floating
    }
    bounded, log = [], {}
    for i, update in enumerate(updates):
        note: dict = {}
        weight = float(update.num_samples)
        if weight_cap is not None and weight > weight_cap:
            note["weight"] = weight = weight_cap
        state = dict(update.state)
        if rules.change_cap_vs_median is not None:
            scaled = []
            for key in floating:
                limit = rules.change_cap_vs_median * lower_median(changes[key])
                if changes[key][i] > limit:
                    factor = limit / changes[key][i]
                    ref = reference[key].double()
                    state[key] = (ref + (state[key].double() - ref) * factor).to(
                        reference[key].dtype
                    )
                    scaled.append(factor)
            if scaled:
                note["tensors_scaled"] = len(scaled)
                note["smallest_scale"] = min(scaled)
        bounded.append(replace(update, state=state, weight=weight))
        if note:
            log[update.site] = note
    return bounded, log


def weighted_average(updates: list[Update]) -> State:
    """Weighted mean of floating tensors (by :attr:`Update.averaging_weight`); integer tensors
    (step counters), which cannot be averaged, are the sites' element-wise lower median."""
    total = sum(u.averaging_weight for u in updates)
    out: State = {}
    for key, value in updates[0].state.items():
        if value.is_floating_point():
            acc = torch.zeros_like(value, dtype=torch.float64)
            for u in updates:
                acc += u.state[key].double() * (u.averaging_weight / total)
            out[key] = acc.to(value.dtype)
        else:
            stacked = torch.stack([u.state[key] for u in updates])
            out[key] = stacked.sort(dim=0).values[(len(updates) - 1) // 2].clone()
    return out


def privacy_problem(
    record: DPRecord,
    dp_required: bool,
    max_epsilon: float | None,
    dp_round: DPRound | None = None,
    previous: DPRecord | None = None,
    trained: bool = False,
) -> str | None:
    """Why a reply's privacy record breaks the federation's policy or cannot be true, or None.

    Policy: a site without DP where DP is required; a DP site whose ε is above ``max_epsilon``
    (which applies to DP sites; whether sites without DP may take part is ``dp_required``'s to
    say). That a DP site reports its ε at all is the protocol's to check
    (:class:`policies.protocol.DPRecord`).

    Consistency, as far as the coordinator can check what only the site can compute (its
    accountant needs the site's sample rate and ledger): a DP site that ``trained`` this round
    says how (``dp_round``), has spent more than nothing and no more than the budget it says it
    planned with, and has not spent less than it reported before (``previous``: ledgers only
    grow)."""
    if dp_required and not record.dp:
        return "the federation requires differential privacy and the site trained without it"
    if not record.dp:
        return None
    if max_epsilon is not None and record.epsilon > max_epsilon * (1 + 1e-9):
        return f"ε {record.epsilon:.4g} exceeds the federation's max_epsilon {max_epsilon:g}"
    if previous is not None and previous.dp and record.epsilon < previous.epsilon * (1 - 1e-9):
        return (
            f"ε {record.epsilon:.4g} is below the {previous.epsilon:.4g} the site reported before"
        )
    if trained:
        if dp_round is None:
            return "a DP site that trained must report its noise, clipping and budget"
        if record.epsilon <= 0:
            return "ε 0 after DP-SGD steps"
        if record.epsilon > dp_round.epsilon_budget * (1 + 1e-9):
            return (
                f"ε {record.epsilon:.4g} exceeds the budget {dp_round.epsilon_budget:.4g} "
                "the site planned its noise for"
            )
    return None


def latent_range_outliers(
    ranges: dict[str, tuple[list[float], list[float]]], margin: float
) -> dict[str, str]:
    """The sites whose reported latent range (per channel low and high) reaches beyond the
    median range of the OTHER sites by more than ``margin`` x that range's width, on any
    channel, each with why: the agreed scale is the union of the ranges, so one site that
    reports a huge one would squash every site's latents into a sliver of [-1, 1]."""
    outliers = {}
    for site, (low, high) in ranges.items():
        others = [r for s, r in ranges.items() if s != site]
        if not others:
            continue
        lows = torch.tensor([r[0] for r in others], dtype=torch.float64)
        highs = torch.tensor([r[1] for r in others], dtype=torch.float64)
        median_low, median_high = lows.median(dim=0).values, highs.median(dim=0).values
        slack = margin * (highs - lows).median(dim=0).values
        below = torch.tensor(low, dtype=torch.float64) < median_low - slack
        above = torch.tensor(high, dtype=torch.float64) > median_high + slack
        if below.any() or above.any():
            channel = int(torch.nonzero(below | above)[0])
            outliers[site] = (
                f"latent range [{low[channel]:.3g}, {high[channel]:.3g}] of channel {channel} "
                f"reaches far beyond the other sites' [{float(median_low[channel]):.3g}, "
                f"{float(median_high[channel]):.3g}]"
            )
    return outliers


def calibration_ranges(
    replies: Iterable[tuple[str, SiteReply | str]],
    channels: int,
    dp_required: bool,
    margin: float,
) -> tuple[dict[str, tuple[list[float], list[float]]], list[str], dict[str, str]]:
    """The calibration's replies sorted out: each usable site's latent range, the sites that
    take part (a DP site takes part without a range), and why each other site does not (a
    failure, a refusal, no or a malformed range, an outlier)."""
    ranges, sites, problems = {}, [], {}
    for site, reply in replies:
        if isinstance(reply, str):
            problems[site] = reply
            continue
        problem = privacy_problem(reply.privacy, dp_required, None)
        if problem:
            problems[site] = f"rejected: {problem}"
        elif reply.latent_range_public:  # a DP site: no statistic of its data
            sites.append(site)
        elif reply.latent_low is None or len(reply.latent_low) != channels:
            problems[site] = f"rejected: no latent range of {channels} channels"
        elif any(lo > hi for lo, hi in zip(reply.latent_low, reply.latent_high, strict=True)):
            problems[site] = "rejected: a latent range whose low is above its high"
        else:
            ranges[site] = (reply.latent_low, reply.latent_high)
            sites.append(site)
    for site, problem in latent_range_outliers(ranges, margin).items():
        problems[site] = f"rejected: {problem}"
        del ranges[site]
        sites.remove(site)
    return ranges, sites, problems


def combined_privacy(*phases: dict[str, DPRecord]) -> dict[str, DPRecord]:
    """Per site over several phases, earliest first (:meth:`DPRecord.then`)."""
    out: dict[str, DPRecord] = {}
    for phase in phases:
        for site, record in phase.items():
            out[site] = out[site].then(record) if site in out else record
    return out
