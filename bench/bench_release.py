"""Synthetic release figures: seconds per generated volume through a signed bundle, and the time
to build the release report.

Steps, each timed on its own:

1. build and sign a bundle of a VQ-GAN and an LDM at the preset (untrained weights: the cost of
   sampling does not depend on their values) and load it (verify + build the networks);
2. generate ``--volumes`` volumes from phantom maps at the preset's volume shape with
   ``--steps`` sampling steps and guidance 1.5 (``Generator.generate_folder``, the path
   ``lsdm-node generate`` takes), after one warm-up batch; seconds per volume;
3. build the release report of those volumes against a phantom real cohort of as many subjects
   (``build_report`` + ``write_report``: loading, picture sheet, segmenter training for
   ``--segmentation-steps`` steps on the same device, Dice, Fréchet distance, MS-SSIM,
   memorisation).

    .venv/bin/python bench/bench_release.py                                    # tiny, CPU
    .venv/bin/python bench/bench_release.py --device cuda --preset reference   # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from lsdm.bundle import Provenance, build_bundle, load_bundle
from lsdm.checkpoint import checkpoint_identity, file_sha256, save_checkpoint
from lsdm.config import preset
from lsdm.data import open_cohort
from lsdm.diffusion import build_ldm
from lsdm.phantom import PHANTOM_LABELS, write_cohort
from lsdm.phases import PerPhase
from lsdm.release_report import (
    Generation,
    ReleaseDecision,
    ReleaseProvenance,
    build_report,
)
from lsdm.report_html import write_report
from lsdm.vqgan import VQGAN


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "reference"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--volumes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--segmentation-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()

    config = preset(args.preset)
    shape = tuple(config.data.shape)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_cohort(root / "real", subjects=args.volumes, shape=shape, seed=0)
        write_cohort(root / "maps", subjects=args.volumes, shape=shape, seed=1)
        phantom_s = time.perf_counter() - t

        torch.manual_seed(0)
        vqgan, ldm = VQGAN(config.vqgan), build_ldm(config, len(PHANTOM_LABELS))
        identity = checkpoint_identity(config, PHANTOM_LABELS)
        save_checkpoint(
            root / "vqgan.safetensors", {"vqgan": vqgan}, None, {"kind": "vqgan", **identity}
        )
        save_checkpoint(
            root / "ldm.safetensors",
            {"ldm": ldm},
            None,
            {"kind": "ldm", "vqgan_sha256": file_sha256(root / "vqgan.safetensors"), **identity},
        )
        del vqgan, ldm
        key = ed25519.Ed25519PrivateKey.generate()
        provenance = Provenance(federation="bench", sites=1, rounds=PerPhase(vqgan=1, diffusion=1))
        t = time.perf_counter()
        bundle_path = build_bundle(
            root / "vqgan.safetensors",
            root / "ldm.safetensors",
            provenance,
            key,
            root / "b.lsdm-bundle",
        )
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        generator = load_bundle(bundle_path, key.public_key(), args.device).generator
        _sync(args.device)
        load_s = time.perf_counter() - t

        paths = generator.check_folder(root / "maps")
        batch = args.batch_size or config.diffusion.batch_size
        warm = root / "warm"
        generator.generate_folder(paths[:batch], warm, seed=1, steps=args.steps, batch_size=batch)
        _sync(args.device)
        out = root / "synthetic"
        t = time.perf_counter()
        generator.generate_folder(paths, out, seed=0, steps=args.steps, batch_size=batch)
        _sync(args.device)
        generate_s = time.perf_counter() - t
        per_volume = generate_s / len(paths)

        t = time.perf_counter()
        generation = Generation(
            maps="phantom maps (seed 1)",
            maps_augmented=False,
            steps=args.steps,
            guidance=1.5,
            seed=0,
            bundle=bundle_path.name,
            sampler=generator.config.diffusion.objective,
        )
        report = build_report(
            out,
            open_cohort(root / "real"),
            generator.config,
            ReleaseProvenance(**provenance.model_dump(), bundle_verified=True),
            generation,
            segmentation_steps=args.segmentation_steps,
            device=args.device,
        )
        report = report.model_copy(update={"release": ReleaseDecision(releasable=True, reasons=[])})
        write_report(report, out)
        report_s = time.perf_counter() - t

    device = args.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name()})"
    lines = [
        f"# Release benchmark: preset {args.preset}, volumes {shape}, device {device}",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; {args.volumes} volumes, {args.steps} sampling steps, "
        f"guidance 1.5, batch {batch}; report segmenter {args.segmentation_steps} steps "
        "on the same device",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| phantom cohorts (setup, not timed below) | {phantom_s:.1f} |",
        f"| build + sign bundle | {build_s:.2f} |",
        f"| load bundle (verify + networks) | {load_s:.2f} |",
        f"| generate {len(paths)} volumes | {generate_s:.1f} |",
        f"| **per generated volume** | **{per_volume:.2f}** |",
        f"| **release report for {len(paths)} volumes** | **{report_s:.1f}** |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
