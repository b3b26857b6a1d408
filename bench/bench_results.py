"""The fidelity/utility table (docs/results.md): one phantom data set, three ways of training the
``tiny`` model on it, each evaluated by ``lsdm evaluate`` on the same held-out subjects.

- **federated**: 3 sites (their own phantom cohorts and keys) and a coordinator on 127.0.0.1 with
  TLS and site authentication (``server.demo.run_federated_demo``), no DP;
- **federated, DP ε=8**: the same, every site training with DP-SGD at a budget of ε = 8
  (δ = 1e-5) for the whole run;
- **centralised**: the union of the three site cohorts in one place, trained by ``lsdm train``
  for as many steps as one site trains in the federation (a FedAvg round moves the model about
  as far as one site's local steps).

Each trained model generates one volume from each held-out map; ``lsdm.evaluate.evaluate`` then
trains its segmenters on a seeded split of the held-out subjects and reports Dice (real,
synthetic, train-on-synthetic/test-on-real, real+synthetic), the Fréchet distance with its
extractor, MS-SSIM diversity and paired PSNR/SSIM; ``lsdm.demo.map_agreement`` adds how well
each synthetic volume follows its map. Not part of the test suite: it takes tens of minutes.

    .venv/bin/python bench/bench_results.py --out docs/results.md
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from lsdm.cohort import IMAGES_DIR, MAPS_DIR, write_manifest
from lsdm.config import preset
from lsdm.data import open_cohort
from lsdm.demo import map_agreement
from lsdm.evaluate import evaluate
from lsdm.generate import Generator
from lsdm.phantom import PHANTOM_LABELS
from lsdm.train_ldm import train_ldm
from lsdm.train_vqgan import train_vqgan
from server.demo import SITE_POLICY, run_federated_demo

DP_POLICY = {
    "kind": "site",
    "name": "bench-dp",
    "description": "Benchmark: DP-SGD at ε = 8 over the cohort's life",
    "dp": {"enabled": True, "target_epsilon": 8.0, "target_delta": 1e-5},
}


def union_cohort(sites: list[Path], out: Path) -> None:
    """The site cohorts' subjects in one cohort folder (ids are unique across phantom seeds)."""
    for kind in (IMAGES_DIR, MAPS_DIR):
        (out / kind).mkdir(parents=True, exist_ok=True)
        for site in sites:
            for path in sorted((site / kind).iterdir()):
                shutil.copy2(path, out / kind / path.name)
    write_manifest(out, PHANTOM_LABELS)


def spent_epsilon(coordinator: Path) -> dict[str, float]:
    """ε each site reported in the last round it took part in (sites without DP report none)."""
    spent = {}
    for line in (coordinator / "state" / "rounds.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for site, metrics in entry.get("accepted", {}).items():
            if "epsilon" in metrics:
                spent[site] = metrics["epsilon"]
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("output/bench-results"))
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=40, help="phantom subjects per site")
    parser.add_argument("--heldout", type=int, default=9, help="held-out subjects (evaluation)")
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 32, 32])
    parser.add_argument("--rounds", type=int, nargs=2, default=[4, 8], help="VQ-GAN, LDM")
    parser.add_argument("--local-steps", type=int, nargs=2, default=[50, 150], help="per round")
    parser.add_argument("--segmentation-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    shape = tuple(args.shape)
    rounds, local = tuple(args.rounds), tuple(args.local_steps)
    config = preset("tiny").with_overrides(
        data={"shape": list(shape)},
        train={"vqgan_steps": rounds[0] * local[0], "ldm_steps": rounds[1] * local[1]},
    )
    common = dict(sites=args.sites, subjects=args.subjects, shape=shape, rounds=rounds,
                  local_steps=local, heldout=args.heldout)  # fmt: skip

    rows, started = {}, time.monotonic()
    for name, policy in (("federated", SITE_POLICY), ("federated, DP ε=8", DP_POLICY)):
        folder = args.work / ("federated" if policy is SITE_POLICY else "federated-dp")
        tick = time.monotonic()
        agreement = run_federated_demo(folder, site_policy=policy, **common)
        rows[name] = {"folder": folder, "agreement": asdict(agreement),
                      "train_minutes": (time.monotonic() - tick) / 60,
                      "epsilon": spent_epsilon(folder / "coordinator")}  # fmt: skip
    federated = args.work / "federated"
    heldout = federated / "heldout"

    central = args.work / "central"
    tick = time.monotonic()
    union_cohort(sorted((federated / "sites").glob("*/cohort")), central / "cohort")
    cohort = open_cohort(central / "cohort")
    train_vqgan(cohort, config, central / "vqgan")
    train_ldm(cohort, central / "vqgan" / "checkpoint.safetensors", config, central / "ldm")
    generator = Generator.from_checkpoints(
        central / "vqgan" / "checkpoint.safetensors", central / "ldm" / "checkpoint.safetensors"
    )
    generator.generate_folder(generator.check_folder(heldout), central / "synthetic")
    agreement = map_agreement(
        [cohort], open_cohort(heldout), central / "synthetic", generator.vqgan, config,
        central / "comparison.png",
    )  # fmt: skip
    rows = {"centralised": {"folder": central, "agreement": asdict(agreement),
                            "train_minutes": (time.monotonic() - tick) / 60, "epsilon": {}},
            **rows}  # fmt: skip

    for row in rows.values():
        row["metrics"] = evaluate(
            open_cohort(heldout),
            row["folder"] / "synthetic",
            row["folder"] / "evaluation",
            config,
            steps=args.segmentation_steps,
            seed=0,
        )
    text = report(rows, args, time.monotonic() - started)
    print(text)
    if args.out:
        args.out.write_text(text)


def report(rows: dict, args, seconds: float) -> str:
    header = (
        "| training | Dice real | Dice synthetic | Dice TSTR | Dice real+syn | Fréchet distance "
        "| MS-SSIM syn (real) | paired PSNR dB | map agreement syn (real, swapped) | ε spent "
        "| train min |"
    )
    lines = [header, "|" + "---|" * 11]
    for name, row in rows.items():
        m, a = row["metrics"], row["agreement"]
        dice = m.dice
        eps = ", ".join(f"{v:.2f}" for v in row["epsilon"].values()) or "∞ (no DP)"
        lines.append(
            f"| {name} | {dice.real.mean:.3f} | {dice.synthetic.mean:.3f} "
            f"| {dice.train_synthetic_test_real.mean:.3f} "
            f"| {dice.real_plus_synthetic.mean:.3f} "
            f"| {m.frechet_distance.value:.3g} "
            f"| {m.diversity.ms_ssim_between_synthetic:.3f} "
            f"({m.diversity.ms_ssim_between_real:.3f}) "
            f"| {m.paired.psnr_db:.1f} "
            f"| {a['map_agreement_synthetic']:.2f} ({a['map_agreement_real']:.2f}, "
            f"{a['map_agreement_synthetic_swapped']:.2f}) | {eps} | {row['train_minutes']:.1f} |"
        )
    first = next(iter(rows.values()))["metrics"]
    extractor = first.frechet_distance.extractor
    command = (
        f".venv/bin/python bench/bench_results.py --sites {args.sites} --subjects {args.subjects} "
        f"--heldout {args.heldout} --shape {' '.join(map(str, args.shape))} "
        f"--rounds {' '.join(map(str, args.rounds))} "
        f"--local-steps {' '.join(map(str, args.local_steps))} "
        f"--segmentation-steps {args.segmentation_steps} --out docs/results.md"
    )
    return f"""# Results: centralised, federated and federated+DP training (tiny preset, phantoms)

Produced by `bench/bench_results.py` on {platform.processor() or platform.machine()}
in {seconds / 60:.0f} minutes. Reproduce with:

```bash
{command}
```

Data: {args.sites} sites x {args.subjects} phantom subjects (site i: phantom seed i),
{args.heldout} held-out subjects (seed 1000), volumes {"x".join(map(str, args.shape))}.
Federated: VQ-GAN rounds x local steps {args.rounds[0]} x {args.local_steps[0]}, then
diffusion {args.rounds[1]} x {args.local_steps[1]}; centralised: the union of the site
cohorts, {args.rounds[0] * args.local_steps[0]} + {args.rounds[1] * args.local_steps[1]} steps.
Every model generates one volume per held-out map (25 sampling steps, guidance 1.5, seed 0).

{chr(10).join(lines)}

- **Dice** (per-class foreground Dice, background excluded, mean over classes): a MONAI BasicUNet
  trained ({args.segmentation_steps} steps, seed 0) on the real volumes of a seeded train split of
  the held-out subjects, scored on the test split's real volumes ("real") and on the synthetic
  volumes made from the same maps ("synthetic"); "TSTR" trains on the synthetic train split and
  tests on real; "real+syn" trains on both. Per-class values are in each run's
  `evaluation/metrics.json`.
- **Fréchet distance**: over exactly the {first.frechet_distance.real_volumes} held-out volumes
  (no padding); extractor: {extractor}, saved beside each run's metrics with its SHA-256.
- **MS-SSIM**: mean over pairs of synthetic volumes (real pairs in brackets); lower is more diverse.
- **Map agreement**: balanced accuracy of a voxel classifier of the real training images' label
  intensities (chance 0.2), for each synthetic volume against its own map (real held-out images
  and synthetic against another subject's map in brackets).
- **ε spent**: what each DP site's ledger reported to the coordinator in its last round (δ = 1e-5).
"""


if __name__ == "__main__":
    main()
