"""User-supplied 3D ResNet weights (MedicalNet's file layout) as a Fréchet-distance extractor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lsdm.errors import InputError
from lsdm.resnet_features import build_resnet, load_resnet_extractor


class Payload:
    """Any class: unpickling it would run code of the pickler's choosing."""


def _medicalnet_file(path, depth: int, seed: int = 0) -> torch.nn.Module:
    """Weights saved the way MedicalNet's releases are: nested, DataParallel prefixes, seg head."""
    torch.manual_seed(seed)
    network = build_resnet(depth)
    state = {f"module.{k}": v for k, v in network.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(2, 512, 1, 1, 1)
    torch.save({"state_dict": state, "epoch": 0}, path)
    return network


def test_medicalnet_weights_load_and_give_the_networks_features(tmp_path):
    original = _medicalnet_file(tmp_path / "resnet_10.pth", 10).eval()
    extractor = load_resnet_extractor(tmp_path / "resnet_10.pth", 10)
    volumes = torch.randn(3, 1, 16, 32, 32) * 5 + 2
    features = extractor.features(volumes)
    assert features.shape == (3, 512)
    with torch.no_grad():
        z = (volumes[1:2] - volumes[1].mean()) / volumes[1].std()
        assert torch.allclose(features[1], original(z)[0], atol=1e-5)
    assert "ResNet-10" in extractor.name and "resnet_10.pth" in extractor.name
    assert len(extractor.sha256) == 64


def test_safetensors_weights_load(tmp_path):
    torch.manual_seed(1)
    network = build_resnet(18)
    save_file(network.state_dict(), str(tmp_path / "r18.safetensors"))
    extractor = load_resnet_extractor(tmp_path / "r18.safetensors", 18)
    volumes = torch.randn(2, 1, 16, 32, 32)
    network.eval()
    with torch.no_grad():
        z = (volumes[:1] - volumes[0].mean()) / volumes[0].std()
        assert torch.allclose(extractor.features(volumes)[0], network(z)[0], atol=1e-5)


def test_weights_of_another_depth_or_format_are_refused(tmp_path):
    _medicalnet_file(tmp_path / "resnet_10.pth", 10)
    with pytest.raises(InputError, match="does not fit a MedicalNet 3D ResNet-34"):
        load_resnet_extractor(tmp_path / "resnet_10.pth", 34)
    with pytest.raises(InputError, match="no 3D ResNet of depth 11"):
        load_resnet_extractor(tmp_path / "resnet_10.pth", 11)
    with pytest.raises(InputError, match="no such weights file"):
        load_resnet_extractor(tmp_path / "missing.pth", 10)
    # a pickle that would construct an arbitrary object is refused, not executed
    torch.save({"state_dict": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="not a readable weights file"):
        load_resnet_extractor(tmp_path / "evil.pth", 10)
