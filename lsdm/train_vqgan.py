"""Central training of the VQ-GAN on one cohort, with checkpoints, metrics and exact resume.

Resuming from step ``s`` gives the run an uninterrupted one would have had: model and optimiser
state come from the checkpoint, the batch of every step is a function of the step
(:class:`lsdm.data.StepBatchSampler`), and torch's random state is re-seeded per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import PSNRMetric

from lsdm.checkpoint import load_checkpoint, save_checkpoint
from lsdm.cohort import NIFTI_SUFFIX, write_nifti
from lsdm.config import LSDMConfig
from lsdm.data import Cohort, make_dataset, make_loader
from lsdm.errors import InputError
from lsdm.preview import save_sheet
from lsdm.run_folder import RunFolder
from lsdm.vqgan import VQGAN, make_optimisers, reconstruct, train_step

StepCallback = Callable[[int, int, dict[str, float]], None]


@dataclass
class VQGANRun:
    model: VQGAN
    step: int
    psnr: dict[str, float]  # reconstruction PSNR (dB, on the [-1, 1] scale) per previewed subject


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def _checkpoint(run: RunFolder, model: VQGAN, optimisers, step: int) -> None:
    model.calibrate_latent_scale()
    save_checkpoint(
        run.checkpoint_path,
        {"vqgan": model},
        {"autoencoder": optimisers.autoencoder, "discriminator": optimisers.discriminator},
        {"kind": "vqgan", "step": step},
    )


def load_vqgan(path: Path, config: LSDMConfig, device: torch.device | str = "cpu") -> VQGAN:
    model = VQGAN(config.vqgan).to(device)
    load_checkpoint(path, {"vqgan": model}, device=device)
    return model.eval()


def train_vqgan(
    cohort: Cohort,
    config: LSDMConfig,
    out: Path,
    resume: bool = False,
    on_step: StepCallback | None = None,
    device: torch.device | None = None,
) -> VQGANRun:
    """Train for ``config.train.steps`` steps in all (a resumed run counts its earlier steps)."""
    run = RunFolder(out)
    run.check_can_start(resume)
    device = device or default_device()
    steps = config.train.steps
    if resume:
        saved, labels = run.read_config()
        if labels != cohort.labels:
            raise InputError(f"cohort vocabulary {cohort.labels} differs from the run's {labels}")
        config = saved.with_overrides(train={"steps": steps})
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_config(config, cohort.labels)

    seed = config.train.seed
    torch.manual_seed(seed)
    model = VQGAN(config.vqgan).to(device)
    optimisers = make_optimisers(model)
    start = 0
    if resume:
        start = load_checkpoint(
            run.checkpoint_path,
            {"vqgan": model},
            {"autoencoder": optimisers.autoencoder, "discriminator": optimisers.discriminator},
            device=device,
        )["step"]
        run.forget_metrics_after(start)

    dataset = make_dataset(cohort, config.data)
    window: list[dict[str, float]] = []
    window_start = time.perf_counter()
    batches = make_loader(dataset, config.data, seed, start, steps)
    for step, batch in zip(range(start, steps), batches, strict=True):
        torch.manual_seed(step_seed(seed, step))
        losses = train_step(model, batch["image"].to(device), optimisers, step)
        window.append(losses)
        done = step + 1
        if done % config.train.log_every == 0 or done == steps:
            elapsed = time.perf_counter() - window_start
            means = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
            run.log(
                {
                    "step": done,
                    **means,
                    "volumes_per_s": len(window) * config.data.batch_size / elapsed,
                }
            )
            window, window_start = [], time.perf_counter()
        if done % config.train.checkpoint_every == 0 or done == steps:
            _checkpoint(run, model, optimisers, done)
        if on_step is not None:
            on_step(done, steps, losses)
    psnr = write_reconstructions(model, dataset, cohort, config, out)
    return VQGANRun(model=model, step=max(start, steps), psnr=psnr)


def write_reconstructions(model: VQGAN, dataset, cohort: Cohort, config: LSDMConfig, out: Path):
    """Reconstruct the first subjects: NIfTI files on the model's grid, a PNG of real beside
    reconstruction (mid-slices in three planes), and the PSNR of each."""
    device = next(model.parameters()).device
    folder = Path(out) / "reconstructions"
    folder.mkdir(parents=True, exist_ok=True)
    rows, psnr = [], {}
    metric = PSNRMetric(max_val=2.0)  # intensities span [-1, 1]
    for index in range(min(config.train.preview_subjects, len(dataset))):
        item = dataset[index]
        image = item["image"].unsqueeze(0).to(device)
        recon = reconstruct(model, image)
        sid = cohort.ids[index]
        psnr[sid] = float(metric(recon, image).item())
        affine = np.asarray(item["image"].affine)
        write_nifti(folder / f"{sid}{NIFTI_SUFFIX}", recon[0, 0].cpu().numpy(), affine)
        rows.append(
            (
                f"{sid}\n{psnr[sid]:.1f} dB",
                [
                    ("real", image[0, 0].cpu().numpy()),
                    ("reconstruction", recon[0, 0].cpu().numpy()),
                ],
            )
        )
    save_sheet(rows, Path(out) / "preview.png")
    return psnr
