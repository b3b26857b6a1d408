"""VQ-GAN training throughput: this project's ``train_step`` against a plain MONAI baseline.

The baseline is the same VQVAE and PatchDiscriminator trained the straightforward way (as in
MONAI's generative tutorials): the generator step runs the discriminator on the reconstruction
and, for feature matching, on the real batch; the discriminator step runs it on both again.
Both are timed in this process, on the same data, after a warm-up, in the two regimes of a run:
autoencoder only (before ``adversarial_start_step``) and with the discriminator. Phantom cohort
generation is timed too. Prints a markdown table; ``--out FILE`` also writes it there.

    .venv/bin/python bench/bench_vqgan.py --preset tiny --steps 20
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss

from lsdm.config import preset
from lsdm.phantom import write_cohort
from lsdm.vqgan import VQGAN, make_optimisers, train_step


def baseline_step(model: VQGAN, images, opt_g, opt_d, adversarial: bool) -> None:
    """The straightforward VQ-GAN step, written without this project's reuse of work."""
    config = model.config
    adv_loss = PatchAdversarialLoss(criterion=config.adversarial_loss)
    opt_g.zero_grad()
    reconstruction, quantisation_loss = model.autoencoder(images)
    loss = F.l1_loss(reconstruction, images) + quantisation_loss
    if adversarial:
        fake = model.discriminator(reconstruction.contiguous().float())
        with torch.no_grad():
            real = model.discriminator(images.contiguous())
        loss = loss + config.adversarial_weight * adv_loss(
            fake[-1], target_is_real=True, for_discriminator=False
        )
        loss = loss + config.feature_matching_weight * sum(
            F.l1_loss(f, r) for f, r in zip(fake[:-1], real[:-1], strict=True)
        ) / (len(fake) - 1)
    loss.backward()
    opt_g.step()
    if adversarial:
        opt_d.zero_grad()
        fake_logits = model.discriminator(reconstruction.contiguous().detach())[-1]
        real_logits = model.discriminator(images.contiguous().detach())[-1]
        d_loss = 0.5 * (
            adv_loss(fake_logits, target_is_real=False, for_discriminator=True)
            + adv_loss(real_logits, target_is_real=True, for_discriminator=True)
        )
        d_loss.backward()
        opt_d.step()


def volumes_per_second(step_fns, batch_size: int, steps: int, warmup: int = 3) -> list[float]:
    """Time each step function for ``steps`` steps, interleaved one step at a time so that a
    change in the machine's load (2 shared cores) falls on all of them alike."""
    for fn in step_fns:
        for _ in range(warmup):
            fn()
    seconds = [0.0] * len(step_fns)
    for _ in range(steps):
        for i, fn in enumerate(step_fns):
            start = time.perf_counter()
            fn()
            seconds[i] += time.perf_counter() - start
    return [steps * batch_size / s for s in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()

    config = preset(args.preset)
    torch.manual_seed(0)
    batch = config.data.batch_size
    images = torch.rand(batch, 1, *config.data.shape) * 2 - 1

    rows = []
    for regime, adversarial in (("autoencoder only", False), ("with discriminator", True)):
        ours_model = VQGAN(config.vqgan)
        optimisers = make_optimisers(ours_model)
        step = config.vqgan.adversarial_start_step if adversarial else 0
        base_model = VQGAN(config.vqgan)
        base_optimisers = make_optimisers(base_model)
        ours, base = volumes_per_second(
            [
                lambda m=ours_model, o=optimisers, s=step: train_step(m, images, o, s),
                lambda m=base_model, o=base_optimisers, a=adversarial: baseline_step(
                    m, images, o.autoencoder, o.discriminator, a
                ),
            ],
            batch,
            args.steps,
        )
        rows.append((regime, ours, base))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_cohort(Path(tmp), subjects=8, shape=(32, 64, 64), seed=0)
        phantom_seconds = time.perf_counter() - start

    lines = [
        f"VQ-GAN training step, preset `{args.preset}` (batch {batch}, volume "
        f"1x{'x'.join(map(str, config.data.shape))}), {args.steps} timed steps; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}",
        "",
        "| regime | this project (vol/s) | plain MONAI baseline (vol/s) | ratio |",
        "|---|---|---|---|",
        *(f"| {r} | {o:.2f} | {b:.2f} | {o / b:.2f}x |" for r, o, b in rows),
        "",
        f"Phantom cohort, 8 subjects of 32x64x64: {phantom_seconds:.2f} s",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
