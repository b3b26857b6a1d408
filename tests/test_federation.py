"""Federated training with real processes on 127.0.0.1: a coordinator (SuperLink behind the
fleet gateway, ServerApp) and sites (SuperNodes running the guarded ClientApp), tiny preset,
16x32x32 phantom volumes, two local steps per round.

One federation runs for the whole module: two honest sites and one that spoils its weights.
While it trains, the security checks run against its public address; then its results are
checked. A second coordinator is killed after its first round and resumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from lsdm.bundle import load_public_key, verify_bundle
from lsdm.loopback import free_port
from lsdm.phantom import write_cohort
from node.cli import app as node_app
from node.join import JoinSpec, supernode_command
from policies.federation import AggregationRules
from server.aggregate import Update, bound_updates, weighted_average
from server.cli import app as server_app
from server.serve import descendants

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHAPE = (16, 32, 32)
runner = CliRunner()


class Processes:
    """Child processes, each in its own session, all killed (with their children) at teardown."""

    def __init__(self):
        self.running: list[subprocess.Popen] = []

    def start(self, command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        env = {**(env or os.environ), "PYTHONPATH": str(REPO)}
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.running.append(process)
        return process

    def kill(self, process: subprocess.Popen) -> None:
        """Kill ``process`` and everything it started, as a crash of its machine would."""
        family = descendants(process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)

    def kill_all(self) -> None:
        for process in self.running:
            self.kill(process)


@pytest.fixture(scope="module")
def processes():
    procs = Processes()
    yield procs
    procs.kill_all()


def invoke(app, args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def make_coordinator(root: Path, rounds: dict, min_sites: int, **settings) -> Path:
    policy = root / "federation-policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "kind": "federation",
                "name": "test",
                "model_preset": "tiny",
                "rounds": rounds,
                "min_sites": min_sites,
                "dp_required": False,
            }
        )
    )
    folder = root / "coordinator"
    invoke(server_app, ["init", str(folder), "--policy", str(policy)])
    path = folder / "coordinator.yaml"
    values = yaml.safe_load(path.read_text())
    values.update(
        shape=list(SHAPE),
        local_steps={"vqgan": 2, "diffusion": 2},
        wait_for_sites_s=180,
        round_timeout_s=300,
        **settings,
    )
    path.write_text(yaml.safe_dump(values))
    return folder


def make_site(root: Path, name: str, subjects: int, seed: int, coordinator: Path | None) -> dict:
    site = root / name
    write_cohort(site / "cohort", subjects=subjects, shape=SHAPE, seed=seed)
    invoke(node_app, ["keygen", str(site / "keys")])
    if coordinator is not None:
        invoke(server_app, ["register", str(coordinator), str(site / "keys" / "site_key.pub"),
                            "--name", name])  # fmt: skip
    policy = site / "policy.yaml"
    policy.write_text(
        yaml.safe_dump({"kind": "site", "name": "test-site", "dp": {"enabled": False}})
    )
    return {"dir": site, "cohort": site / "cohort", "key": site / "keys" / "site_key",
            "policy": policy}  # fmt: skip


def join(processes: Processes, site: dict, address: str, ca: Path) -> subprocess.Popen:
    signing_key = Path(ca).parents[1] / "signing.pub.pem"  # beside tls/ in the coordinator folder
    command = [str(BIN / "lsdm-node"), "join", "--server", address, "--ca", str(ca),
               "--key", str(site["key"]), "--cohort", str(site["cohort"]),
               "--policy", str(site["policy"]), "--workdir", str(site["dir"] / "work"),
               "--coordinator-key", str(signing_key)]  # fmt: skip
    return processes.start(command, site["dir"] / "join.log")


def serve(processes: Processes, coordinator: Path, address: str, resume: bool = False):
    command = [str(BIN / "lsdm-server"), "serve", str(coordinator), "--address", address]
    return processes.start(command + (["--resume"] if resume else []), coordinator / "serve.log")


def rounds(coordinator: Path) -> list[dict]:
    log = coordinator / "state" / "rounds.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def wait_until(predicate, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_port(port: int, timeout: float = 60) -> None:
    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(listening, timeout, f"port {port}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory, processes):
    """Coordinator + alpha (4 subjects) + beta (3) + mallory (3, lies in every phase:
    tests/test_federation_evil_app.py)."""
    root = tmp_path_factory.mktemp("federation")
    coordinator = make_coordinator(
        root, {"vqgan": 1, "diffusion": 1}, min_sites=2, keep_updates=True, max_update_norm=50.0
    )
    sites = {
        "alpha": make_site(root, "alpha", 4, 1, coordinator),
        "beta": make_site(root, "beta", 3, 2, coordinator),
        "mallory": make_site(root, "mallory", 3, 3, coordinator),
    }
    port = free_port()
    address = f"127.0.0.1:{port}"
    ca = coordinator / "tls" / "ca.pem"
    server = serve(processes, coordinator, address)
    wait_for_port(port)
    join(processes, sites["alpha"], address, ca)
    join(processes, sites["beta"], address, ca)
    spec = JoinSpec(address, ca, sites["mallory"]["key"], sites["mallory"]["cohort"],
                    str(sites["mallory"]["policy"]), sites["mallory"]["dir"] / "work")  # fmt: skip
    command, env = supernode_command(spec)
    shim = sites["mallory"]["dir"] / "work" / "bin" / "flwr-clientapp"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tests.test_federation_evil_app "$@"\n')
    processes.start(command, sites["mallory"]["dir"] / "join.log", env)
    return {"root": root, "coordinator": coordinator, "address": address, "port": port,
            "ca": ca, "server": server, "sites": sites}  # fmt: skip


def test_control_api_is_refused_on_the_public_address(federation):
    url = f"https://{federation['address']}"
    verify = ssl.create_default_context(cafile=str(federation["ca"]))
    with httpx.Client(verify=verify, timeout=10) as client:
        for path in ["/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-nodes"]:
            response = client.post(url + path, content=b"")
            assert response.status_code == 403, path
        assert client.get(url + "/v1/fleet/pull-messages").status_code == 403
    # the Control API itself works, on loopback only, where the coordinator's own CLI talks to it
    config = (federation["coordinator"] / "state" / "flwr-home" / "config.toml").read_text()
    control = config.split('address = "')[1].split('"')[0]
    assert control.startswith("127.0.0.1:") and control != federation["address"]


def test_site_without_tls_is_refused(federation):
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://{federation['address']}/v1/fleet/register-node", timeout=10)
    # a SuperNode without TLS never gets through: it only ever retries
    env = {**os.environ, "FLWR_HOME": str(federation["root"] / "insecure-home")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    command = [str(BIN / "flower-supernode"), "--insecure", "--superlink", federation["address"],
               "--port", str(free_port())]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    assert "Connection attempt failed" in output
    assert "Received" not in output


def test_site_with_unregistered_key_is_refused(federation, tmp_path):
    site = make_site(tmp_path, "stranger", 2, 9, coordinator=None)
    spec = JoinSpec(federation["address"], federation["ca"], site["key"], site["cohort"],
                    str(site["policy"]), site["dir"] / "work")  # fmt: skip
    command, env = supernode_command(spec)
    log = site["dir"] / "supernode.log"
    with open(log, "wb") as out:  # a file, not a pipe: the SuperNode's children inherit it
        process = subprocess.Popen(
            [*command, "--max-retries", "1", "--max-wait-time", "20"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        returncode = process.wait(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert returncode != 0
    assert "Failed to activate SuperNode" in log.read_text()


def _site_state(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    with safe_open(str(path), framework="pt") as f:
        keys = f.keys()
        return {k: f.get_tensor(k) for k in keys}, int(f.metadata()["num_samples"])


def _model(path: Path, name: str) -> dict[str, torch.Tensor]:
    prefix = f"model/{name}/"
    with safe_open(str(path), framework="pt") as f:
        keys = f.keys()
        return {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}


def test_two_sites_complete_both_phases_and_a_lying_site_is_rejected_or_bounded(federation):
    coordinator = federation["coordinator"]
    wait_until(
        lambda: any(e["event"] == "finished" for e in rounds(coordinator)),
        420,
        "the federation to finish",
        federation["server"],
    )
    assert federation["server"].wait(timeout=60) == 0
    entries = [e for e in rounds(coordinator) if e["event"] == "round"]
    assert [(e["round"], e["phase"], e["outcome"]) for e in entries] == [
        (1, "vqgan", "aggregated"),
        (2, "diffusion", "aggregated"),
    ]
    first, second = entries
    assert sorted(first["accepted"]) == ["alpha", "beta"]
    assert "max_abs_value" in first["rejected"]["mallory"]  # its codebook of 1e30
    assert (
        first["accepted"]["alpha"]["num_samples"],
        first["accepted"]["beta"]["num_samples"],
    ) == (4, 3)
    assert first["accepted"]["alpha"]["train_seconds"] > 0
    assert entries[1]["bytes_down"] > entries[0]["bytes_down"] > 0  # phase 2 adds the VQ-GAN
    assert entries[0]["bytes_up"]["alpha"] > 0
    # mallory's diffusion update passes every static check, and is bounded: the weight of the
    # round's median sample count, its EMA weights' change scaled down to the median change
    assert sorted(second["accepted"]) == ["alpha", "beta", "mallory"]
    assert second["accepted"]["mallory"]["num_samples"] == AggregationRules().max_samples_per_site
    assert second["bounded"]["mallory"]["weight"] == 4
    assert second["bounded"]["mallory"]["tensors_scaled"] > 10

    # the shared weights are what the coordinator's rules make of the updates the sites sent:
    # bounded against each other, then averaged by their (capped) sample counts
    state = coordinator / "state"
    finals = {1: _model(state / "vqgan.safetensors", "vqgan"),
              2: _model(state / "ldm.safetensors", "ldm")}  # fmt: skip
    for round_, final in finals.items():
        folder = state / "updates" / f"round-{round_:04d}"
        reference, _ = _site_state(folder / "reference.safetensors")
        senders = ["alpha", "beta"] if round_ == 1 else ["alpha", "beta", "mallory"]
        sent = {site: _site_state(folder / f"{site}.safetensors") for site in senders}
        assert (sent["alpha"][1], sent["beta"][1]) == (4, 3)
        updates = [Update(site, tensors, n, {}) for site, (tensors, n) in sent.items()]
        expected = weighted_average(bound_updates(updates, reference, AggregationRules())[0])
        compared = 0
        for key, value in final.items():
            if not value.is_floating_point() or key.startswith("latent_"):
                continue  # the latent scale is set after phase 1 by calibration
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
            compared += 1
        assert compared > 10
        alpha, beta = sent["alpha"][0], sent["beta"][0]
        assert not torch.equal(alpha[next(iter(final))], beta[next(iter(final))])
    # with mallory's 30x EMA change averaged as claimed, the sampling weights would have moved
    # far from the honest sites'; bounded, they stay within the honest sites' own spread
    ema = [k for k in finals[2] if k.startswith("ema.") and finals[2][k].is_floating_point()]

    def distance(a, b):
        return sum(float((a[k].double() - b[k].double()).square().sum()) for k in ema) ** 0.5

    alpha, beta = sent["alpha"][0], sent["beta"][0]
    honest = {k: (alpha[k].double() * 4 + beta[k].double() * 3) / 7 for k in ema}
    plain = weighted_average(updates)  # FedAvg as claimed, without bounds
    assert distance(plain, honest) > 10 * distance(alpha, beta)
    assert distance(finals[2], honest) < distance(alpha, beta)

    # the agreed latent scale covers every honest site's range; mallory's was left out
    calibrated = next(e for e in rounds(coordinator) if e["event"] == "calibrated")
    assert sorted(calibrated["sites"]) == ["alpha", "beta"]
    assert "reaches far beyond" in calibrated["problems"]["mallory"]
    vqgan = _model(state / "vqgan.safetensors", "vqgan")
    assert vqgan["latent_low"].tolist() == pytest.approx(calibrated["latent_low"])
    assert min(calibrated["latent_low"]) > -1e3
    assert (vqgan["latent_high"] > vqgan["latent_low"]).all()

    # every honest site holds the signed generator bundle, verified against its pinned key;
    # mallory joined without pinning a coordinator key, so it refused to store one
    handed = next(e for e in rounds(coordinator) if e["event"] == "handed_out")
    assert handed["stored"] == ["alpha", "beta"]
    assert "no coordinator key pinned" in handed["refused"]["mallory"]
    public = load_public_key(coordinator / "signing.pub.pem")
    for name in ("alpha", "beta"):
        bundle = federation["sites"][name]["dir"] / "work" / "generator.lsdm"
        assert bundle.read_bytes() == (state / "generator.lsdm").read_bytes()
        manifest = verify_bundle(bundle, public)
        # mallory's bounded diffusion update was averaged in, so it contributed
        assert manifest.provenance.site_names == ["alpha", "beta", "mallory"]
    assert not (federation["sites"]["mallory"]["dir"] / "work" / "generator.lsdm").exists()
