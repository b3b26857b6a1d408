"""Fast checks of the federation's parts, in process: update validation and averaging, the
site's refusals (app carrying code, foreign vocabulary, DP it cannot give), one round of site
training, and the CLIs' one-line errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from typer.testing import CliRunner

from lsdm.config import preset
from lsdm.phantom import write_cohort
from lsdm.vqgan import VQGAN
from node.app_guard import ForbiddenApp, check_app_folder
from node.cli import app as node_app
from node.client_app import Refusal, pack, receive_bundle, run_round, unpack
from node.errors import UserError
from node.join import JoinSpec, check_join, pin_coordinator_key
from policies.federation import AggregationRules
from policies.protocol import DPRecord, DPRound, SiteReply
from server.aggregate import (
    Update,
    bound_updates,
    calibration_ranges,
    latent_range_outliers,
    privacy_problem,
    trainable_keys,
    update_problem,
    weighted_average,
)
from server.cli import app as server_app
from server.settings import APP_PYPROJECT

SHAPE = (16, 32, 32)
runner = CliRunner()


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3, 2), "b": torch.ones(2), "count": torch.tensor(5)}


def test_update_checks_name_each_problem():
    reference = _state()
    bounded = {"w", "b"}

    def problem(**changes):
        state = {**_state(), **changes}
        return update_problem(Update("s", state, 4, {}), reference, 1.0, bounded)

    assert problem() is None
    assert problem(w=torch.full((3, 2), 0.1)) is None  # norm 0.245
    assert "not finite" in problem(w=torch.tensor([[float("nan"), 0], [0, 0], [0, 0]]))
    assert "not finite" in problem(b=torch.tensor([float("inf"), 1.0]))
    assert "shape" in problem(w=torch.zeros(2, 3))
    assert "dtype" in problem(b=torch.ones(2, dtype=torch.float64))
    assert "exceeds the bound" in problem(w=torch.full((3, 2), 1.0))
    missing = {k: v for k, v in _state().items() if k != "b"}
    assert "keys differ" in update_problem(Update("s", missing, 4, {}), reference, 1.0, bounded)
    assert "sample count" in update_problem(Update("s", _state(), 0, {}), reference, 1, bounded)
    huge = Update("s", _state(), 10**9, {})
    assert "max_samples_per_site" in update_problem(huge, reference, 1.0, bounded)
    # buffers are not under the change bound, but under the policy's bound on any value
    assert "max_abs_value" in problem(b=torch.tensor([1e30, 1.0]))
    assert "max_abs_value" in update_problem(
        Update("s", {**_state(), "b": torch.tensor([5.0, 1.0])}, 4, {}),
        reference,
        1e9,
        bounded,
        AggregationRules(max_abs_value=4.0),
    )


def test_weighted_average_weights_by_samples_and_keeps_counters():
    a = Update("a", {"w": torch.full((2,), 1.0), "n": torch.tensor(7)}, 1, {})
    b = Update("b", {"w": torch.full((2,), 4.0), "n": torch.tensor(9)}, 3, {})
    average = weighted_average([a, b])
    assert average["w"].tolist() == [3.25, 3.25]
    assert average["n"].item() == 7  # the lower median: a site cannot choose it alone


def _trained_updates(tmp_path, sites: int) -> tuple[dict, list[dict]]:
    """The shared VQ-GAN's weights and what ``sites`` honest sites make of them in one round:
    real local training (10 steps) on each site's own phantom cohort."""
    from lsdm.data import open_cohort
    from lsdm.train_vqgan import train_vqgan

    config = preset("tiny").with_overrides(
        data={"shape": SHAPE}, train={"vqgan_steps": 10, "checkpoint_every": 10**6}
    )
    torch.manual_seed(0)
    reference = VQGAN(config.vqgan).state_dict()
    states = []
    for i in range(sites):
        write_cohort(tmp_path / f"c{i}", 3, SHAPE, seed=i)
        cohort = open_cohort(tmp_path / f"c{i}")
        run = train_vqgan(cohort, config.with_overrides(train={"seed": 0}), tmp_path / f"v{i}")
        states.append({k: v.detach().clone() for k, v in run.model.state_dict().items()})
    return reference, states


def _distance(a: dict, b: dict) -> float:
    keys = [k for k, v in a.items() if v.is_floating_point()]
    return sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys) ** 0.5


def test_a_lying_site_moves_the_model_no_further_than_an_honest_one(tmp_path):
    """Three sites train for real; the third then lies, within every static check: it claims
    the largest cohort the policy allows and sends its change of every tensor, codebook and
    counters included, scaled up 30x. After bounding, the shared model moves away from the
    honest pair's average no further than it does with the third site honest."""
    reference, (alpha, beta, honest) = _trained_updates(tmp_path, 3)
    rules = AggregationRules()
    scaled = {
        k: (reference[k] + 30 * (v - reference[k])) if v.is_floating_point() else v
        for k, v in honest.items()
    }
    trained = trainable_keys(VQGAN(preset("tiny").vqgan))
    liar = Update("mallory", scaled, rules.max_samples_per_site, {})
    assert update_problem(liar, reference, 1e9, trained, rules) is None  # passes static checks

    def shared(third: Update) -> dict:
        updates = [Update("alpha", alpha, 3, {}), Update("beta", beta, 3, {}), third]
        bounded, log = bound_updates(updates, reference, rules)
        return weighted_average(bounded), log

    pair = weighted_average([Update("alpha", alpha, 3, {}), Update("beta", beta, 3, {})])
    with_honest, _ = shared(Update("carol", honest, 3, {}))
    with_liar, log = shared(liar)
    honest_pull, liar_pull = _distance(with_honest, pair), _distance(with_liar, pair)
    unbounded = weighted_average([Update("alpha", alpha, 3, {}), Update("beta", beta, 3, {}), liar])
    assert _distance(unbounded, pair) > 20 * honest_pull  # what plain FedAvg would have done
    assert liar_pull <= 1.5 * honest_pull, (liar_pull, honest_pull)
    assert log["mallory"]["weight"] == 3 and log["mallory"]["tensors_scaled"] > 30
    # the codebook, which no gradient trains and no static norm bounds, is bounded too
    key = "autoencoder.quantizer.quantizer.embedding.weight"
    assert _distance({key: with_liar[key]}, {key: pair[key]}) <= 1.5 * _distance(
        {key: with_honest[key]}, {key: pair[key]}
    )


def test_bounding_leaves_honest_equal_sites_nearly_alone():
    reference = {"w": torch.zeros(4)}
    updates = [Update(s, {"w": torch.full((4,), v)}, 5, {}) for s, v in (("a", 1.0), ("b", 1.0))]
    bounded, log = bound_updates(updates, reference, AggregationRules())
    assert log == {} and weighted_average(bounded)["w"].tolist() == [1.0] * 4
    off = AggregationRules(weight_cap_vs_median=None, change_cap_vs_median=None)
    big = Update("c", {"w": torch.full((4,), 9.0)}, 100, {})
    bounded, log = bound_updates([*updates, big], reference, off)
    plain = (5 * 1.0 + 5 * 1.0 + 100 * 9.0) / 110  # FedAvg as claimed
    assert log == {} and weighted_average(bounded)["w"].tolist() == pytest.approx([plain] * 4)


def test_one_huge_latent_range_is_left_out_of_the_calibration():
    honest = {"alpha": ([-1.0, -2.0], [1.0, 2.0]), "beta": ([-1.2, -1.8], [0.9, 2.1])}
    assert latent_range_outliers(honest, 0.5) == {}
    squash = {**honest, "mallory": ([-1.0, -1e6], [1.0, 2.0])}
    assert list(latent_range_outliers(squash, 0.5)) == ["mallory"]
    assert "channel 1" in latent_range_outliers(squash, 0.5)["mallory"]
    two = {"alpha": honest["alpha"], "mallory": ([-50.0, -2.0], [1.0, 2.0])}
    assert list(latent_range_outliers(two, 0.5)) == ["mallory"]


def test_calibration_keeps_usable_ranges_and_says_why_of_the_others():
    dp = DPRecord(dp=True, epsilon=1.0, delta=1e-5)

    def reply(low=None, high=None, **fields):
        return SiteReply(num_samples=3, latent_low=low, latent_high=high, **fields)

    replies = [
        ("alpha", reply([-1.0, -2.0], [1.0, 2.0])),
        ("beta", reply([-1.2, -1.8], [0.9, 2.1])),
        ("dp-site", reply(latent_range_public=True, privacy=dp)),
        ("no-range", reply()),
        ("three-channels", reply([0.0] * 3, [1.0] * 3)),
        ("upside-down", reply([1.0, 1.0], [-1.0, -1.0])),
        ("squasher", reply([-1e6, -2.0], [1.0, 2.0])),
        ("failed", "site failed: node unavailable"),
    ]
    ranges, sites, problems = calibration_ranges(replies, 2, False, 0.5)
    assert sorted(ranges) == ["alpha", "beta"]
    assert sites == ["alpha", "beta", "dp-site"]
    assert "no latent range of 2 channels" in problems["no-range"]
    assert "no latent range of 2 channels" in problems["three-channels"]
    assert "low is above its high" in problems["upside-down"]
    assert "reaches far beyond" in problems["squasher"]
    assert problems["failed"] == "site failed: node unavailable"
    _, _, required = calibration_ranges(replies[:2], 2, True, 0.5)
    assert "requires differential privacy" in required["alpha"]


def test_reported_epsilon_must_be_consistent():
    plan = DPRound(noise_multiplier=1.0, max_grad_norm=1.0, epsilon_budget=4.0)
    spent = DPRecord(dp=True, epsilon=2.0, delta=1e-5)
    assert privacy_problem(spent, True, 10.0, plan, previous=None, trained=True) is None
    earlier = DPRecord(dp=True, epsilon=3.0, delta=1e-5)
    assert "below the 3" in privacy_problem(spent, True, 10.0, plan, earlier, trained=True)
    assert "budget 1" in privacy_problem(
        spent, True, 10.0, plan.model_copy(update={"epsilon_budget": 1.0}), None, trained=True
    )
    nothing = DPRecord(dp=True, epsilon=0.0, delta=1e-5)
    assert "ε 0" in privacy_problem(nothing, True, 10.0, plan, None, trained=True)
    assert "noise, clipping" in privacy_problem(spent, True, 10.0, None, None, trained=True)
    assert "max_epsilon" in privacy_problem(spent, True, 1.0, plan, None, trained=True)


def test_codebook_buffers_are_not_bounded_but_trained_weights_are():
    keys = trainable_keys(VQGAN(preset("tiny").vqgan))
    assert "autoencoder.quantizer.quantizer.embedding.weight" not in keys
    assert any(k.startswith("discriminator.") for k in keys)
    assert any(k.startswith("autoencoder.encoder") for k in keys)


def test_site_refuses_an_app_that_carries_code(tmp_path):
    (tmp_path / "pyproject.toml").write_text(APP_PYPROJECT)
    check_app_folder(tmp_path)
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "client_app.py").write_text("import os\n")
    with pytest.raises(ForbiddenApp, match="carries files"):
        check_app_folder(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_text(APP_PYPROJECT.replace("node.client_app:app", "evil:app"))
    with pytest.raises(ForbiddenApp, match="evil:app"):
        check_app_folder(other)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    write_cohort(root / "cohort", subjects=3, shape=SHAPE, seed=7)
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump({"kind": "site", "name": "site", "dp": {"enabled": False}}))
    from lsdm.data import open_cohort

    labels = open_cohort(root / "cohort").labels
    node_config = {"cohort": str(root / "cohort"), "policy": str(policy),
                   "workdir": str(root / "work"), "threads": 1}  # fmt: skip
    return root, labels, node_config


def _content(vocabulary: dict, phase: str = "vqgan", **overrides) -> RecordDict:
    config = {
        "phase": phase,
        "round": 1,
        "preset": "tiny",
        "shape": json.dumps(list(SHAPE)),
        "labels": json.dumps({str(k): v for k, v in vocabulary.items()}),
        "local_steps": 2,
        "step_offset": 0,
        "seed": 1,
        "dp_required": False,
    } | overrides
    model = VQGAN(preset("tiny").vqgan)
    return RecordDict({"arrays": pack(model.state_dict()), "config": ConfigRecord(config)})


def test_site_round_trains_and_sends_only_weights_and_aggregates(site):
    _, labels, node_config = site
    reply = run_round(_content(labels), node_config)
    assert set(reply.array_records) == {"arrays"}
    state = unpack(reply.array_records["arrays"])
    assert set(state) == set(VQGAN(preset("tiny").vqgan).state_dict())  # one blob, every tensor
    metrics = dict(reply.metric_records["metrics"])
    assert metrics["num_samples"] == 3
    assert set(metrics) == {"num_samples", "recon_l1", "quantisation", "train_seconds"}
    calibration = run_round(_content(labels, phase="calibrate"), node_config)
    assert not calibration.array_records
    calibration_metrics = dict(calibration.metric_records["metrics"])
    assert set(calibration_metrics) == {"num_samples", "latent_low", "latent_high"}
    channels = preset("tiny").vqgan.embedding_dim
    assert (
        len(calibration_metrics["latent_low"])
        == len(calibration_metrics["latent_high"])
        == channels
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"labels": json.dumps({"0": "background", "1": "tumour"})}, "vocabulary"),
        ({"dp_required": True}, "differential privacy"),
        ({"phase": "segmentation"}, "unknown phase"),
        ({"preset": "huge"}, "unknown model preset"),
    ],
)
def test_site_refuses_rounds_it_must_not_train(site, overrides, reason):
    from node.client_app import Refusal

    _, labels, node_config = site
    with pytest.raises(Refusal, match=reason):
        run_round(_content(labels, **overrides), node_config)


@pytest.fixture
def coordinator_folder(tmp_path):
    folder = tmp_path / "coordinator"
    assert runner.invoke(server_app, ["init", str(folder)]).exit_code == 0
    return folder


def test_join_checks_dp_ledgers_and_pins_the_coordinator_key(site, tmp_path, coordinator_folder):
    root, _, _ = site
    runner.invoke(node_app, ["keygen", str(tmp_path / "keys")])
    spec = JoinSpec("127.0.0.1:9", coordinator_folder / "tls" / "ca.pem",
                    tmp_path / "keys" / "site_key", root / "cohort", "strict", tmp_path / "work",
                    coordinator_key=coordinator_folder / "signing.pub.pem")  # fmt: skip
    check_join(spec)  # a DP policy joins; its ledger is read up front
    pinned = pin_coordinator_key(spec)
    assert pinned.read_bytes() == (coordinator_folder / "signing.pub.pem").read_bytes()

    other = tmp_path / "other"
    assert runner.invoke(server_app, ["init", str(other)]).exit_code == 0
    with pytest.raises(UserError, match="pins another coordinator key"):
        check_join(replace(spec, coordinator_key=other / "signing.pub.pem"))
    with pytest.raises(UserError, match="not a PEM public key"):
        check_join(replace(spec, coordinator_key=coordinator_folder / "tls" / "ca.pem"))

    ledger = root / "cohort" / "privacy-ledger.json"
    ledger.write_text("{not json")
    try:
        with pytest.raises(UserError):
            check_join(spec)
    finally:
        ledger.unlink()


def test_site_stores_only_a_bundle_that_verifies(site, coordinator_folder):
    _, _, node_config = site
    content = RecordDict(
        {"bundle": ArrayRecord({"bytes": Array(np.frombuffer(b"not a bundle", dtype=np.uint8))})}
    )
    with pytest.raises(Refusal, match="no coordinator key pinned"):
        receive_bundle(content, node_config)
    dest = Path(node_config["workdir"]) / "generator.lsdm"
    pinned = {"coordinator_key": str(coordinator_folder / "signing.pub.pem"), "bundle": str(dest)}
    with pytest.raises(Refusal, match="generator bundle refused"):
        receive_bundle(content, node_config | pinned)
    assert not dest.exists()


def test_keygen_never_overwrites(tmp_path):
    assert runner.invoke(node_app, ["keygen", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "site_key").stat().st_mode & 0o777 == 0o600
    result = runner.invoke(node_app, ["keygen", str(tmp_path)])
    assert result.exit_code == 2 and "exists already" in result.output


def test_server_cli_errors_are_one_line(tmp_path: Path):
    result = runner.invoke(server_app, ["serve", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a coordinator folder" in result.output
    folder = tmp_path / "coordinator"
    assert (
        runner.invoke(server_app, ["init", str(folder), "--host", "fed.example.org"]).exit_code == 0
    )
    assert runner.invoke(server_app, ["init", str(folder)]).exit_code == 2
    assert runner.invoke(node_app, ["keygen", str(tmp_path / "k")]).exit_code == 0
    key = str(tmp_path / "k" / "site_key.pub")
    assert runner.invoke(server_app, ["register", str(folder), key, "--name", "a"]).exit_code == 0
    again = runner.invoke(server_app, ["register", str(folder), key, "--name", "b"])
    assert again.exit_code == 2 and "registered already" in again.output
    bad = runner.invoke(server_app, ["register", str(folder), key, "--name", "../x"])
    assert bad.exit_code == 2
    private = runner.invoke(
        server_app, ["register", str(folder), str(tmp_path / "k" / "site_key"), "--name", "c"]
    )
    assert private.exit_code == 2
    no_checkpoint = runner.invoke(server_app, ["serve", str(folder), "--resume"])
    assert no_checkpoint.exit_code == 2 and "nothing to resume" in no_checkpoint.output
    sites = runner.invoke(server_app, ["sites", str(folder)])
    assert sites.exit_code == 0 and " a " in sites.output


def test_server_certificate_names_the_hosts(tmp_path):
    from cryptography import x509

    folder = tmp_path / "c"
    runner.invoke(
        server_app, ["init", str(folder), "--host", "fed.example.org", "--host", "10.0.0.5"]
    )
    cert = x509.load_pem_x509_certificate((folder / "tls" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fed.example.org" in names.get_values_for_type(x509.DNSName)
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    assert (folder / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert list((folder / "app").iterdir()) == [folder / "app" / "pyproject.toml"]
