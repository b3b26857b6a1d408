"""Federations with DP sites, real processes on 127.0.0.1 (tiny preset, 16x32x32 phantoms, one
round per phase, two local steps): one DP site beside one site without DP completes when the
federation allows it, and the site without DP is refused when the federation requires DP. Both
federations run at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lsdm.checkpoint import read_metadata
from node.ledger import Ledger
from tests.test_federation import (
    Processes,
    free_port,
    join,
    make_coordinator,
    make_site,
    rounds,
    serve,
    wait_for_port,
    wait_until,
)


@pytest.fixture(scope="module")
def processes():
    procs = Processes()
    yield procs
    procs.kill_all()


def _private(site: dict, epsilon: float) -> dict:
    site["policy"].write_text(
        yaml.safe_dump({"kind": "site", "name": "private", "dp": {"target_epsilon": epsilon}})
    )
    return site


def _federation(root: Path, processes: Processes, dp_required: bool) -> dict:
    coordinator = make_coordinator(root, {"vqgan": 1, "diffusion": 1}, min_sites=1,
                                   max_update_norm=50.0)  # fmt: skip
    policy = coordinator / "federation.yaml"
    values = yaml.safe_load(policy.read_text())
    values.update(dp_required=dp_required, max_epsilon=10.0)
    policy.write_text(yaml.safe_dump(values))
    sites = {
        "private": _private(make_site(root, "private", 4, 1, coordinator), epsilon=8.0),
        "open": make_site(root, "open", 3, 2, coordinator),
    }
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = serve(processes, coordinator, address)
    wait_for_port(port)
    for site in sites.values():
        join(processes, site, address, coordinator / "tls" / "ca.pem")
    return {"coordinator": coordinator, "server": server, "sites": sites}


@pytest.fixture(scope="module")
def federations(tmp_path_factory, processes):
    started = {
        required: _federation(tmp_path_factory.mktemp(f"dp-{required}"), processes, required)
        for required in (False, True)
    }
    for fed in started.values():
        wait_until(
            lambda fed=fed: any(e["event"] == "finished" for e in rounds(fed["coordinator"])),
            400,
            "the federation to finish",
            fed["server"],
        )
        assert fed["server"].wait(timeout=60) == 0
    return started


def _round_entries(coordinator: Path) -> list[dict]:
    return [e for e in rounds(coordinator) if e["event"] == "round"]


def test_a_dp_site_and_a_site_without_dp_train_together_when_allowed(federations):
    fed = federations[False]
    coordinator, private_cohort = fed["coordinator"], fed["sites"]["private"]["cohort"]
    entries = _round_entries(coordinator)
    assert [(e["round"], e["outcome"]) for e in entries] == [(1, "aggregated"), (2, "aggregated")]
    epsilons = []
    for entry in entries:
        assert sorted(entry["accepted"]) == ["open", "private"] and not entry["rejected"]
        private, open_ = entry["accepted"]["private"], entry["accepted"]["open"]
        assert private["dp"] == 1 and private["delta"] == 1e-5
        assert "dp" not in open_ and {"recon_l1", "loss"} & set(open_)
        assert not {"recon_l1", "loss"} & set(private)  # a DP site sends no noiseless losses
        epsilons.append(private["epsilon"])
    assert 0 < epsilons[0] < epsilons[1] <= 8.0
    # the ledger at the site says what the coordinator was told
    assert Ledger.of_cohort(private_cohort).epsilon(1e-5, "rdp") == pytest.approx(epsilons[1])
    assert Ledger.of_cohort(private_cohort).steps == 4
    calibration = next(e for e in rounds(coordinator) if e["event"] == "calibrated")
    assert sorted(calibration["sites"]) == ["open", "private"]
    assert calibration["range_from"] == "sites"  # the open site's range; the DP site sent none

    # provenance: per site, DP or not and (ε, δ)
    state = coordinator / "state"
    vqgan = read_metadata(state / "vqgan.safetensors")["privacy"]
    ldm = read_metadata(state / "ldm.safetensors")["privacy"]
    assert vqgan["private"] == {"dp": True, "epsilon": epsilons[0], "delta": 1e-5}
    assert ldm["private"] == {"dp": True, "epsilon": epsilons[1], "delta": 1e-5}
    assert ldm["open"] == vqgan["open"] == {"dp": False, "epsilon": None, "delta": None}
    assert read_metadata(state / "federation.safetensors")["privacy"]["diffusion"] == {
        "private": ldm["private"],
        "open": ldm["open"],
    }


def test_a_site_without_dp_is_refused_when_the_federation_requires_dp(federations):
    fed = federations[True]
    coordinator = fed["coordinator"]
    entries = _round_entries(coordinator)
    assert [(e["round"], e["outcome"]) for e in entries] == [(1, "aggregated"), (2, "aggregated")]
    for entry in entries:
        assert list(entry["accepted"]) == ["private"]
        assert "requires differential privacy" in entry["rejected"]["open"]
    calibration = next(e for e in rounds(coordinator) if e["event"] == "calibrated")
    assert calibration["sites"] == ["private"] and "open" in calibration["problems"]
    assert calibration["range_from"] == "codebook"  # no site sent a statistic of its data
    ldm = read_metadata(coordinator / "state" / "ldm.safetensors")["privacy"]
    assert set(ldm) == {"private"} and ldm["private"]["dp"] is True
