"""Checking site updates and averaging them (FedAvg weighted by sample count).

An update is a full state dict (the site's weights after its local steps). Before it is averaged
it must: hold exactly the shared model's keys, with the same shapes and dtypes; be finite
everywhere; and differ from the weights that were sent out by an L2 norm (over all floating
tensors together) within the coordinator's bound. A rejected update is logged with its reason
and never averaged in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policies.protocol import DPRecord

State = dict[str, torch.Tensor]


@dataclass
class Update:
    site: str
    state: State
    num_samples: int
    metrics: dict[str, float]  # the reply's other metrics, as the round log records them
    privacy: DPRecord = field(default_factory=DPRecord)


def trainable_keys(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def update_problem(
    update: Update, reference: State, max_norm: float, bounded: set[str]
) -> str | None:
    """Why ``update`` may not be averaged into ``reference``, or None if it may; the change of
    the ``bounded`` tensors must have an L2 norm within ``max_norm``."""
    if update.num_samples < 1:
        return f"sample count {update.num_samples} is not positive"
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
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key}: not finite"
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


def weighted_average(updates: list[Update]) -> State:
    """Sample-weighted mean of floating tensors; integer tensors (step counters) from the site
    with the most samples, since they cannot be averaged."""
    total = sum(u.num_samples for u in updates)
    largest = max(updates, key=lambda u: u.num_samples)
    out: State = {}
    for key, value in largest.state.items():
        if value.is_floating_point():
            acc = torch.zeros_like(value, dtype=torch.float64)
            for u in updates:
                acc += u.state[key].double() * (u.num_samples / total)
            out[key] = acc.to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def privacy_problem(record: DPRecord, dp_required: bool, max_epsilon: float | None) -> str | None:
    """Why a reply's privacy record breaks the federation's policy, or None: a site without DP
    where DP is required; a DP site whose ε is above ``max_epsilon`` (which applies to DP sites;
    whether sites without DP may take part is ``dp_required``'s to say). That a DP site reports
    its ε at all is the protocol's to check (:class:`policies.protocol.DPRecord`)."""
    if dp_required and not record.dp:
        return "the federation requires differential privacy and the site trained without it"
    if record.dp and max_epsilon is not None and record.epsilon > max_epsilon * (1 + 1e-9):
        return f"ε {record.epsilon:.4g} exceeds the federation's max_epsilon {max_epsilon:g}"
    return None


def combined_privacy(*phases: dict[str, DPRecord]) -> dict[str, DPRecord]:
    """Per site over several phases, earliest first (:meth:`DPRecord.then`)."""
    out: dict[str, DPRecord] = {}
    for phase in phases:
        for site, record in phase.items():
            out[site] = out[site].then(record) if site in out else record
    return out
