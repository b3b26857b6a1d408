"""The VQ-GAN learns, its latent interface round-trips, and a resumed run matches a straight one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.metrics import PSNRMetric

from lsdm.checkpoint import load_checkpoint
from lsdm.config import preset
from lsdm.data import make_dataset, open_cohort
from lsdm.train_vqgan import train_vqgan
from lsdm.vqgan import VQGAN, load_vqgan, reconstruct
from tests.helpers import small_config


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_vqgan_learns_to_reconstruct(small_cohort, tmp_path):
    # 150 steps, the last 40 with the discriminator, adversarial loss and feature matching on.
    config = small_config(150, adversarial_start_step=110)
    run = train_vqgan(open_cohort(small_cohort), config, tmp_path / "run")
    metrics = _metrics(tmp_path / "run")
    first, last = metrics[0]["recon_l1"], metrics[-1]["recon_l1"]
    # Thresholds: an untrained decoder starts near L1 0.6-0.9 on [-1, 1] volumes, and 150 steps
    # reach about a quarter of that. A broken loss, optimiser or decoder stays near the start.
    assert last < 0.35 * first, (first, last)
    assert {"adversarial", "feature_matching", "discriminator"} <= set(metrics[-1])
    assert all(np.isfinite(v) for v in metrics[-1].values())

    untrained = VQGAN(config.vqgan)
    dataset = make_dataset(open_cohort(small_cohort), config.data)
    metric = PSNRMetric(max_val=2.0)
    images = torch.stack([dataset[i]["image"] for i in range(2)])
    psnr_before = metric(reconstruct(untrained, images), images).mean().item()
    trained_psnr = float(np.mean(list(run.psnr.values())))
    # An untrained model scores ~5-8 dB; 150 steps give ~18 dB. Demand 15 dB and a 7 dB gain.
    assert trained_psnr > 15.0 and trained_psnr > psnr_before + 7.0, (psnr_before, trained_psnr)

    out = tmp_path / "run"
    assert (out / "preview.png").stat().st_size > 10_000
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == [
        f"{sid}.nii.gz" for sid in open_cohort(small_cohort).ids[:2]
    ]
    # the saved checkpoint is the trained model
    reloaded, reloaded_config = load_vqgan(out / "checkpoint.safetensors")
    assert reloaded_config == config
    torch.testing.assert_close(reconstruct(reloaded, images), reconstruct(run.model, images))


def test_resume_matches_an_uninterrupted_run(small_cohort, tmp_path):
    cohort = open_cohort(small_cohort)
    n = 20
    config = small_config(2 * n, adversarial_start_step=n // 2)
    straight = train_vqgan(cohort, config, tmp_path / "straight")

    train_vqgan(cohort, config.with_overrides(train={"vqgan_steps": n}), tmp_path / "split")
    resumed = train_vqgan(cohort, config, tmp_path / "split", resume=True)

    assert resumed.step == straight.step == 2 * n
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [m["step"] for m in a] == [m["step"] for m in b]  # no step logged twice or missed
    for key in ("recon_l1", "discriminator"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-3)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-3, atol=1e-5)


def test_resume_needs_a_checkpoint_and_a_new_run_needs_an_empty_folder(small_cohort, tmp_path):
    from lsdm.errors import InputError

    cohort = open_cohort(small_cohort)
    with pytest.raises(InputError, match="nothing to resume"):
        train_vqgan(cohort, small_config(1), tmp_path / "none", resume=True)
    train_vqgan(cohort, small_config(1), tmp_path / "run")
    with pytest.raises(InputError, match="use --resume"):
        train_vqgan(cohort, small_config(2), tmp_path / "run")


def test_latent_interface_scales_to_unit_range_and_decodes():
    config = preset("tiny").vqgan
    model = VQGAN(config).eval()
    images = torch.rand(3, 1, 16, 32, 32) * 2 - 1
    model.calibrate_latent_scale(images)
    with torch.no_grad():
        latents = model.encode(images)
        assert latents.shape == (3, config.embedding_dim, 4, 8, 8)
        # every channel of the calibration latents spans exactly [-1, 1]
        per_channel = latents.transpose(0, 1).flatten(1)
        torch.testing.assert_close(per_channel.min(1).values, -torch.ones(config.embedding_dim))
        torch.testing.assert_close(per_channel.max(1).values, torch.ones(config.embedding_dim))
        # decode(encode(x)) is the autoencoder's own reconstruction
        torch.testing.assert_close(model.decode(latents), model.autoencoder(images)[0])


def test_reference_preset_is_med_lsdm_scale():
    config = preset("reference")
    assert config.data.shape == (32, 256, 256)
    model = VQGAN(config.vqgan)
    assert model.codebook.shape == (16384, 8)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with torch.no_grad():  # 4x per axis: 32x256x256 -> 8x64x64 (checked on a smaller input)
        assert model.autoencoder.encode(torch.zeros(1, 1, 8, 16, 16)).shape == (1, 8, 2, 4, 4)


def test_checkpoint_restores_optimiser_state(small_cohort, tmp_path):
    from lsdm.vqgan import make_optimisers

    cohort = open_cohort(small_cohort)
    config = small_config(3, adversarial_start_step=1)
    run = train_vqgan(cohort, config, tmp_path / "run")
    model = VQGAN(config.vqgan)
    optimisers = make_optimisers(model)
    meta = load_checkpoint(
        tmp_path / "run" / "checkpoint.safetensors",
        {"vqgan": model},
        {"autoencoder": optimisers.autoencoder, "discriminator": optimisers.discriminator},
    )
    assert meta["kind"] == "vqgan" and meta["step"] == 3
    state = optimisers.autoencoder.state_dict()["state"]
    assert len(state) > 0 and all(float(s["step"]) == 3 for s in state.values())
    disc_state = optimisers.discriminator.state_dict()["state"]
    assert all(float(s["step"]) == 2 for s in disc_state.values())  # steps 1 and 2
    for name, value in run.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)
