"""The privacy ledger and accounting (node/ledger.py): ε as Opacus's accountants compute it, kept on
disk and read by a new process, and noise planned to spend a budget over a whole plan."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from opacus.accountants import PRVAccountant, RDPAccountant

from node.ledger import BudgetExceeded, Ledger, Segment, epsilon_of, plan_noise

BIN = Path(sys.executable).parent


def test_epsilon_grows_as_the_accountant_says_and_persists(tmp_path):
    ledger = Ledger.of_cohort(tmp_path)
    assert ledger.epsilon(1e-5, "rdp") == 0.0
    accountant = RDPAccountant()
    epsilons = []
    for sigma, steps in ((1.2, 30), (1.2, 30), (0.9, 10)):
        ledger.record([(sigma, 0.25, steps)], {"phase": "vqgan", "round": len(epsilons) + 1})
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=0.25)
        epsilons.append(ledger.epsilon(1e-5, "rdp"))
        assert epsilons[-1] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert ledger.history == [(1.2, 0.25, 60), (0.9, 0.25, 10)]  # runs of equal steps merged
    # a new process reading the ledger from disk
    (tmp_path / "cohort.json").write_text("{}")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"kind": "site", "name": "p", "dp": {"target_epsilon": 50}}))
    shown = subprocess.run(
        [str(BIN / "lsdm-node"), "privacy", str(tmp_path), "--policy", str(policy)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spent = float(shown.split("ε spent: ")[1].split()[0])
    left = float(shown.split("ε left: ")[1].split()[0])
    assert spent == pytest.approx(epsilons[-1], rel=1e-3)
    assert left == pytest.approx(50 - epsilons[-1], rel=1e-3)
    assert Ledger.of_cohort(tmp_path).history == ledger.history


def test_the_prv_accountant_reads_the_same_ledger_and_plans_within_the_budget(tmp_path):
    ledger = Ledger.of_cohort(tmp_path)
    accountant = PRVAccountant()
    for sigma, steps in ((1.1, 300), (0.9, 100)):
        ledger.record([(sigma, 0.05, steps)], {"phase": "ldm", "round": 1})
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=0.05)
    prv = Ledger.of_cohort(tmp_path).epsilon(1e-5, "prv")
    assert prv == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    assert prv < ledger.epsilon(1e-5, "rdp")  # the tighter accountant of the two
    plan = [Segment(0.05, 200, 1)]
    sigma = plan_noise(ledger.history, plan, 8.0, 1e-5, "prv", 10.0)
    spent = epsilon_of(ledger.history + [s.at(sigma) for s in plan], 1e-5, "prv")
    assert 0.97 * 8.0 < spent <= 8.0


def test_noise_is_planned_to_spend_the_budget_over_the_whole_plan():
    plan = [Segment(0.25, 100, 1), Segment(0.25, 100, 2), Segment(0.5, 200, 1)]
    sigma = plan_noise([], plan, 8.0, 1e-5, "rdp", 10.0)
    spent = epsilon_of([s.at(sigma) for s in plan], 1e-5, "rdp")
    assert 0.95 * 8.0 < spent <= 8.0
    # history counts: a cohort that has spent part of its budget needs more noise
    history = [(3.0, 0.25, 100)]
    assert plan_noise(history, plan, 8.0, 1e-5, "rdp", 10.0) > sigma
    with pytest.raises(BudgetExceeded, match="do not fit"):
        plan_noise([], [Segment(1.0, 100_000, 1)], 0.5, 1e-5, "rdp", 2.0)
    with pytest.raises(BudgetExceeded, match="spent"):
        plan_noise([(0.5, 1.0, 1000)], plan, 8.0, 1e-5, "rdp", 10.0)
