"""A 3D ResNet feature extractor from weights the user supplies on disk (MedicalNet layout).

The literature's 3D-FID for this model family uses MedicalNet's 3D ResNets (Chen et al.,
"Med3D", 2019). No such weights ship in a package and nothing downloads at run time here, so the
user points at a file they have: MedicalNet's own ``resnet_10.pth`` ... ``resnet_200.pth``
(``{"state_dict": {"module.conv1.weight": ...}}``), a plain state dict, or a safetensors file.
``.pth`` files are read with ``torch.load(weights_only=True)``, which refuses pickled code.

The features are the network's global-average-pooled last stage (512 channels for ResNet-10/18/
34, 2048 for 50 and deeper), computed on each volume after a z-score of its intensities (the
normalisation MedicalNet was trained with). The segmentation head of MedicalNet files
(``conv_seg``) is not part of the extractor and is dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import resnet
from torch import nn

from lsdm.errors import InputError

DEPTHS = (10, 18, 34, 50, 101, 152, 200)


@dataclass
class ResNetExtractor:
    network: nn.Module
    depth: int
    sha256: str  # of the weights file
    source: Path

    @property
    def name(self) -> str:
        return f"3D ResNet-{self.depth} (MedicalNet layout) from {self.source.name}"

    @torch.no_grad()
    def features(self, volumes: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) volumes → (N, C) pooled features, one volume at a time."""
        self.network.eval()
        rows = []
        for volume in volumes:
            v = volume.unsqueeze(0).float()
            v = (v - v.mean()) / v.std().clamp_min(1e-6)
            rows.append(self.network(v).flatten(1))
        return torch.cat(rows)


def build_resnet(depth: int) -> nn.Module:
    """The architecture MedicalNet's weights of this depth fit (shortcut type, downsample bias)."""
    if depth not in DEPTHS:
        raise InputError(f"no 3D ResNet of depth {depth}; choose one of {DEPTHS}")
    bias_downsample, shortcut_type = resnet.get_medicalnet_pretrained_resnet_args(depth)
    return getattr(resnet, f"resnet{depth}")(
        spatial_dims=3,
        n_input_channels=1,
        feed_forward=False,
        shortcut_type=shortcut_type,
        bias_downsample=bias_downsample,
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:  # named .safetensors, but not one
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refused, truncated file, not a torch file at all
        raise InputError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"{path}: expected a state dict of tensors")
    return state


def load_resnet_extractor(path: Path, depth: int) -> ResNetExtractor:
    """The extractor with the weights at ``path``; every weight of the network must be there."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    network = build_resnet(depth)
    state = {k.removeprefix("module."): v for k, v in _read_state(path).items()}
    state = {k: v for k, v in state.items() if not k.startswith(("conv_seg.", "fc."))}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{path}: does not fit a MedicalNet 3D ResNet-{depth} "
            f"(missing {len(missing)} weights, e.g. {missing[:2]}; "
            f"unexpected {len(unexpected)}, e.g. {unexpected[:2]})"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ResNetExtractor(network, depth, digest, path)
