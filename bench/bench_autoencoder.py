"""The autoencoder's ceiling: what the VQ-GAN's reconstructions keep of each label, per variant.

No generator that decodes through the VQ-GAN can show more than its reconstructions do, and the
first H200 sweep (bench/results/fidelity_gpu_sweep.md) found the tiny VQ-GAN losing vessels and
lesions. This benchmark trains VQ-GAN variants on the fidelity protocol's cohorts (40 training
subjects, seed 0; 12 test subjects, seed 1; 32x64x64) for the same steps, in one process, and
scores the reconstructions of the test subjects:

- PSNR, codebook use (share of codes, perplexity);
- per-class Dice of the fidelity protocol's real-trained segmenter (trained once, kept in the work
  folder) on the reconstructions, and on the decodings of the unquantised latents: the gap between
  the two is what the codebook costs, the rest is the encoder and decoder;
- map agreement (nearest-class-mean voxel classifier fitted on real training images) against the
  own map and another subject's, and its recall per label (how many of a label's voxels read as
  that label): the real test images' figures are printed first, as the ceiling.

    .venv/bin/python bench/bench_autoencoder.py --out bench/results/autoencoder_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from bench_fidelity import SEGMENTER_RECIPES, VQGAN_VARIANTS, dice_of, load_split

from lsdm.checkpoint import load_checkpoint, save_checkpoint
from lsdm.config import preset
from lsdm.data import open_cohort
from lsdm.metrics import NearestClassMean, paired_psnr_ssim
from lsdm.phantom import PHANTOM_LABELS, write_cohort
from lsdm.segmenter import make_segmenter, train_segmenter
from lsdm.train_vqgan import train_vqgan
from lsdm.vqgan import VQGAN, codebook_use, reconstruct

VARIANTS = VQGAN_VARIANTS


def per_label_recall(checker: NearestClassMean, images: torch.Tensor, labels: torch.Tensor):
    """Mean over subjects of each label's recall, and the balanced accuracy against the own map
    and the next subject's."""
    recalls: dict[int, list[float]] = {label: [] for label in PHANTOM_LABELS}
    own, other = [], []
    for i, image in enumerate(images[:, 0].numpy()):
        predicted = checker.predict(image)
        truth = labels[i].numpy()
        for label in np.unique(truth):
            recalls[int(label)].append(float((predicted[truth == label] == label).mean()))
        own.append(checker.balanced_accuracy(image, truth))
        other.append(checker.balanced_accuracy(image, labels[(i + 1) % len(labels)].numpy()))
    return {
        "recall": {PHANTOM_LABELS[k]: float(np.mean(v)) for k, v in recalls.items() if v},
        "map_own": float(np.mean(own)),
        "map_other": float(np.mean(other)),
    }


@torch.no_grad()
def decode_unquantised(model: VQGAN, images: torch.Tensor) -> torch.Tensor:
    """The decoder applied to the encoder's continuous latent, skipping the codebook."""
    model.eval()
    autoencoder = model.autoencoder
    return autoencoder.decode(autoencoder.encode(images)).clamp(-1.0, 1.0)


def real_segmenter(args, train):
    """The protocol's segmenter trained on the real training volumes, once per work folder."""
    recipe = SEGMENTER_RECIPES[args.segmenter_recipe]
    path = args.work / f"segmenter_{args.segmenter_recipe}_{args.segmenter_steps}.safetensors"
    if path.exists():
        segmenter = make_segmenter(len(PHANTOM_LABELS), recipe)
        load_checkpoint(path, {"segmenter": segmenter})
    else:
        segmenter = train_segmenter(
            [train], len(PHANTOM_LABELS), args.segmenter_steps, 0, None, "cpu", recipe
        )
        save_checkpoint(path, {"segmenter": segmenter})
    return segmenter.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("output/bench_autoencoder"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--train-subjects", type=int, default=40)
    parser.add_argument("--test-subjects", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--segmenter-steps", type=int, default=3000)
    parser.add_argument("--segmenter-recipe", default="f16_crops", choices=list(SEGMENTER_RECIPES))
    args = parser.parse_args()
    base = preset("tiny").with_overrides(
        data={"shape": tuple(args.shape)},
        train={"vqgan_steps": args.steps, "checkpoint_every": 10**6, "log_every": 100},
    )
    for name, subjects, seed in (
        ("train", args.train_subjects, 0),
        ("test", args.test_subjects, 1),
    ):
        if not (args.work / name / "cohort.json").exists():
            write_cohort(args.work / name, subjects, base.data.shape, seed)
    train, test = load_split(args.work / "train", base), load_split(args.work / "test", base)
    checker = NearestClassMean().fit(list(train.images[:, 0].numpy()), list(train.labels.numpy()))
    segmenter = real_segmenter(args, train)
    rows = {
        "real test images": {
            **per_label_recall(checker, test.images, test.labels),
            "dice": dice_of(segmenter, test),
        }
    }
    for name in args.variants:
        config = base.with_overrides(vqgan=VARIANTS[name])
        out = args.work / f"vqgan_{name}"
        started = time.perf_counter()
        model = train_vqgan(
            open_cohort(args.work / "train"), config, out, resume=out.exists()
        ).model
        seconds = time.perf_counter() - started
        recon = torch.cat([reconstruct(model, chunk) for chunk in test.images.split(4)])
        psnr = np.mean(
            [
                paired_psnr_ssim(r[0].numpy(), s[0].numpy())["psnr_db"]
                for r, s in zip(test.images, recon, strict=True)
            ]
        )
        unquantised = torch.cat(
            [decode_unquantised(model, chunk) for chunk in test.images.split(4)]
        )
        rows[name] = {
            **per_label_recall(checker, recon, test.labels),
            "dice": dice_of(segmenter, test, recon),
            "dice_unquantised": dice_of(segmenter, test, unquantised),
            "psnr_db": float(psnr),
            "seconds": seconds,
            **dataclasses.asdict(codebook_use(model, test.images)),
        }
        print(name, json.dumps(rows[name]), flush=True)
    classes = list(rows["real test images"]["recall"])
    foreground = list(rows["real test images"]["dice"]["per_class"])

    def dice_cells(dice: dict | None) -> str:
        if dice is None:
            return " – |" * (1 + len(foreground))
        return f" {dice['mean']:.3f} |" + "".join(
            f" {dice['per_class'][c]:.2f} |" for c in foreground
        )

    lines = [
        "| reconstructions of | seg Dice mean |"
        + "".join(f" {c} |" for c in foreground)
        + " unquantised Dice mean |"
        + "".join(f" {c} |" for c in foreground)
        + " map own | other |"
        + "".join(f" recall {c} |" for c in classes)
        + " PSNR dB | codes used | perplexity | train s |",
        "|" + "---|" * (5 + 2 * len(foreground) + len(classes) + 4),
    ]
    for name, row in rows.items():
        recall = dice_cells(row["dice"]) + dice_cells(row.get("dice_unquantised"))
        recall += f" {row['map_own']:.3f} | {row['map_other']:.3f} |"
        recall += "".join(f" {row['recall'][c]:.2f} |" for c in classes)
        extra = (
            f" {row['psnr_db']:.1f} | {row['codes_used_share']:.2f} | {row['perplexity']:.0f} |"
            f" {row['seconds']:.0f} |"
            if "psnr_db" in row
            else " – | – | – | – |"
        )
        lines.append(f"| {name} |{recall}{extra}")
    text = (
        f"# Autoencoder ceiling\n\n`bench/bench_autoencoder.py --steps {args.steps}` on "
        f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads), "
        f"{args.train_subjects} training / {args.test_subjects} test phantom subjects at "
        f"{'x'.join(map(str, args.shape))}; segmenter {args.segmenter_recipe}, "
        f"{args.segmenter_steps} steps.\n\n" + "\n".join(lines) + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
