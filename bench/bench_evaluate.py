"""How fast is the evaluation, at what Dice? Segmenter recipes at the evaluation's own settings.

``lsdm evaluate`` and the release report spend almost all their time training segmenters (on
8 real and 8 synthetic phantom subjects at the tiny grid, 354 of 368 s went to the three
segmenters' 300 steps each: cProfile, 2 quiet cores). This benchmark trains the protocol's
segmenter under each recipe of :data:`RECIPES` for the same steps on the same real phantom
subjects, on the model's grid, and scores it on held-out subjects: seconds per training and mean
foreground Dice (per subject, as the evaluation reports it), over ``--seeds`` seeds; the first
recipe (the evaluation's before this benchmark) is the baseline every ratio is against.

    .venv/bin/python bench/bench_evaluate.py --out bench/results/evaluate_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_fidelity import load_split

from lsdm.config import preset
from lsdm.phantom import PHANTOM_LABELS, write_cohort
from lsdm.segmenter import (
    DEFAULT_RECIPE,
    SegmenterRecipe,
    segment_dice,
    split_subjects,
    train_segmenter,
)

RECIPES: dict[str, SegmenterRecipe] = {
    "whole volumes (before)": SegmenterRecipe(),
    "whole volumes, channels-last": SegmenterRecipe(channels_last=True),
    "16x32x32 crops, batches of 2": SegmenterRecipe(crop=(16, 32, 32), channels_last=True),
    "16x32x32 crops, batches of 4": SegmenterRecipe(
        crop=(16, 32, 32), batch_size=4, channels_last=True
    ),
    "32x32x32 crops": SegmenterRecipe(crop=(32, 32, 32), channels_last=True),
    "the evaluation's default": DEFAULT_RECIPE,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    config = preset("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        write_cohort(Path(tmp) / "real", args.subjects, config.data.shape, seed=0)
        real = load_split(Path(tmp) / "real", config)
    rows = {}
    for name in args.recipes:
        seconds, dice, per_class = [], [], []
        for seed in range(args.seeds):
            train_ids, test_ids = split_subjects(real.ids, seed, 0.34)
            started = time.perf_counter()
            model = train_segmenter(
                [real.subset(train_ids)],
                len(PHANTOM_LABELS),
                args.steps,
                seed,
                recipe=RECIPES[name],
            )
            seconds.append(time.perf_counter() - started)
            classes, mean = segment_dice(model, real.subset(test_ids), PHANTOM_LABELS)
            dice.append(mean)
            per_class.append(classes)
        rows[name] = {
            "seconds": float(np.mean(seconds)),
            "dice": dice,
            "per_class": {
                c: float(np.nanmean([np.nan if p[c] is None else p[c] for p in per_class]))
                for c in per_class[0]
            },
        }
        print(name, rows[name], flush=True)
    base = rows[args.recipes[0]]["seconds"]
    classes = list(next(iter(rows.values()))["per_class"])
    lines = [
        "| recipe | s per segmenter | speed-up | mean Dice per seed | mean |"
        + "".join(f" {c} |" for c in classes),
        "|" + "---|" * (5 + len(classes)),
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {base / r['seconds']:.1f}x |"
            f" {', '.join(f'{d:.3f}' for d in r['dice'])} | {np.mean(r['dice']):.3f} |"
            + "".join(f" {r['per_class'][c]:.2f} |" for c in classes)
        )
    text = (
        f"# Evaluation speed\n\n`{' '.join(['bench/bench_evaluate.py', *sys.argv[1:]])}`\n\n"
        f"Machine: {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; {args.subjects} real phantom subjects at "
        f"{'x'.join(map(str, config.data.shape))} (the tiny grid), a third held out per seed; "
        f"{args.steps} segmenter steps (the evaluation's default); the default recipe: "
        f"{DEFAULT_RECIPE.describe()}.\n\n" + "\n".join(lines) + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
