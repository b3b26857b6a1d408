"""Can the fidelity protocol's segmenter see anything? Segmenter recipes on real phantom volumes.

The fidelity protocol (bench/bench_fidelity.py) judges a generator by a segmenter trained on real
volumes; the issue asks that segmenter to reach a mean foreground Dice of 0.70 on the real test
volumes before any generator is judged by it. The first H200 sweep's segmenter reached 0.61
(vessel 0.36, lesion 0.20). This benchmark trains each recipe of :data:`RECIPES` on the protocol's
40 training subjects (seed 0) and scores it on the 12 test subjects (seed 1), at 32x64x64:

- the protocol's Dice: per subject, then averaged; a label absent from a subject's map but
  predicted scores 0 there (one stray lesion voxel in a lesion-free subject is a 0);
- the lesion's Dice over the subjects that have a lesion only, and the share of lesion-free
  subjects with any voxel predicted as lesion (what the protocol's lesion figure mixes);
- the Dice pooled over all test voxels, per label.

    python3 bench/bench_segmenter.py --device cuda --parallel 9 --out bench/results/segmenter_gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_fidelity import SEGMENTER_RECIPES, load_saved, load_split, protocol_config
from safetensors.torch import save_file

from lsdm.phantom import PHANTOM_LABELS, write_cohort
from lsdm.segmenter import SegmenterRecipe, Volumes, segment_dice, train_segmenter

WIDE = (16, 16, 32, 64, 64, 16)
WIDER = (32, 32, 64, 128, 128, 32)  # MONAI's default widths
STRONG = {"batch_size": 4, "cosine": True, "batch_dice": True}
# name -> (recipe, steps, seed)
RECIPES: dict[str, tuple[SegmenterRecipe, int, int]] = {
    "f8 2000 (first sweep)": (SegmenterRecipe(), 2000, 0),
    "f8 6000": (SegmenterRecipe(), 6000, 0),
    "f8 2000 batch dice": (SegmenterRecipe(batch_dice=True), 2000, 0),
    "f16 4000": (SegmenterRecipe(features=WIDE), 4000, 0),
    "f16 4000 b4 cosine batch dice": (SEGMENTER_RECIPES["f16_b4_cosine_batch_dice"], 4000, 0),
    "f16 4000 b4 cosine batch dice, seed 1": (SegmenterRecipe(features=WIDE, **STRONG), 4000, 1),
    "f16 4000 b4 cosine batch dice flip": (
        SegmenterRecipe(features=WIDE, flip=True, **STRONG),
        4000,
        0,
    ),
    "f32 4000 b4 cosine batch dice": (SegmenterRecipe(features=WIDER, **STRONG), 4000, 0),
    "f16 8000 b4 cosine batch dice": (SegmenterRecipe(features=WIDE, **STRONG), 8000, 0),
}


@torch.no_grad()
def predictions(model: torch.nn.Module, volumes: Volumes) -> np.ndarray:
    device = next(model.parameters()).device
    return np.stack(
        [model(image[None].to(device)).argmax(1)[0].cpu().numpy() for image in volumes.images]
    )


def scores(model: torch.nn.Module, volumes: Volumes) -> dict:
    """The protocol's Dice, the lesion Dice where there is a lesion, the lesion false-positive
    share, and the pooled Dice per label."""
    per_class, mean = segment_dice(model, volumes, PHANTOM_LABELS)
    predicted, truth = predictions(model, volumes), volumes.labels.numpy()
    lesion = max(PHANTOM_LABELS)
    has_lesion = (truth == lesion).reshape(len(truth), -1).any(1)
    present = [
        2 * ((p == lesion) & (t == lesion)).sum() / ((p == lesion).sum() + (t == lesion).sum())
        for p, t in zip(predicted[has_lesion], truth[has_lesion], strict=True)
    ]
    false_alarms = (predicted[~has_lesion] == lesion).reshape((~has_lesion).sum(), -1).any(1)
    pooled = {
        name: float(
            2
            * ((predicted == k) & (truth == k)).sum()
            / ((predicted == k).sum() + (truth == k).sum())
        )
        for k, name in PHANTOM_LABELS.items()
        if k > 0
    }
    return {
        "mean": mean,
        "per_class": per_class,
        "lesion_where_present": float(np.mean(present)) if present else None,
        "lesion_false_alarm_share": float(false_alarms.mean()) if len(false_alarms) else None,
        "subjects_with_lesion": int(has_lesion.sum()),
        "pooled": pooled,
        "pooled_mean": float(np.mean(list(pooled.values()))),
    }


def run_recipe(args, name: str) -> None:
    recipe, steps, seed = RECIPES[name]
    device = torch.device(args.device)
    train, test = (
        load_saved(args.work / "train.safetensors"),
        load_saved(args.work / "test.safetensors"),
    )
    started = time.perf_counter()
    model = train_segmenter([train], len(PHANTOM_LABELS), steps, seed, None, device, recipe)
    seconds = time.perf_counter() - started
    result = {
        "recipe": recipe.describe(),
        "steps": steps,
        "seed": seed,
        "seconds": seconds,
        **scores(model, test),
    }
    print(name, json.dumps(result), flush=True)
    (args.work / f"recipe_{list(RECIPES).index(name)}.json").write_text(
        json.dumps(result, indent=2)
    )


def table(results: dict[str, dict]) -> str:
    classes = [PHANTOM_LABELS[k] for k in sorted(PHANTOM_LABELS) if k > 0]
    head = (
        "| recipe | steps | seed | s | protocol mean |"
        + "".join(f" {c} |" for c in classes)
        + " lesion where present | lesion-free subjects with a lesion voxel | pooled mean |"
        + "".join(f" pooled {c} |" for c in classes)
        + "\n|"
        + "---|" * (5 + 2 * len(classes) + 3)
        + "\n"
    )
    lines = []
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['steps']} | {r['seed']} | {r['seconds']:.0f} | {r['mean']:.3f} |"
            + "".join(f" {r['per_class'][c]:.2f} |" for c in classes)
            + f" {r['lesion_where_present']:.2f} | {r['lesion_false_alarm_share']:.2f} |"
            f" {r['pooled_mean']:.3f} |" + "".join(f" {r['pooled'][c]:.2f} |" for c in classes)
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown results file")
    parser.add_argument("--work", type=Path, default=Path("output/bench_segmenter"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--train-subjects", type=int, default=40)
    parser.add_argument("--test-subjects", type=int, default=12)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="for a dry run")
    parser.add_argument("--parallel", type=int, default=1, help="recipe processes at once")
    parser.add_argument("--only-recipe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps_scale != 1.0:
        for name, (recipe, steps, seed) in RECIPES.items():
            RECIPES[name] = (recipe, max(1, int(steps * args.steps_scale)), seed)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.only_recipe:
        run_recipe(args, args.only_recipe)
        return
    started = time.perf_counter()
    args.vqgan_steps = args.ldm_steps = 1
    config = protocol_config(args)
    for split, subjects, seed in (
        ("train", args.train_subjects, 0),
        ("test", args.test_subjects, 1),
    ):
        if not (args.work / split / "cohort.json").exists():
            write_cohort(args.work / split, subjects, config.data.shape, seed)
        volumes = load_split(args.work / split, config)
        save_file(
            {"images": volumes.images, "labels": volumes.labels}, args.work / f"{split}.safetensors"
        )
    pending, running = list(args.recipes), {}
    threads = str(max(1, (os.cpu_count() or 2) // max(1, args.parallel)))
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            command = [sys.executable, __file__, *sys.argv[1:], "--only-recipe", name]
            running[name] = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS=threads))
        time.sleep(1)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
    results = {}
    for name in args.recipes:
        path = args.work / f"recipe_{list(RECIPES).index(name)}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    text = (
        "# The protocol's segmenter\n\n"
        f"`{' '.join(['bench/bench_segmenter.py', *sys.argv[1:]])}`\n\n"
        f"Machine: {device_name}, torch {torch.__version__}; {args.train_subjects} training and "
        f"{args.test_subjects} test phantom subjects at {'x'.join(map(str, args.shape))}; "
        f"{args.parallel} recipes at once (seconds loaded accordingly); whole run "
        f"{time.perf_counter() - started:.0f} s.\n\n" + table(results)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
