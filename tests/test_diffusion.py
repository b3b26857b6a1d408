"""Latent diffusion: volumes follow their maps, guidance is trained and helps, sampling is
deterministic and resumable, training resumes exactly, both objectives run."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from lsdm.config import preset
from lsdm.data import make_dataset, open_cohort
from lsdm.diffusion import (
    LatentDiffusion,
    diffusion_loss,
    guided_prediction,
    load_ldm,
    make_optimiser,
    null_maps_for,
    train_step,
)
from lsdm.generate import Generator
from lsdm.metrics import NearestClassMean
from lsdm.train_ldm import encode_cohort, train_ldm
from lsdm.vqgan import load_vqgan
from tests.helpers import conditioning_config


@pytest.fixture(scope="module")
def generator(trained_models) -> Generator:
    return Generator.from_checkpoints(trained_models.vqgan, trained_models.ldm, "cpu")


@pytest.fixture(scope="module")
def real(trained_models, generator):
    """The training subjects as the models saw them: images in [-1, 1], maps, one-hot maps."""
    dataset = make_dataset(open_cohort(trained_models.cohort), generator.config.data)
    items = [dataset[i] for i in range(len(dataset))]
    return {
        "images": [item["image"][0].numpy() for item in items],
        "labels": [item["map"].argmax(0).numpy() for item in items],
        "one_hot": torch.stack([item["map"] for item in items]),
    }


def _agreement(checker, volumes, label_maps) -> float:
    return float(
        np.mean(
            [
                checker.balanced_accuracy(v[0].numpy(), m)
                for v, m in zip(volumes, label_maps, strict=True)
            ]
        )
    )


def test_generated_volumes_follow_their_maps_and_guidance_helps(generator, real):
    """The check: a nearest-class-mean voxel classifier fitted on the real images (label ->
    mean intensity) labels the voxels of a synthetic volume; its balanced accuracy against the
    map the volume came from says how well the volume follows the map (chance: 0.2 for 5
    labels; real images score ~0.6). A volume generated from a *different* map (the same map
    mirrored front to back, so the breasts lie where the body was) is scored against the
    original map and must score clearly worse."""
    checker = NearestClassMean().fit(real["images"], real["labels"])
    maps, labels, seeds = real["one_hot"][:3], real["labels"][:3], [0, 1, 2]
    real_score = np.mean(
        [
            checker.balanced_accuracy(i, m)
            for i, m in zip(real["images"], real["labels"], strict=True)
        ]
    )
    guided = _agreement(checker, generator.generate(maps, seeds, 25, 1.5), labels)
    unguided = _agreement(checker, generator.generate(maps, seeds, 25, 0.0), labels)
    other_map = _agreement(checker, generator.generate(maps.flip(3), seeds, 25, 1.5), labels)
    # measured on this machine: real ~0.62, guided ~0.44, unguided ~0.39, other map ~0.24
    assert real_score > 0.5
    assert guided > 0.35, guided
    assert guided > other_map + 0.1, (guided, other_map)
    assert guided > unguided + 0.02, (guided, unguided)


def test_unconditional_branch_is_trained(trained_models, generator, real):
    """Maps were nulled for ~20% of training samples, and it shows: the network's null-map
    prediction is a trained denoiser (its loss fell far below that of an untrained network),
    the map still helps (conditional loss below unconditional), and the two predictions differ."""
    metrics = [json.loads(line) for line in (trained_models.ldm_run / "metrics.jsonl").open()]
    null_share = np.mean([m["null_share"] for m in metrics])
    assert 0.15 < null_share < 0.25  # 500 steps x 8 samples at a configured 0.2

    ldm = generator.ldm
    vqgan, _ = load_vqgan(trained_models.vqgan)
    encoded = encode_cohort(vqgan, open_cohort(trained_models.cohort), generator.config)
    latents, maps = encoded.batch(list(range(8)), "cpu")
    null = torch.zeros_like(maps)
    untrained = LatentDiffusion(ldm.config, latents.shape[1], maps.shape[1]).eval()
    untrained.unet = untrained.ema.module

    def loss(model, condition):
        torch.manual_seed(0)
        model.unet, saved = model.ema.module, model.unet  # judge the sampling (EMA) weights
        with torch.no_grad():
            values = [diffusion_loss(model, latents, condition).item() for _ in range(8)]
        model.unet = saved
        return float(np.mean(values))

    trained_null, trained_map = loss(ldm, null), loss(ldm, maps)
    assert trained_null < 0.5 * loss(untrained, null)
    assert trained_map < trained_null

    with torch.no_grad():
        t = torch.full((8,), 500)
        noisy = 0.5 * latents + 0.5 * torch.randn_like(latents)
        conditional = ldm.ema.module(noisy, t, seg=maps)
        unconditional = ldm.ema.module(noisy, t, seg=null)
    assert (conditional - unconditional).norm() > 0.05 * conditional.norm()


def test_guidance_combines_both_halves_from_one_batched_forward(generator, real):
    network = generator.ldm.ema.module
    calls = []
    handle = network.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    torch.manual_seed(0)
    maps = real["one_hot"][:2]
    x = torch.randn(2, *generator.vqgan.latent_shape(maps.shape[2:]))
    with torch.no_grad():
        guided = guided_prediction(network, x, 300, maps, 1.5)
        assert calls == [4]  # one forward pass, batch 2B
        t = torch.full((2,), 300)
        expected_cond, expected_null = network(x, t, seg=maps), network(x, t, seg=maps * 0)
    handle.remove()
    torch.testing.assert_close(
        guided, expected_null + 1.5 * (expected_cond - expected_null), rtol=1e-4, atol=1e-5
    )


def test_null_maps_replace_exactly_the_dropped_samples():
    maps = torch.ones(4, 5, 2, 2, 2)
    nulled = null_maps_for(maps, torch.tensor([True, False, True, False]))
    assert nulled[[0, 2]].abs().sum() == 0 and torch.equal(nulled[[1, 3]], maps[[1, 3]])


def test_same_seed_same_volume_and_other_seed_another(generator, real):
    maps = real["one_hot"][:2]
    a = generator.generate(maps, [7, 8], steps=10)
    b = generator.generate(maps, [7, 8], steps=10)
    alone = generator.generate(maps[1:], [8], steps=10)  # batch composition does not matter
    other = generator.generate(maps, [9, 10], steps=10)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[1:], alone, rtol=1e-4, atol=1e-4)
    assert (a - other).abs().mean() > 0.01


def test_sampling_a_folder_resumes_and_keeps_each_maps_geometry(
    generator, trained_models, tmp_path
):
    ras_dir, lps_dir = tmp_path / "ras", tmp_path / "lps"
    ras_dir.mkdir()
    lps_dir.mkdir()
    sources = sorted((trained_models.cohort / "maps").glob("*.nii.gz"))[:3]
    for source in sources:
        (ras_dir / source.name).write_bytes(source.read_bytes())
    # the first map again, under the same name, stored in LPS voxel order
    img = nib.load(sources[0])
    to_lps = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("LPS"))
    lps_affine = img.affine @ nib.orientations.inv_ornt_aff(to_lps, img.shape)
    lps_data = apply_orientation(np.asarray(img.dataobj), to_lps)
    nib.save(nib.Nifti1Image(lps_data, lps_affine), lps_dir / sources[0].name)

    ras_out, lps_out = tmp_path / "ras_out", tmp_path / "lps_out"
    made = generator.generate_folder(generator.check_folder(ras_dir), ras_out, seed=3, steps=5)
    assert made == [s.name[: -len(".nii.gz")] for s in sources]
    generator.generate_folder(generator.check_folder(lps_dir), lps_out, seed=3, steps=5)
    for out, folder in ((ras_out, ras_dir), (lps_out, lps_dir)):
        for source in folder.iterdir():
            image = nib.load(out / "images" / source.name)
            used_map = nib.load(out / "maps" / source.name)
            given = nib.load(source)
            # the volume overlays its map: same grid, same affine; the map is written back as given
            assert image.shape == given.shape
            np.testing.assert_allclose(image.affine, given.affine)
            np.testing.assert_array_equal(np.asarray(used_map.dataobj), np.asarray(given.dataobj))
            values = np.asarray(image.dataobj)
            assert values.min() >= -1.0 and values.max() <= 1.0
    # generated in RAS either way: the LPS volume is the RAS volume in LPS voxel order
    ras_volume = np.asarray(nib.load(ras_out / "images" / sources[0].name).dataobj)
    lps_volume = np.asarray(nib.load(lps_out / "images" / sources[0].name).dataobj)
    np.testing.assert_allclose(apply_orientation(ras_volume, to_lps), lps_volume, atol=1e-5)

    # resume: remove one output, run again; only that one is made, and made identically
    first = sources[1].name
    before = np.asarray(nib.load(ras_out / "images" / first).dataobj)
    kept_mtime = (ras_out / "images" / sources[2].name).stat().st_mtime_ns
    (ras_out / "images" / first).unlink()
    again = generator.generate_folder(generator.check_folder(ras_dir), ras_out, seed=3, steps=5)
    assert again == [first[: -len(".nii.gz")]]
    # (identical up to float rounding: it was made in a batch of one, not three)
    again_volume = np.asarray(nib.load(ras_out / "images" / first).dataobj)
    np.testing.assert_allclose(again_volume, before, atol=1e-5)
    assert (ras_out / "images" / sources[2].name).stat().st_mtime_ns == kept_mtime


def test_ldm_resume_matches_an_uninterrupted_run(trained_models, tmp_path):
    cohort = open_cohort(trained_models.cohort)
    config = conditioning_config(ldm_steps=20)
    straight = train_ldm(cohort, trained_models.vqgan, config, tmp_path / "straight")
    short = config.with_overrides(train={"ldm_steps": 10})
    train_ldm(cohort, trained_models.vqgan, short, tmp_path / "split")
    resumed = train_ldm(cohort, trained_models.vqgan, config, tmp_path / "split", resume=True)
    assert resumed.step == straight.step == 20
    a = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    b = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").open()]
    assert [m["step"] for m in a] == [m["step"] for m in b]
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], rel=1e-3)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-3, atol=1e-5)
    _, _, _, metadata = load_ldm(tmp_path / "split" / "checkpoint.safetensors")
    assert metadata["step"] == 20


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_objectives_learn_and_sample_with_ddim(trained_models, prediction):
    config = preset("tiny").diffusion.model_copy(
        update={"objective": "ddpm", "prediction": prediction}
    )
    vqgan, vq_config = load_vqgan(trained_models.vqgan)
    encoded = encode_cohort(vqgan, open_cohort(trained_models.cohort), vq_config)
    latents, maps = encoded.batch(list(range(8)), "cpu")
    torch.manual_seed(0)
    model = LatentDiffusion(config, latents.shape[1], maps.shape[1])
    optimiser = make_optimiser(model)

    def held_loss() -> float:  # the same noise and timesteps before and after training
        torch.manual_seed(123)
        with torch.no_grad():
            return float(np.mean([diffusion_loss(model, latents, maps).item() for _ in range(8)]))

    before = held_loss()
    torch.manual_seed(0)
    for _ in range(60):
        train_step(model, latents, maps, optimiser)
    assert held_loss() < 0.6 * before
    labels = open_cohort(trained_models.cohort).labels
    generator = Generator(vqgan, model, vq_config.model_copy(update={"diffusion": config}), labels)
    volumes = generator.generate(maps[:1], [0], steps=10)
    assert volumes.shape == (1, 1, 24, 48, 48) and torch.isfinite(volumes).all()
