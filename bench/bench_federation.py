"""Federation overhead: per round, the coordinator's wall time against the slowest site's local
compute time, and the bytes each site receives and sends.

Runs a real local federation (``lsdm-server demo`` machinery: coordinator on 127.0.0.1 with TLS
and site authentication, N SuperNodes) at the ``tiny`` preset for 2 and 3 sites, then reads the
coordinator's run log: ``seconds`` (round wall time, send to aggregate), each site's
``train_seconds`` (its local training, reported as a metric) and the payload sizes the
coordinator records (``bytes_down`` per site: the weights sent, the frozen VQ-GAN included in
phase 2; ``bytes_up`` per site: the weights returned). Payload bytes are tensor bytes; Flower's
protobuf and HTTP framing add a little. All sites share this machine's cores, so the "slowest
site" also waits for its neighbours: on 2 cores, 3 sites run slower than on 3 machines.

``--reference-size SECONDS`` runs the ``reference`` model instead (222M-parameter UNet, 1.8 GB of
weights with its EMA copy) with each site's local training replaced by a fixed wait of that many
seconds (``bench/fixed_wait_site.py``, a bench-only ClientApp the sites run in place of the
installed one): the sites send the weights back unchanged, so the rounds measure transfers,
checks and averaging at full size.

    .venv/bin/python bench/bench_federation.py --sites 2 3 --out bench/results/federation.md
    .venv/bin/python bench/bench_federation.py --sites 2 --rounds 1 --reference-size 5 \
        --out bench/results/federation_reference.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

from fixed_wait_site import WAIT_ENV, use_fixed_wait


def swap_site_apps(sites_folder: Path, count: int, done: threading.Event) -> None:
    """Point each site's ``flwr-clientapp`` shim at the fixed-wait app as soon as ``lsdm-node
    join`` has written it (the first round reaches a site seconds after it connects)."""
    swapped: set[Path] = set()
    while len(swapped) < count and not done.is_set():
        for shim in sites_folder.glob("*/work/bin/flwr-clientapp"):
            if shim not in swapped and "node.app_guard" in shim.read_text():
                use_fixed_wait(shim, sys.executable)
                swapped.add(shim)
        time.sleep(0.05)


def measure(
    sites: int,
    rounds: int,
    steps: tuple[int, int],
    subjects: int,
    model_preset: str,
    wait_s: float | None = None,
) -> list[dict]:
    from lsdm.config import preset
    from server.demo import run_federated_demo

    shape = preset(model_preset).data.shape if model_preset == "reference" else (16, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        done = threading.Event()
        if wait_s:
            swapper = threading.Thread(
                target=swap_site_apps, args=(Path(tmp) / "demo" / "sites", sites, done)
            )
            swapper.start()
        try:
            run_federated_demo(
                Path(tmp) / "demo",
                sites=sites,
                subjects=subjects,
                shape=shape,
                rounds=(rounds, rounds),
                local_steps=steps,
                model_preset=model_preset,
                generate=False,
            )
        finally:
            done.set()
            if wait_s:
                swapper.join()
        log = Path(tmp) / "demo" / "coordinator" / "state" / "rounds.jsonl"
        entries = [json.loads(line) for line in log.read_text().splitlines()]
    rows = []
    for entry in entries:
        if entry.get("event") != "round" or entry.get("outcome") != "aggregated":
            continue
        accepted = entry["accepted"]
        slowest = max(m.get("train_seconds", float("nan")) for m in accepted.values())
        if wait_s and slowest != wait_s:
            raise RuntimeError(f"round {entry['round']}: a site trained instead of waiting")
        rows.append(
            {
                "sites": sites,
                "round": entry["round"],
                "phase": entry["phase"],
                "wall_s": entry["seconds"],
                "slowest_site_s": slowest,
                "overhead_s": entry["seconds"] - slowest,
                "overhead_share": (entry["seconds"] - slowest) / entry["seconds"],
                "bytes_down": entry.get("bytes_down", 0),
                "bytes_up": max(entry.get("bytes_up", {0: 0}).values()),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| sites | round | phase | round wall (s) | slowest site compute (s) | overhead (s) "
        "| overhead share | MB down per site | MB up per site |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sites']} | {r['round']} | {r['phase']} | {r['wall_s']:.1f} "
            f"| {r['slowest_site_s']:.1f} | {r['overhead_s']:.1f} | {r['overhead_share']:.0%} "
            f"| {r['bytes_down'] / 1e6:.2f} | {r['bytes_up'] / 1e6:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per phase")
    parser.add_argument("--vqgan-steps", type=int, default=10)
    parser.add_argument("--diffusion-steps", type=int, default=20)
    parser.add_argument("--subjects", type=int, default=4, help="phantom subjects per site")
    parser.add_argument(
        "--reference-size",
        type=float,
        metavar="SECONDS",
        help="the reference model, local training replaced by a fixed wait of SECONDS",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_preset = "tiny"
    if args.reference_size:
        model_preset = "reference"
        os.environ[WAIT_ENV] = str(args.reference_size)  # inherited by the sites
    rows = []
    for sites in args.sites:
        steps = (args.vqgan_steps, args.diffusion_steps)
        rows += measure(sites, args.rounds, steps, args.subjects, model_preset, args.reference_size)
    machine = platform.processor() or platform.machine()
    if args.reference_size:
        setting = (
            f"reference preset (32x256x256 volumes), local training replaced by a fixed "
            f"{args.reference_size:g} s wait"
        )
    else:
        setting = (
            f"tiny preset, 16x32x32 phantom volumes, {args.vqgan_steps}/{args.diffusion_steps} "
            "local steps per round"
        )
    text = (
        f"Federation overhead, {setting}, {machine}, all processes on one machine.\n\n"
        f"{table(rows)}\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
