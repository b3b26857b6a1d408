"""How the map reaches the denoiser (label fractions, the map at the UNet input) and how latents
are scaled (range or unit variance)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks.spade_norm import SPADE

from lsdm.config import DiffusionConfig, preset
from lsdm.diffusion import AreaSPADE, LatentDiffusion, label_fractions
from lsdm.vqgan import VQGAN

NUM_LABELS = 3


def one_hot(label_index: torch.Tensor) -> torch.Tensor:
    return F.one_hot(label_index.long(), NUM_LABELS).permute(0, 4, 1, 2, 3).float()


def test_label_fractions_keep_a_thin_structure_that_nearest_resizing_loses():
    labels = torch.zeros(1, 16, 32, 32, dtype=torch.long)
    labels[0, 5, :, 9] = 2  # a one-voxel vessel along H, off the nearest-sampling grid
    maps = one_hot(labels)
    fractions = label_fractions(maps, (4, 8, 8))
    nearest = F.interpolate(maps, size=(4, 8, 8), mode="nearest")
    assert torch.allclose(fractions.sum(dim=1), torch.ones(1, 4, 8, 8))
    # every 4x4x4 block the vessel crosses holds its share (4 voxels of 64), nearest holds none
    assert torch.allclose(fractions[0, 2, 1, :, 2], torch.full((8,), 4 / 64))
    assert nearest[0, 2].sum() == 0


def _diffusion(**overrides) -> LatentDiffusion:
    # the map reaches the UNet through SPADE alone, on unfolded latents, unless a test says so
    plain = {"map_at_input": False, "latent_patch": 1}
    config = preset("tiny").diffusion.model_copy(update=plain | overrides)
    DiffusionConfig.model_validate(config.model_dump())
    torch.manual_seed(0)
    model = LatentDiffusion(config, latent_channels=4, num_labels=NUM_LABELS)
    for parameter in model.unet.parameters():  # MONAI zeroes the output layers at creation
        torch.nn.init.normal_(parameter, std=0.05)
    return model


def test_area_resize_swaps_every_spade_and_the_map_at_input_widens_the_first_layer():
    nearest = _diffusion(map_resize="nearest")
    area = _diffusion(map_resize="area", map_at_input=True)
    assert not any(isinstance(m, AreaSPADE) for m in nearest.unet.modules())
    spades = [m for m in area.unet.modules() if isinstance(m, AreaSPADE)]
    assert spades and len(spades) == sum(type(m) is SPADE for m in nearest.unet.modules())
    assert area.unet.conv_in.conv.in_channels == 4 + NUM_LABELS
    assert nearest.unet.conv_in.conv.in_channels == 4
    # the parameter names stay MONAI's: the two differ only in the first layer's input width
    differing = {
        k
        for k, v in area.unet.state_dict().items()
        if v.shape != nearest.unet.state_dict()[k].shape
    }
    assert differing == {"conv_in.conv.weight"}


def test_area_conditioning_sees_a_thin_structure_that_nearest_conditioning_ignores():
    """Moving a one-voxel vessel by one voxel changes the output of the area-conditioned UNet;
    the nearest-conditioned one, which never samples that voxel, cannot tell the two apart."""
    latents, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([10])
    maps = []
    for column in (9, 13):  # other 4-voxel blocks, and neither on nearest's samples (8, 12)
        labels = torch.zeros(1, 16, 32, 32, dtype=torch.long)
        labels[0, 5, :, column] = 2
        maps.append(one_hot(labels))
    for resize, should_differ in (("nearest", False), ("area", True)):
        model = _diffusion(map_resize=resize).unet.eval()
        with torch.no_grad():
            a, b = (model(latents, t, seg=m) for m in maps)
        assert (not torch.allclose(a, b)) == should_differ, resize


def test_std_latent_scaling_gives_unit_variance_latents():
    config = preset("tiny").vqgan.model_copy(update={"latent_scaling": "std"})
    torch.manual_seed(0)
    model = VQGAN(config)
    images = torch.rand(4, 1, 16, 32, 32) * 2 - 1
    model.calibrate_latent_scale(images)
    with torch.no_grad():
        latents = model.encode(images).transpose(0, 1).flatten(1)
    assert torch.allclose(latents.mean(dim=1), torch.zeros(4), atol=1e-4)
    assert torch.allclose(latents.std(dim=1), torch.ones(4), atol=1e-3)
    low, high = model.codebook_latent_range()
    assert (high > low).all()


def test_label_balance_weighs_rare_labels_by_their_share_and_each_volume_alone():
    from lsdm.vqgan import label_balance_weights

    labels = torch.zeros(2, 4, 8, 8, dtype=torch.long)
    labels[0, 0, 0, :4] = 2  # volume 0: 4 voxels of a rare label, 252 of background
    labels[1, :2] = 1  # volume 1: half label 1, half background
    maps = one_hot(labels)
    weights = label_balance_weights(maps, 0.5)
    assert torch.allclose(weights.mean(dim=(2, 3, 4)), torch.ones(2, 1))
    rare, common = weights[0, 0, 0, 0, 0], weights[0, 0, 3, 7, 7]
    assert torch.isclose(rare / common, torch.tensor((252 / 4) ** 0.5))
    assert torch.allclose(weights[1], torch.ones_like(weights[1]))  # equal shares: equal weights
    assert torch.allclose(label_balance_weights(maps, 0.0), torch.ones_like(weights))
    # a volume's weights read only its own map
    alone = label_balance_weights(maps[:1], 0.5)
    assert torch.allclose(alone, weights[:1])


def test_a_latent_patch_folds_blocks_into_channels_and_keeps_each_voxel_its_own_output():
    """``latent_patch: 2``: the UNet runs on 2x2x2 blocks folded into 8x the channels and hands
    back the latent's own shape; folding must not merge the voxels of a block, so moving one
    voxel or its neighbour in the same block gives different outputs."""
    folded = _diffusion(latent_patch=2, map_at_input=True)
    assert folded.unet.conv_in.conv.in_channels == (4 + NUM_LABELS) * 8
    assert folded.unet.out[-1].conv.out_channels == 4 * 8
    assert folded.downsampling == 2 * _diffusion().downsampling
    network = folded.unet.eval()
    labels = torch.zeros(1, 16, 32, 32, dtype=torch.long)
    maps, t = one_hot(labels), torch.tensor([10])
    latents = torch.randn(1, 4, 8, 16, 16)
    moved = [latents.clone(), latents.clone()]
    moved[0][0, :, 2, 2, 2] += 1.0  # two voxels of the same 2x2x2 block
    moved[1][0, :, 2, 2, 3] += 1.0
    with torch.no_grad():
        out = [network(x, t, seg=maps) for x in (latents, *moved)]
    assert out[0].shape == latents.shape
    assert not torch.allclose(out[1], out[2])


def test_a_config_checks_its_volume_against_the_vqgan_compression_and_the_latent_patch():
    base = preset("tiny")
    # 4x VQ-GAN, 2 UNet levels: every side divides by 8; with a latent patch of 2, by 16
    assert base.with_overrides(data={"shape": (8, 16, 24)}).data.shape == (8, 16, 24)
    with pytest.raises(ValueError, match="divisible by 16"):
        base.with_overrides(data={"shape": (8, 16, 24)}, diffusion={"latent_patch": 2})
    # a 2x VQ-GAN with a latent patch of 2 asks for what the 4x one alone does
    fine = base.with_overrides(
        data={"shape": (8, 16, 24)}, vqgan={"downsampling": 2}, diffusion={"latent_patch": 2}
    )
    model = VQGAN(fine.vqgan).eval()
    assert model.latent_shape((8, 16, 24)) == (4, 4, 8, 12)
    with torch.no_grad():
        images = torch.zeros(1, 1, 8, 16, 24)
        assert model.autoencoder.encode(images).shape == (1, 4, 4, 8, 12)
        assert model.autoencoder(images)[0].shape == images.shape
