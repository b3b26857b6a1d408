"""The fidelity protocol (issue 15): does a generator make volumes that follow their maps?

Data: phantom cohorts at 32x64x64, ``--train-subjects`` (seed 0) to train every model on and
``--test-subjects`` held out (seed 1). One VQ-GAN is trained; every variant trains a latent
diffusion model on its latents for the same number of steps and samples one volume per map.

Reported per variant and sampling setting (UNet evaluations per volume = steps, x2 with guidance):

- per-class foreground Dice of a segmenter (MONAI BasicUNet) trained on the real training volumes:
  on the real test volumes (the protocol's ceiling: it must reach 0.70 to tell anything), on the
  VQ-GAN's reconstructions of them (the ceiling of any generator that decodes through it) and on
  the synthetic volumes made from the test maps;
- TSTR: a segmenter trained on synthetic volumes of the training maps, scored on real test ones;
- map agreement: a nearest-class-mean voxel classifier fitted on real training images, balanced
  accuracy of each volume against its own map, another subject's and its own map mirrored;
- the unpadded Fréchet distance in the bottleneck features of the real-trained segmenter, the
  paired PSNR, and the VQ-GAN's codebook use (share of codes used, perplexity).

A protocol that can tell good from bad: real images score high against their own map and low
against another's; every figure is printed beside those of real images, in the same process.

    .venv/bin/python bench/bench_fidelity.py --out bench/results/fidelity_cpu.md
    python3 bench/bench_fidelity.py --device cuda --parallel 6 --out ...   # the GPU sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lsdm.checkpoint import checkpoint_identity, load_checkpoint, save_checkpoint
from lsdm.config import LSDMConfig, preset
from lsdm.data import open_cohort
from lsdm.generate import Generator
from lsdm.metrics import NearestClassMean, frechet_distance, paired_psnr_ssim
from lsdm.phantom import PHANTOM_LABELS, write_cohort
from lsdm.segmenter import (
    SegmenterRecipe,
    Volumes,
    bottleneck_features,
    load_volumes,
    make_segmenter,
    segment_dice,
    train_segmenter,
)
from lsdm.train_ldm import train_ldm
from lsdm.train_vqgan import train_vqgan
from lsdm.vqgan import VQGAN, codebook_use, load_vqgan, reconstruct

WIDE = {"channels": (32, 64), "num_res_blocks": 2, "spade_channels": 32}
# name -> (VQ-GAN latent scaling, diffusion overrides, multiple of --ldm-steps)
VARIANTS: dict[str, tuple[str, dict, float]] = {
    "baseline": ("range", {"map_resize": "nearest"}, 1),  # MONAI's SPADE as it ships
    "area": ("range", {"map_resize": "area"}, 1),
    "area_std": ("std", {"map_resize": "area"}, 1),
    "area_std_input": ("std", {"map_resize": "area", "map_at_input": True}, 1),
    "wide_area_std_input": ("std", {"map_resize": "area", "map_at_input": True, **WIDE}, 1),
    "wide_area_std_input_x2": ("std", {"map_resize": "area", "map_at_input": True, **WIDE}, 2),
    # for a 2x-compressed VQ-GAN (--vqgan-variant downsampling_2_*): its 16x32x32 latent folded
    # into 2x2x2 blocks, at the cost of an 8x16x16 one. Range-scaled 2-channel latents leave
    # residual noise in the samples (fidelity_cpu_downsampling_2.md): use the std variants.
    "patch2_area_input": (
        "range",
        {"map_resize": "area", "latent_patch": 2, "map_at_input": True},
        1,
    ),
    "patch2_area_std_input": (
        "std",
        {"map_resize": "area", "latent_patch": 2, "map_at_input": True},
        1,
    ),
    "patch2_wide_area_std_input": (
        "std",
        {"map_resize": "area", "latent_patch": 2, "map_at_input": True, **WIDE},
        1,
    ),
    "area_std_input_ddpm_v": (
        "std",
        {
            "map_resize": "area",
            "map_at_input": True,
            "objective": "ddpm",
            "prediction": "v_prediction",
        },
        1,
    ),
}
# VQ-GAN overrides of the tiny preset, by name (bench/bench_autoencoder.py compares them alone)
VQGAN_VARIANTS: dict[str, dict] = {
    "tiny": {},
    "label_balance_0.5": {"recon_label_balance": 0.5},
    "embedding_dim_8": {"embedding_dim": 8},
    "label_balance_0.5_dim_8": {"recon_label_balance": 0.5, "embedding_dim": 8},
    # the 256 codes of the tiny preset are all in use after dead-code restarts: more of them
    "label_balance_0.5_codes_2048": {"recon_label_balance": 0.5, "num_embeddings": 2048},
    "label_balance_0.5_codes_2048_dim_8": {
        "recon_label_balance": 0.5,
        "num_embeddings": 2048,
        "embedding_dim": 8,
    },
    # half the compression per side (16x32x32 latents at 32x64x64): vessels are 1-2 voxels across
    "downsampling_2_label_balance_0.5_dim_2": {
        "recon_label_balance": 0.5,
        "downsampling": 2,
        "embedding_dim": 2,
    },
    "downsampling_2_label_balance_0.5": {"recon_label_balance": 0.5, "downsampling": 2},
    "wide_label_balance_0.5": {
        "recon_label_balance": 0.5,
        "channels": (32, 64),
        "num_res_channels": (32, 64),
    },
}
# The protocol's segmenter, by name: the first sweep's, and the one bench/bench_segmenter.py chose
SEGMENTER_RECIPES: dict[str, SegmenterRecipe] = {
    "f16": SegmenterRecipe(features=(16, 16, 32, 64, 64, 16)),  # 0.73 on real at 4000 steps
    # the same on class-balanced crops, channels-last: about 3x faster a step on a CPU
    "f16_crops": SegmenterRecipe(
        features=(16, 16, 32, 64, 64, 16), crop=(32, 32, 32), channels_last=True
    ),
    "first_sweep": SegmenterRecipe(),
    "f16_b4_cosine_batch_dice": SegmenterRecipe(
        features=(16, 16, 32, 64, 64, 16), batch_size=4, cosine=True, batch_dice=True
    ),
}
# (sampling steps, guidance scale); UNet evaluations per volume: steps, twice that with guidance
SAMPLINGS = [(25, 1.5), (10, 1.5), (5, 1.5), (10, 1.0), (5, 1.0)]
TSTR_SAMPLINGS = [(25, 1.5), (5, 1.5)]  # the default and the best candidate at <= 10 evaluations


def sampling(text: str) -> tuple[int, float]:
    steps, guidance = text.split("x")
    return int(steps), float(guidance)


def evaluations(steps: int, guidance: float) -> int:
    return steps * (1 if guidance in (0.0, 1.0) else 2)


def load_split(cohort_dir: Path, config: LSDMConfig) -> Volumes:
    """A cohort's volumes on the model's grid and scale (the evaluation's own loader)."""
    cohort = open_cohort(cohort_dir)
    return load_volumes(cohort, config, cohort.ids)


def load_saved(path: Path) -> Volumes:
    """Volumes that :func:`prepare` saved, for the variant processes."""
    tensors = load_file(path)
    return Volumes([str(i) for i in range(len(tensors["images"]))], **tensors)


def with_images(volumes: Volumes, images: torch.Tensor) -> Volumes:
    """``volumes``' subjects and maps with other images (reconstructed or synthetic)."""
    return Volumes(volumes.ids, images, volumes.labels)


def map_scores(checker: NearestClassMean, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean balanced accuracy against the own map, the next subject's and the own map mirrored."""
    own, other, mirrored = [], [], []
    for i, image in enumerate(images[:, 0].numpy()):
        label_map = labels[i].numpy()
        own.append(checker.balanced_accuracy(image, label_map))
        other.append(checker.balanced_accuracy(image, labels[(i + 1) % len(labels)].numpy()))
        mirrored.append(checker.balanced_accuracy(image, np.flip(label_map, 1).copy()))
    return {
        "map_own": float(np.mean(own)),
        "map_other": float(np.mean(other)),
        "map_mirrored": float(np.mean(mirrored)),
    }


def dice_of(segmenter, volumes: Volumes, images: torch.Tensor | None = None) -> dict:
    scored = volumes if images is None else with_images(volumes, images)
    per_class, mean = segment_dice(segmenter, scored, PHANTOM_LABELS)
    return {"mean": mean, "per_class": per_class}


def mean_psnr(real: torch.Tensor, other: torch.Tensor) -> float:
    pairs = zip(real[:, 0].numpy(), other[:, 0].numpy(), strict=True)
    return float(np.mean([paired_psnr_ssim(r, o)["psnr_db"] for r, o in pairs]))


def prepare(args, work: Path) -> dict:
    """Cohorts, the VQ-GAN (and its std-scaled twin), the real segmenter and the real figures."""
    device = torch.device(args.device)
    config = protocol_config(args)
    for name, subjects, seed in (
        ("train", args.train_subjects, 0),
        ("test", args.test_subjects, 1),
    ):
        if not (work / name / "cohort.json").exists():
            write_cohort(work / name, subjects, config.data.shape, seed)
    train, test = load_split(work / "train", config), load_split(work / "test", config)
    save_file({"images": train.images, "labels": train.labels}, work / "train.safetensors")
    save_file({"images": test.images, "labels": test.labels}, work / "test.safetensors")

    started = time.perf_counter()
    trained = work / "vqgan_range" / "checkpoint.safetensors"
    if trained.exists():  # a rerun in the same work folder keeps its VQ-GAN
        vqgan, _ = load_vqgan(trained, device)
        vqgan_seconds = float("nan")
    else:
        run = train_vqgan(open_cohort(work / "train"), config, work / "vqgan_range", device=device)
        vqgan, vqgan_seconds = run.model, time.perf_counter() - started
    twin = VQGAN(config.vqgan.model_copy(update={"latent_scaling": "std"})).to(device)
    twin.load_state_dict(vqgan.state_dict())
    twin.calibrate_latent_scale(train.images[:16].to(device))
    std_config = config.with_overrides(vqgan={"latent_scaling": "std"})
    (work / "vqgan_std").mkdir(exist_ok=True)
    save_checkpoint(
        work / "vqgan_std" / "checkpoint.safetensors",
        {"vqgan": twin},
        metadata={
            "kind": "vqgan",
            "step": config.train.vqgan_steps,
            **checkpoint_identity(std_config, PHANTOM_LABELS),
        },
    )
    vqgan = vqgan.eval()
    reconstructions = torch.cat(
        [reconstruct(vqgan, c.to(device)).cpu() for c in test.images.split(4)]
    )

    started = time.perf_counter()
    kept = work / "segmenter.safetensors"
    if kept.exists():  # a rerun in the same work folder keeps its real-trained segmenter
        segmenter = make_segmenter(len(PHANTOM_LABELS), recipe(args)).to(device)
        load_checkpoint(kept, {"segmenter": segmenter}, device=device)
        segmenter_seconds = float("nan")
    else:
        segmenter = train_segmenter(
            [train], len(PHANTOM_LABELS), args.segmenter_steps, 0, None, device, recipe(args)
        )
        segmenter_seconds = time.perf_counter() - started
        save_checkpoint(kept, {"segmenter": segmenter})
    segmenter.eval()
    checker = NearestClassMean().fit(list(train.images[:, 0].numpy()), list(train.labels.numpy()))
    real_features = bottleneck_features(segmenter, test.images)
    result = {
        "vqgan_seconds": vqgan_seconds,
        "segmenter_seconds": segmenter_seconds,
        "real": {"dice": dice_of(segmenter, test), **map_scores(checker, test.images, test.labels)},
        "reconstructed": {
            "dice": dice_of(segmenter, test, reconstructions),
            **map_scores(checker, reconstructions, test.labels),
            "psnr_db": mean_psnr(test.images, reconstructions),
            "frechet": frechet_distance(
                real_features, bottleneck_features(segmenter, reconstructions)
            ),
            **dataclasses.asdict(codebook_use(vqgan, test.images)),
        },
    }
    (work / "prepared.json").write_text(json.dumps(result, indent=2))
    return result


def recipe(args) -> SegmenterRecipe:
    return SEGMENTER_RECIPES[getattr(args, "segmenter_recipe", "f16")]


def protocol_config(args) -> LSDMConfig:
    return preset("tiny").with_overrides(
        data={"shape": tuple(args.shape)},
        vqgan=VQGAN_VARIANTS[getattr(args, "vqgan_variant", "tiny")],
        train={
            "vqgan_steps": args.vqgan_steps,
            "ldm_steps": args.ldm_steps,
            "checkpoint_every": 10**6,
            "log_every": 100,
        },
    )


def run_variant(args, work: Path, name: str) -> dict:
    """Train one variant's diffusion model and measure it under every sampling setting."""
    device = torch.device(args.device)
    scaling, overrides, multiple = VARIANTS[name]
    config = protocol_config(args)
    steps = int(args.ldm_steps * multiple)
    config = config.with_overrides(diffusion=overrides, train={"ldm_steps": steps})
    vqgan_checkpoint = work / f"vqgan_{scaling}" / "checkpoint.safetensors"
    out = work / f"ldm_{name}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    train_ldm(open_cohort(work / "train"), vqgan_checkpoint, config, out, device=device)
    ldm_seconds = time.perf_counter() - started
    generator = Generator.from_checkpoints(vqgan_checkpoint, out / "checkpoint.safetensors", device)
    train, test = load_saved(work / "train.safetensors"), load_saved(work / "test.safetensors")
    segmenter = make_segmenter(len(PHANTOM_LABELS), recipe(args)).to(device)
    load_checkpoint(work / "segmenter.safetensors", {"segmenter": segmenter}, device=device)
    segmenter.eval()
    checker = NearestClassMean().fit(list(train.images[:, 0].numpy()), list(train.labels.numpy()))
    real_features = bottleneck_features(segmenter, test.images)
    samplings = args.samplings or (SAMPLINGS if args.all_samplings else SAMPLINGS[:1] + [(5, 1.5)])
    results = {"ldm_steps": steps, "ldm_seconds": ldm_seconds, "samplings": []}
    for sampling_steps, guidance in samplings:

        def synthesise(split: Volumes, steps=sampling_steps, guidance=guidance):
            t0 = time.perf_counter()
            maps = torch.nn.functional.one_hot(split.labels.long(), len(PHANTOM_LABELS))
            maps = maps.permute(0, 4, 1, 2, 3).float()
            volumes = torch.cat(
                [
                    generator.generate(
                        maps[i : i + 8],
                        list(range(i, min(i + 8, len(maps)))),
                        steps,
                        guidance,
                    )
                    for i in range(0, len(maps), 8)
                ]
            )
            return volumes, (time.perf_counter() - t0) / len(maps)

        synthetic_test, seconds_per_volume = synthesise(test)
        row = {
            "steps": sampling_steps,
            "guidance": guidance,
            "evaluations": evaluations(sampling_steps, guidance),
            "seconds_per_volume": seconds_per_volume,
            "dice": dice_of(segmenter, test, synthetic_test),
            **map_scores(checker, synthetic_test, test.labels),
            "psnr_db": mean_psnr(test.images, synthetic_test),
            "frechet": frechet_distance(
                real_features, bottleneck_features(segmenter, synthetic_test)
            ),
        }
        with_tstr = (
            (sampling_steps, guidance) == samplings[0]
            if args.samplings
            else (sampling_steps, guidance) in TSTR_SAMPLINGS
        )
        if args.tstr_all or with_tstr:
            synthetic_train, _ = synthesise(train)
            tstr = train_segmenter(
                [with_images(train, synthetic_train)],
                len(PHANTOM_LABELS),
                args.segmenter_steps,
                0,
                None,
                device,
                recipe(args),
            )
            row["tstr"] = dice_of(tstr, test)
        results["samplings"].append(row)
        print(name, json.dumps(row), flush=True)
        (work / f"variant_{name}.json").write_text(json.dumps(results, indent=2))
    return results


def table(prepared: dict, variants: dict[str, dict]) -> str:
    real = prepared["real"]
    rec = prepared["reconstructed"]
    classes = list(real["dice"]["per_class"])

    def dice_cells(d: dict | None) -> str:
        if d is None:
            return " – |" * (len(classes) + 1)
        return f" {d['mean']:.3f} |" + "".join(f" {d['per_class'][c]:.2f} |" for c in classes)

    head = (
        "| model | sampling (evals) | seg Dice mean |"
        + "".join(f" {c} |" for c in classes)
        + " TSTR mean |"
        + "".join(f" {c} |" for c in classes)
        + " map own | other | mirrored | PSNR dB | Fréchet | s/vol |\n"
    )
    head += "|" + "---|" * (2 + 2 * (len(classes) + 1) + 6) + "\n"

    def agreement(d: dict) -> str:
        return f" {d['map_own']:.3f} | {d['map_other']:.3f} | {d['map_mirrored']:.3f} |"

    blank = dice_cells(None)
    lines = [
        f"| real test volumes | – |{dice_cells(real['dice'])}{blank}{agreement(real)} – | 0 | – |",
        f"| VQ-GAN reconstructions | – |{dice_cells(rec['dice'])}{blank}{agreement(rec)}"
        f" {rec['psnr_db']:.1f} | {rec['frechet']:.3g} | – |",
    ]
    for name, result in variants.items():
        model = f"{name} ({result['ldm_steps']} steps, {result['ldm_seconds']:.0f} s)"
        for row in result["samplings"]:
            sampling = f"{row['steps']}, g {row['guidance']} ({row['evaluations']})"
            lines.append(
                f"| {model} | {sampling} |{dice_cells(row['dice'])}{dice_cells(row.get('tstr'))}"
                f"{agreement(row)} {row['psnr_db']:.1f} | {row['frechet']:.3g} |"
                f" {row['seconds_per_volume']:.2f} |"
            )
    return head + "\n".join(lines) + "\n"


def run_in_processes(names: list[str], parallel: int) -> None:
    """This script once per variant (``--only-variant``), ``parallel`` at a time."""
    pending, running = list(names), {}
    threads = str(max(1, (os.cpu_count() or 2) // max(1, parallel)))
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            command = [sys.executable, __file__, *sys.argv[1:], "--only-variant", name]
            running[name] = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS=threads))
        time.sleep(1)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode:
                    print(f"variant {name} failed with code {process.returncode}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown results file")
    parser.add_argument("--work", type=Path, default=Path("output/bench_fidelity"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--train-subjects", type=int, default=40)
    parser.add_argument("--test-subjects", type=int, default=12)
    parser.add_argument("--vqgan-steps", type=int, default=4000)
    parser.add_argument("--ldm-steps", type=int, default=3000)
    parser.add_argument("--segmenter-steps", type=int, default=4000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--parallel", type=int, default=1, help="variant processes at once")
    parser.add_argument("--all-samplings", action="store_true")
    parser.add_argument("--tstr-all", action="store_true", help="TSTR for every sampling setting")
    parser.add_argument("--vqgan-variant", default="tiny", choices=list(VQGAN_VARIANTS))
    parser.add_argument("--segmenter-recipe", default="f16", choices=list(SEGMENTER_RECIPES))
    parser.add_argument(
        "--samplings",
        nargs="+",
        type=sampling,
        help="sampling settings STEPSxGUIDANCE in the order to run them, e.g. 5x1.5 25x1.5; "
        "TSTR for the first only (unless --tstr-all)",
    )
    parser.add_argument("--only-variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.only_variant:
        run_variant(args, work, args.only_variant)
        return
    started = time.perf_counter()
    prepared = prepare(args, work)
    print("prepared", json.dumps(prepared), flush=True)
    run_in_processes(args.variants, args.parallel)
    variants = {}
    for name in args.variants:
        path = work / f"variant_{name}.json"
        if path.exists():
            variants[name] = json.loads(path.read_text())
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    text = (
        f"# Fidelity protocol\n\n`{' '.join(['bench/bench_fidelity.py', *sys.argv[1:]])}`\n\n"
        f"Machine: {device_name}, torch {torch.__version__}; {args.train_subjects} training and "
        f"{args.test_subjects} test phantom subjects at {'x'.join(map(str, args.shape))}; VQ-GAN "
        f"{args.vqgan_steps} steps ({prepared['vqgan_seconds']:.0f} s; overrides of the tiny "
        f"preset: {VQGAN_VARIANTS[args.vqgan_variant] or 'none'}), segmenters "
        f"({recipe(args).describe()}) {args.segmenter_steps} steps "
        f"({prepared['segmenter_seconds']:.0f} s each); codebook use "
        f"{prepared['reconstructed']['codes_used_share']:.3f} of the codes, perplexity "
        f"{prepared['reconstructed']['perplexity']:.1f}; "
        f"whole run {time.perf_counter() - started:.0f} s.\n\n" + table(prepared, variants)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
