"""Model throughput: this project's code against a plain MONAI eager baseline of the same networks.

Measured for one preset; the two sides of a measurement are timed in one process one call at a
time in turn (so the machine's load falls on both alike); on a CPU, peak memory comes from a
fresh process per side:

- VQ-GAN training step (with the discriminator on): ``lsdm.vqgan.train_step`` against the
  straightforward step of MONAI's tutorials, which runs the discriminator on the real batch twice.
- Latent diffusion training step: ``lsdm.diffusion.train_step`` (map dropout for guidance, EMA
  update included) against a plain noise-predict-MSE step of the same UNet.
- Sampling, seconds per volume including decode, at 25 and 50 steps with guidance 1.5:
  ``Generator.generate`` (both guidance halves in one batched forward) against a loop that runs
  the conditional and the null-map forward one after the other.

Options for this project's side only: ``--bf16`` (autocast) and ``--compile`` (torch.compile of
the networks). FLOPs of one step are counted with ``torch.utils.flop_counter``; achieved TFLOP/s
is printed on a GPU. Prints a markdown table; ``--out FILE`` also writes it there.

    .venv/bin/python bench/bench_model.py --preset tiny
    .venv/bin/python bench/bench_model.py --preset reference --bf16 --compile   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fresh_process import in_fresh_process
from monai.losses import PatchAdversarialLoss
from torch.utils.flop_counter import FlopCounterMode

from lsdm.config import LSDMConfig, preset
from lsdm.diffusion import LatentDiffusion, make_optimiser, training_scheduler
from lsdm.diffusion import train_step as ldm_train_step
from lsdm.generate import Generator
from lsdm.phantom import PHANTOM_LABELS, write_cohort
from lsdm.vqgan import VQGAN, make_optimisers
from lsdm.vqgan import train_step as vqgan_train_step

VARIANTS = ("ours", "baseline")


# ---- the plain baselines -------------------------------------------------------------------


def baseline_vqgan_step(model: VQGAN, images, optimisers) -> None:
    config = model.config
    adv = PatchAdversarialLoss(criterion=config.adversarial_loss)
    optimisers.autoencoder.zero_grad()
    reconstruction, quantisation_loss = model.autoencoder(images)
    fake = model.discriminator(reconstruction.contiguous().float())
    with torch.no_grad():
        real = model.discriminator(images.contiguous())
    matching = sum(F.l1_loss(f, r) for f, r in zip(fake[:-1], real[:-1], strict=True))
    loss = (
        F.l1_loss(reconstruction, images)
        + quantisation_loss
        + config.adversarial_weight * adv(fake[-1], target_is_real=True, for_discriminator=False)
        + config.feature_matching_weight * matching / (len(fake) - 1)
    )
    loss.backward()
    optimisers.autoencoder.step()
    optimisers.discriminator.zero_grad()
    fake_logits = model.discriminator(reconstruction.contiguous().detach())[-1]
    real_logits = model.discriminator(images.contiguous().detach())[-1]
    d_loss = 0.5 * (
        adv(fake_logits, target_is_real=False, for_discriminator=True)
        + adv(real_logits, target_is_real=True, for_discriminator=True)
    )
    d_loss.backward()
    optimisers.discriminator.step()


def baseline_ldm_step(model: LatentDiffusion, latents, maps, optimiser) -> None:
    scheduler = training_scheduler(model.config)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, model.config.timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = latents - noise if model.config.objective == "rflow" else noise
    optimiser.zero_grad()
    F.mse_loss(model.unet(noisy, timesteps, seg=maps), target).backward()
    optimiser.step()


@torch.no_grad()
def baseline_sample(generator: Generator, maps, steps: int, guidance: float) -> torch.Tensor:
    """Guidance the straightforward way: a conditional and a null-map forward per step."""
    from monai.networks.schedulers import DDIMScheduler, RFlowScheduler

    config = generator.config.diffusion
    network = generator.ldm.ema.module
    x = torch.randn(
        maps.shape[0],
        *generator.vqgan.latent_shape(maps.shape[2:]),
        device=maps.device,
    )
    rflow = config.objective == "rflow"
    scheduler = (
        RFlowScheduler(num_train_timesteps=config.timesteps)
        if rflow
        else DDIMScheduler(
            num_train_timesteps=config.timesteps,
            schedule=config.schedule,
            prediction_type=config.prediction,
        )
    )
    scheduler.set_timesteps(steps, device=maps.device)
    timesteps = [int(t) for t in scheduler.timesteps]
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), t, device=x.device)
        cond = network(x, tt, seg=maps)
        null = network(x, tt, seg=torch.zeros_like(maps))
        out = null + guidance * (cond - null)
        if rflow:
            x, _ = scheduler.step(out, t, x, timesteps[i + 1] if i + 1 < len(timesteps) else 0)
        else:
            x, _ = scheduler.step(out, t, x)
    return generator.vqgan.decode(x)


# ---- measuring -----------------------------------------------------------------------------


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def build(name: str, variant: str, config: LSDMConfig, args, device):
    """The step function of one measurement and variant, and the volumes one call handles."""
    torch.manual_seed(0)
    ours = variant == "ours"
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if ours and args.bf16
        else contextlib.nullcontext()
    )
    compile_ = torch.compile if ours and args.compile else (lambda module: module)
    shape = config.data.shape
    maps = torch.zeros(config.diffusion.batch_size, len(PHANTOM_LABELS), *shape, device=device)
    maps[:, 1] = 1.0

    if name == "vqgan_step":
        model = VQGAN(config.vqgan).to(device)
        optimisers = make_optimisers(model)
        model.autoencoder = compile_(model.autoencoder)
        model.discriminator = compile_(model.discriminator)
        images = torch.rand(config.data.batch_size, 1, *shape, device=device) * 2 - 1
        step = config.vqgan.adversarial_start_step

        def fn():
            with autocast:
                if ours:
                    vqgan_train_step(model, images, optimisers, step)
                else:
                    baseline_vqgan_step(model, images, optimisers)

        return fn, config.data.batch_size
    if name == "ldm_step":
        batch = config.diffusion.batch_size
        latent_shape = config.vqgan.latent_shape(shape)
        model = LatentDiffusion(config.diffusion, latent_shape[0], len(PHANTOM_LABELS)).to(device)
        optimiser = make_optimiser(model)
        model.unet = compile_(model.unet)
        latents = torch.rand(batch, *latent_shape, device=device) * 2 - 1

        def fn():
            with autocast:
                if ours:
                    ldm_train_step(model, latents, maps, optimiser)
                else:
                    baseline_ldm_step(model, latents, maps, optimiser)

        return fn, batch
    steps = int(name.split("_")[1])  # sample_<steps>
    ldm = LatentDiffusion(config.diffusion, config.vqgan.embedding_dim, len(PHANTOM_LABELS))
    generator = Generator(VQGAN(config.vqgan), ldm, config, PHANTOM_LABELS, device)
    generator.ldm.ema.module = compile_(generator.ldm.ema.module)
    batch = min(2, config.diffusion.batch_size)

    def fn():
        with autocast:
            if ours:
                generator.generate(maps[:batch], list(range(batch)), steps, 1.5)
            else:
                baseline_sample(generator, maps[:batch], steps, 1.5)

    return fn, batch


def time_both(name: str, config: LSDMConfig, args) -> dict:
    """Seconds per call and FLOPs of both variants, timed one call at a time in turn, so that
    any change in the machine's load falls on both alike. On a GPU, also their peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = {v: build(name, v, config, args, device) for v in VARIANTS}
    repeats = args.repeats if name.endswith("step") else max(1, args.repeats // 5)
    for fn, _ in built.values():
        for _ in range(args.warmup):
            fn()
    seconds = dict.fromkeys(VARIANTS, 0.0)
    peak = dict.fromkeys(VARIANTS, 0.0)
    for _ in range(repeats):
        for variant, (fn, _) in built.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            seconds[variant] += (time.perf_counter() - start) / repeats
            if device.type == "cuda":
                peak[variant] = max(peak[variant], torch.cuda.max_memory_allocated() / 2**30)
    return {
        v: {
            "seconds": seconds[v],
            "volumes": built[v][1],
            "flops": _flops(built[v][0]),
            "peak_gib": peak[v],
        }
        for v in VARIANTS
    }


def cpu_peak_memory(name: str, variant: str, config: LSDMConfig, args) -> float:
    """Peak RSS (GiB) of a process that runs one call of one variant (interpreter included)."""
    fn, _ = build(name, variant, config, args, torch.device("cpu"))
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (this project's side)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile (this project's side)"
    )
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    config = preset(args.preset)
    on_gpu = torch.cuda.is_available()
    device_name = (
        torch.cuda.get_device_name() if on_gpu else (platform.processor() or platform.machine())
    )

    rows = []
    for name, unit in (
        ("vqgan_step", "vol/s"),
        ("ldm_step", "vol/s"),
        ("sample_25", "s/vol"),
        ("sample_50", "s/vol"),
    ):
        results = in_fresh_process(time_both, name, config, args)
        if not on_gpu:
            for v in VARIANTS:
                results[v]["peak_gib"] = in_fresh_process(cpu_peak_memory, name, v, config, args)
        cells = []
        for v in VARIANTS:
            r = results[v]
            value = r["volumes"] / r["seconds"] if unit == "vol/s" else r["seconds"] / r["volumes"]
            tflops = r["flops"] / r["seconds"] / 1e12
            cells.append((value, tflops, r["peak_gib"]))
        (o, o_tf, o_mem), (b, b_tf, b_mem) = cells
        speedup = o / b if unit == "vol/s" else b / o
        rows.append(
            f"| {name} | {o:.3g} {unit} | {b:.3g} {unit} | {speedup:.2f}x | "
            f"{o_tf:.3g} / {b_tf:.3g} | {o_mem:.2f} / {b_mem:.2f} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)

    shape = "x".join(map(str, config.data.shape))
    options = (
        ", ".join(
            o for o, on in (("bf16 autocast", args.bf16), ("torch.compile", args.compile)) if on
        )
        or "fp32 eager"
    )
    memory = "peak GPU memory allocated" if on_gpu else "peak process RSS (interpreter included)"
    table = "\n".join(
        [
            f"Preset `{args.preset}` (volumes 1x{shape}, VQ-GAN batch {config.data.batch_size}, "
            f"LDM batch {config.diffusion.batch_size}, sampling batch 2, guidance 1.5); "
            f"this project: {options}; baseline: plain MONAI eager fp32. "
            f"Device: {device_name}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads.",
            "",
            "| measurement | this project | baseline | speed-up | TFLOP/s (ours / base) "
            f"| {memory}, GiB (ours / base) |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_cohort(Path(tmp), subjects=8, shape=(32, 64, 64), seed=0)
        seconds = time.perf_counter() - start
    table += f"\n\nPhantom cohort generation, 8 subjects of 32x64x64: {seconds:.2f} s"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
