"""DP-SGD at a site: what it costs in step time and memory, and in utility.

Speed (default mode): one training step of the VQ-GAN (discriminator on, so both networks train
privately) and of the latent diffusion UNet, without DP (``lsdm.vqgan.train_step``,
``lsdm.diffusion.train_step``) and with DP-SGD (``node.privacy``: per-sample gradients, clipping,
noise) in each per-sample gradient mode: the mode ``node.privacy.GRAD_SAMPLE_MODES`` picks per
network ("default"), Opacus hooks everywhere ("hooks": functorch only for layers Opacus has no
hook for) and functorch everywhere ("functorch"). All variants are built in one process and timed
one call at a time in turn (the median call is reported), so the machine's load falls on all
alike. Batches are full (B volumes): under Poisson sampling a batch has B volumes on average.
Memory: what a step needs above what is held between steps (weights, optimiser state): on a GPU
the rise of ``torch.cuda.max_memory_allocated`` during a call; on a CPU the rise of the peak RSS
over two steps, in a fresh process per variant.

Utility (``--utility``): the tiny preset trained at ε = 1, 8 and ∞ (δ = 1e-5) on one phantom
cohort (Poisson batches, the noise planned over the VQ-GAN and diffusion steps together, as a site
does): reconstruction PSNR of the VQ-GAN on the training cohort, and the conditioning check of
the diffusion model (``lsdm.metrics.NearestClassMean`` balanced accuracy of synthetic volumes
made from held-out maps, against their own map and against another subject's; real held-out
images give the ceiling, chance is 1/labels present).

    .venv/bin/python bench/bench_dp.py --preset tiny --device cpu --out bench/results/dp_tiny_cpu.md
    .venv/bin/python bench/bench_dp.py --utility --out bench/results/dp_utility_tiny_cpu.md
    .venv/bin/python bench/bench_dp.py --preset reference --device cuda \\
        --out bench/results/dp_reference_gpu.md
    .venv/bin/python bench/bench_dp.py --preset reference --device cpu --steps ldm_step \\
        --variants "DP default" --shape 32 128 128 --ldm-batch 2 --repeats 3 --warmup 1
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fresh_process import in_fresh_process

from lsdm import diffusion
from lsdm import vqgan as vq
from lsdm.config import LSDMConfig, preset
from lsdm.phantom import PHANTOM_LABELS
from node import privacy

VARIANTS = ("no DP", "DP default", "DP hooks", "DP functorch")
NETWORKS = {"vqgan_step": ("autoencoder", "discriminator"), "ldm_step": ("unet",)}


def _modes(variant: str, networks: tuple[str, ...]) -> dict[str, str] | None:
    if variant in ("no DP", "DP default"):
        return None
    mode = variant.split()[1]
    return dict.fromkeys(networks, mode)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _release(*nets) -> None:
    """Free the per-sample gradients once the step is taken (the next step would anyway), so
    that variants built side by side do not hold each other's."""
    for net in nets:
        for p in net.optimiser.params:
            p.grad_sample = None
            p.summed_grad = None


def build(name: str, variant: str, config: LSDMConfig, device: torch.device):
    """The step function of one measurement and variant, and the volumes one call handles."""
    torch.manual_seed(0)
    shape = config.data.shape
    private = variant != "no DP"
    generator = privacy.secret_generator(device)
    if name == "vqgan_step":
        batch = config.data.batch_size
        model = vq.VQGAN(config.vqgan).to(device)
        images = torch.rand(batch, 1, *shape, device=device) * 2 - 1
        step = config.vqgan.adversarial_start_step
        if not private:
            optimisers = vq.make_optimisers(model)
            return (lambda: vq.train_step(model, images, optimisers, step)), batch
        dp = privacy.make_private_vqgan(
            model, 1.0, 1.0, batch, generator, _modes(variant, NETWORKS[name])
        )

        def fn():
            privacy.private_vqgan_step(model, images, dp, step)
            _release(dp.autoencoder, dp.discriminator)

        return fn, batch
    batch = config.diffusion.batch_size
    latent_shape = config.vqgan.latent_shape(shape)
    model = diffusion.LatentDiffusion(config.diffusion, latent_shape[0], len(PHANTOM_LABELS)).to(
        device
    )
    latents = torch.rand(batch, *latent_shape, device=device) * 2 - 1
    index = torch.randint(0, len(PHANTOM_LABELS), (batch, *shape), device=device)
    maps = F.one_hot(index, len(PHANTOM_LABELS)).permute(0, 4, 1, 2, 3).float()
    if not private:
        optimiser = diffusion.make_optimiser(model)
        return (lambda: diffusion.train_step(model, latents, maps, optimiser)), batch
    modes = _modes(variant, NETWORKS[name])
    dp = privacy.make_private_ldm(
        model, 1.0, 1.0, batch, generator, modes["unet"] if modes else None
    )

    def fn():
        privacy.private_ldm_step(model, latents, maps, dp)
        _release(dp)

    return fn, batch


def time_all(
    name: str, config: LSDMConfig, device_name: str, repeats: int, warmup: int, variants
) -> dict:
    """Median seconds per call of each variant, timed one call at a time in turn; on a GPU
    also each variant's peak memory."""
    device = torch.device(device_name)
    built = {v: build(name, v, config, device) for v in variants}
    for fn, _ in built.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {v: [] for v in variants}
    peak = dict.fromkeys(variants, 0.0)
    for _ in range(repeats):
        for variant, (fn, _) in built.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[variant].append(time.perf_counter() - start)
            if device.type == "cuda":  # what the step needs above what is held between steps
                rise = (torch.cuda.max_memory_allocated() - resident) / 2**30
                peak[variant] = max(peak[variant], rise)
    return {
        v: {"seconds": statistics.median(times[v]), "volumes": built[v][1], "peak_gib": peak[v]}
        for v in variants
    }


def cpu_step_memory(name: str, variant: str, config: LSDMConfig) -> float:
    """Rise of the peak RSS (GiB) over two steps of one variant, in this (fresh) process."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    fn, _ = build(name, variant, config, torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB


def speed(args) -> str:
    config = preset(args.preset)
    overrides = {
        "data": {"shape": args.shape} if args.shape else {},
        "diffusion": {"batch_size": args.ldm_batch} if args.ldm_batch else {},
    }
    if args.vqgan_batch:
        overrides["data"]["batch_size"] = args.vqgan_batch
    config = config.with_overrides(**overrides)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    device_name = (
        torch.cuda.get_device_name() if on_gpu else (platform.processor() or platform.machine())
    )
    rows = []
    variants = ["no DP", *(v for v in VARIANTS if v in args.variants and v != "no DP")]
    for name in args.steps:
        results = in_fresh_process(
            time_all, name, config, args.device, args.repeats, args.warmup, variants
        )
        if not on_gpu:
            for v in variants:
                results[v]["peak_gib"] = in_fresh_process(cpu_step_memory, name, v, config)
        base = results["no DP"]
        for v in variants:
            r = results[v]
            rows.append(
                f"| {name} | {v} | {r['seconds'] * 1e3:.1f} | {r['volumes'] / r['seconds']:.3g} "
                f"| {r['seconds'] / base['seconds']:.2f}x | {r['peak_gib']:.3f} "
                f"| {r['peak_gib'] / max(base['peak_gib'], 1e-9):.2f}x |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    shape = "x".join(map(str, config.data.shape))
    memory = (
        "peak GPU memory of the step above the memory held between steps, GiB"
        if on_gpu
        else "peak RSS rise over 2 steps (fresh process), GiB"
    )
    defaults = ", ".join(f"{k}: {v}" for k, v in privacy.GRAD_SAMPLE_MODES.items())
    return "\n".join(
        [
            f"Preset `{args.preset}` (volumes 1x{shape}, VQ-GAN batch {config.data.batch_size} "
            f"with the discriminator on, LDM batch {config.diffusion.batch_size}); fp32 eager; "
            f"DP: clip 1.0, noise multiplier 1.0; default per-sample modes ({defaults}). "
            f"Device: {device_name}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads; median of {args.repeats} interleaved calls "
            f"after {args.warmup} warm-up calls.",
            "",
            f"| step | variant | ms/step | vol/s | time vs no DP | {memory} | memory vs no DP |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


# ---- utility ---------------------------------------------------------------------------------


def train_at(epsilon: float, cohort, heldout, config: LSDMConfig, seed: int = 0) -> dict:
    """VQ-GAN then LDM on ``cohort`` at ``epsilon`` (math.inf: no DP), as a DP site would;
    returns the reconstruction PSNR and the map agreement of samples from held-out maps."""
    from lsdm.data import StepBatchSampler, make_dataset
    from lsdm.diffusion import build_ldm
    from lsdm.generate import Generator
    from lsdm.metrics import NearestClassMean, paired_psnr_ssim
    from lsdm.train_ldm import encode_cohort
    from node.ledger import Segment, epsilon_of, plan_noise

    torch.manual_seed(seed)
    dataset = make_dataset(cohort, config.data)
    n = len(dataset)
    images = torch.stack([dataset[i]["image"] for i in range(n)])
    v_steps, d_steps = config.train.vqgan_steps, config.train.ldm_steps
    q_v = privacy.sample_rate(n, config.data.batch_size)
    q_d = privacy.sample_rate(n, config.diffusion.batch_size)
    private = math.isfinite(epsilon)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model = vq.VQGAN(config.vqgan)
    sigma, spent = None, math.inf
    if private:
        plan = [
            Segment(q_v, s, k)
            for s, k in privacy.vqgan_mechanisms(0, v_steps, config.vqgan.adversarial_start_step)
        ] + [Segment(q_d, d_steps)]
        sigma = plan_noise([], plan, epsilon, 1e-5, "rdp", 50.0)
        spent = epsilon_of([s.at(sigma) for s in plan], 1e-5, "rdp")
        dp = privacy.make_private_vqgan(model, sigma, 1.0, config.data.batch_size, generator)
        for step, batch in enumerate(privacy.poisson_batches(n, q_v, v_steps, generator)):
            privacy.private_vqgan_step(model, images[batch], dp, step)
        dp.close()
        codebook = model.codebook.detach()  # data-independent latent range (frozen codebook)
        model.set_latent_range(codebook.min(dim=0).values, codebook.max(dim=0).values)
    else:
        optimisers = vq.make_optimisers(model)
        sampler = StepBatchSampler(n, config.data.batch_size, seed, 0, v_steps)
        for step, batch in enumerate(sampler):
            vq.train_step(model, images[batch], optimisers, step)
        model.calibrate_latent_scale(images)
    recon = vq.reconstruct(model, images)
    psnr = float(
        np.mean([paired_psnr_ssim(images[i, 0], recon[i, 0])["psnr_db"] for i in range(n)])
    )

    encoded = encode_cohort(model, cohort, config)
    if private:
        encoded.latents.clamp_(-1.0, 1.0)
    ldm = build_ldm(config, len(cohort.labels))
    if private:
        dp = privacy.make_private_ldm(ldm, sigma, 1.0, config.diffusion.batch_size, generator)
        for batch in privacy.poisson_batches(n, q_d, d_steps, generator):
            latents, maps = encoded.batch(batch, "cpu")
            privacy.private_ldm_step(ldm, latents, maps, dp)
        dp.close()
    else:
        optimiser = diffusion.make_optimiser(ldm)
        for batch in StepBatchSampler(n, config.diffusion.batch_size, seed, 0, d_steps):
            latents, maps = encoded.batch(batch, "cpu")
            diffusion.train_step(ldm, latents, maps, optimiser)

    checker = NearestClassMean().fit(
        [dataset[i]["image"][0].numpy() for i in range(n)],
        [dataset[i]["map"].argmax(0).numpy() for i in range(n)],
    )
    held = make_dataset(heldout, config.data)
    maps = torch.stack([held[i]["map"] for i in range(len(held))])
    synthetic = Generator(model, ldm, config, cohort.labels).generate(maps, list(range(len(held))))
    own, swapped, real = [], [], []
    for i in range(len(held)):
        label_map = held[i]["map"].argmax(0).numpy()
        other = held[(i + 1) % len(held)]["map"].argmax(0).numpy()
        own.append(checker.balanced_accuracy(synthetic[i, 0].numpy(), label_map))
        swapped.append(checker.balanced_accuracy(synthetic[i, 0].numpy(), other))
        real.append(checker.balanced_accuracy(held[i]["image"][0].numpy(), label_map))
    return {
        "epsilon": epsilon,
        "spent": spent,
        "sigma": sigma,
        "psnr": psnr,
        "own": float(np.mean(own)),
        "swapped": float(np.mean(swapped)),
        "real": float(np.mean(real)),
        "seconds": time.perf_counter() - started,
    }


def utility(args) -> str:
    from lsdm.data import open_cohort
    from lsdm.phantom import write_cohort

    shape = tuple(args.shape or (24, 48, 48))
    args.vqgan_batch, args.ldm_batch = args.vqgan_batch or 4, args.ldm_batch or 8
    config = preset("tiny").with_overrides(
        data={"shape": shape, "batch_size": args.vqgan_batch},
        diffusion={"batch_size": args.ldm_batch},
        vqgan={"adversarial_start_step": args.vqgan_steps - args.vqgan_steps // 5},
        train={"vqgan_steps": args.vqgan_steps, "ldm_steps": args.ldm_steps},
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_cohort(Path(tmp) / "cohort", subjects=args.subjects, shape=shape, seed=0)
        write_cohort(Path(tmp) / "heldout", subjects=3, shape=shape, seed=1)
        cohort, heldout = open_cohort(Path(tmp) / "cohort"), open_cohort(Path(tmp) / "heldout")
        for epsilon in args.epsilons:
            r = train_at(epsilon, cohort, heldout, copy.deepcopy(config))
            sigma = "–" if r["sigma"] is None else f"{r['sigma']:.2f}"
            spent = "∞" if math.isinf(r["spent"]) else f"{r['spent']:.2f}"
            rows.append(
                f"| {'∞ (no DP)' if math.isinf(epsilon) else f'{epsilon:g}'} | {spent} | {sigma} "
                f"| {r['psnr']:.2f} | {r['own']:.3f} | {r['swapped']:.3f} | {r['real']:.3f} "
                f"| {r['seconds']:.0f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(
        [
            f"Utility of DP-SGD: tiny preset, volumes 1x{'x'.join(map(str, shape))}, "
            f"{args.subjects} phantom training subjects (seed 0), 3 held-out (seed 1); "
            f"VQ-GAN {args.vqgan_steps} steps (batch {args.vqgan_batch}, discriminator from step "
            f"{config.vqgan.adversarial_start_step}), LDM {args.ldm_steps} steps "
            f"(batch {args.ldm_batch}); DP: δ = 1e-5, clip 1.0, RDP, one noise multiplier for "
            f"both phases, Poisson batches, frozen codebook, codebook latent range. "
            f"Device: CPU, {torch.get_num_threads()} threads; torch {torch.__version__}.",
            "",
            "| ε target | ε spent | noise multiplier | VQ-GAN recon PSNR, dB "
            "| map agreement: synthetic vs own map | vs another map | real held-out | seconds |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Map agreement: NearestClassMean balanced accuracy (chance ~0.2 with 5 labels).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "reference"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--steps", nargs="+", choices=list(NETWORKS), default=list(NETWORKS), help="steps to time"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="DP variants to time (the step without DP always is)",
    )
    parser.add_argument("--utility", action="store_true", help="train at several ε instead")
    parser.add_argument(
        "--epsilons", type=float, nargs="+", default=[1.0, 8.0, math.inf], help="for --utility"
    )
    parser.add_argument("--subjects", type=int, default=16, help="for --utility")
    parser.add_argument(
        "--shape", type=int, nargs=3, help="default: the preset's; 24 48 48 for --utility"
    )
    parser.add_argument("--vqgan-steps", type=int, default=200, help="for --utility")
    parser.add_argument("--ldm-steps", type=int, default=500, help="for --utility")
    parser.add_argument("--vqgan-batch", type=int, help="default: the preset's; 4 for --utility")
    parser.add_argument("--ldm-batch", type=int, help="default: the preset's; 8 for --utility")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    table = utility(args) if args.utility else speed(args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
