"""Central training of the VQ-GAN on one cohort, with checkpoints, metrics and exact resume
(see :mod:`lsdm.training`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import PSNRMetric

from lsdm.checkpoint import checkpoint_identity, load_checkpoint, save_checkpoint
from lsdm.cohort import NIFTI_SUFFIX, write_nifti
from lsdm.config import LSDMConfig
from lsdm.data import Cohort, make_dataset, make_loader
from lsdm.preview import save_sheet
from lsdm.training import StepCallback, begin_run, default_device, run_steps
from lsdm.vqgan import VQGAN, make_optimisers, reconstruct, train_step

CALIBRATION_SUBJECTS = 16  # volumes whose latents set the latent scaling at every checkpoint


@dataclass
class VQGANRun:
    model: VQGAN
    step: int
    psnr: dict[str, float]  # reconstruction PSNR (dB, on the [-1, 1] scale) per previewed subject


def train_vqgan(
    cohort: Cohort,
    config: LSDMConfig,
    out: Path,
    resume: bool = False,
    on_step: StepCallback | None = None,
    device: torch.device | None = None,
) -> VQGANRun:
    """Train for ``config.train.vqgan_steps`` steps in all (a resumed run counts its earlier
    steps); then reconstruct the first subjects into ``out/reconstructions`` and a preview."""
    run, config = begin_run(out, config, cohort.labels, resume, "vqgan_steps")
    device = device or default_device()
    steps, seed = config.train.vqgan_steps, config.train.seed
    torch.manual_seed(seed)
    model = VQGAN(config.vqgan).to(device)
    optimisers = make_optimisers(model)
    named_optimisers = {
        "autoencoder": optimisers.autoencoder,
        "discriminator": optimisers.discriminator,
    }
    start = 0
    if resume:
        start = load_checkpoint(
            run.checkpoint_path, {"vqgan": model}, named_optimisers, device=device
        )["step"]
        run.forget_metrics_after(start)

    dataset = make_dataset(cohort, config.data)
    calibration = torch.stack(
        [dataset[i]["image"] for i in range(min(CALIBRATION_SUBJECTS, len(dataset)))]
    ).to(device)

    label_balanced = config.vqgan.recon_label_balance > 0  # only then does the loss read maps

    def save(step: int) -> None:
        model.calibrate_latent_scale(calibration)
        metadata = {"kind": "vqgan", "step": step, **checkpoint_identity(config, cohort.labels)}
        save_checkpoint(run.checkpoint_path, {"vqgan": model}, named_optimisers, metadata)

    run_steps(
        run,
        config,
        start,
        steps,
        make_loader(dataset, config.data, seed, start, steps),
        lambda step, batch: train_step(
            model,
            batch["image"].to(device),
            optimisers,
            step,
            batch["map"].to(device) if label_balanced else None,
        ),
        save,
        config.data.batch_size,
        on_step,
    )
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
