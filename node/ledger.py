"""The privacy ledger of a cohort: every DP-SGD step ever taken on it, and what that costs.

A step of DP-SGD is one Poisson-subsampled Gaussian mechanism: each subject joins the batch with
probability ``sample_rate`` and the clipped gradient sum gets Gaussian noise of
``noise_multiplier`` times the clipping bound. The ledger keeps the accountant's state, which for
both Opacus accountants (RDP and PRV) is the same history of ``(noise_multiplier, sample_rate,
steps)``; the ε spent is computed from it at the policy's δ with the policy's accountant.

The ledger is a JSON file in the cohort folder (``privacy-ledger.json``), written atomically, so it
follows the data across rounds, phases and separate training runs: the same cohort trained twice
spends twice. A ledger that cannot be read is an error, never a fresh start (that would reset the
budget). Deleting the file does reset it: the ledger protects against mistakes, not against the
site's own operator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lsdm.atomic import atomic_write_text

LEDGER_NAME = "privacy-ledger.json"
FORMAT = 1
MIN_NOISE_MULTIPLIER = 0.3  # below this the accountants' bounds are loose and useless anyway

Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


class LedgerError(Exception):
    """The ledger file exists but cannot be trusted."""


class BudgetExceeded(Exception):
    """The planned steps do not fit in what is left of the budget."""


@dataclass(frozen=True)
class Segment:
    """Planned steps of one kind: ``steps`` steps at ``sample_rate``, each releasing
    ``mechanisms`` noisy gradients computed on the same batch (2 for a VQ-GAN step that trains
    the autoencoder and the discriminator)."""

    sample_rate: float
    steps: int
    mechanisms: int = 1

    def at(self, noise_multiplier: float) -> Mechanism:
        # k Gaussian mechanisms on one batch, each with noise sigma * C on a sum of sensitivity C,
        # are one Gaussian mechanism on the concatenation: sensitivity sqrt(k) C, same noise.
        return (noise_multiplier / math.sqrt(self.mechanisms), self.sample_rate, self.steps)


def epsilon_of(history: list[Mechanism], delta: float, accountant: str) -> float:
    """ε at ``delta`` of a history of subsampled Gaussian mechanisms, by Opacus's accountant."""
    history = [tuple(h) for h in history if h[2] > 0]
    if not history:
        return 0.0
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
    else:
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta))


def plan_noise(
    history: list[Mechanism],
    plan: list[Segment],
    target_epsilon: float,
    delta: float,
    accountant: str,
    max_noise_multiplier: float,
) -> float:
    """The smallest noise multiplier (within 1%) with which ``history`` plus every planned step
    stays within ``target_epsilon`` at ``delta``; :class:`BudgetExceeded` if even
    ``max_noise_multiplier`` does not fit."""

    def spent(sigma: float) -> float:
        return epsilon_of(history + [s.at(sigma) for s in plan], delta, accountant)

    already = epsilon_of(history, delta, accountant)
    steps = sum(s.steps for s in plan)
    if already >= target_epsilon:
        raise BudgetExceeded(
            f"the budget is spent: ε = {already:.3g} of {target_epsilon:g} at δ = {delta:g}"
        )
    if spent(max_noise_multiplier) > target_epsilon:
        raise BudgetExceeded(
            f"{steps} planned steps do not fit in the budget left (ε spent {already:.3g} of "
            f"{target_epsilon:g} at δ = {delta:g}) even with noise multiplier "
            f"{max_noise_multiplier:g}"
        )
    low, high = MIN_NOISE_MULTIPLIER, max_noise_multiplier
    if spent(low) <= target_epsilon:
        return low
    while high / low > 1.01:
        middle = math.sqrt(low * high)
        if spent(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


@dataclass
class Ledger:
    path: Path
    history: list[Mechanism] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def of_cohort(cls, cohort_root: Path) -> Ledger:
        return cls.load(Path(cohort_root) / LEDGER_NAME)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
            if any(not (s > 0 and 0 < q <= 1 and n >= 0) for s, q, n in history):
                raise ValueError("a mechanism with impossible values")
            return cls(path, history, list(data.get("rounds", [])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LedgerError(f"privacy ledger {path} cannot be read ({e})") from e

    def epsilon(self, delta: float, accountant: str) -> float:
        return epsilon_of(self.history, delta, accountant)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def record(self, spent: list[Mechanism], note: dict) -> None:
        """Add mechanisms to the history (merging runs of equal ones) and save atomically."""
        for sigma, rate, steps in spent:
            if steps <= 0:
                continue
            if self.history and self.history[-1][:2] == (sigma, rate):
                last = self.history.pop()
                self.history.append((sigma, rate, last[2] + steps))
            else:
                self.history.append((sigma, rate, steps))
        entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **note}
        entry["mechanisms"] = [list(m) for m in spent]
        self.rounds.append(entry)
        self.save()

    def save(self) -> None:
        data = {
            "format": FORMAT,
            "mechanism": "Poisson-subsampled Gaussian (DP-SGD); history of "
            "[noise_multiplier, sample_rate, steps]",
            "history": [list(h) for h in self.history],
            "rounds": self.rounds,
        }
        atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")
