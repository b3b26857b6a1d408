"""Checkpoints as one safetensors file: module weights, optimiser state and JSON metadata.

No pickle anywhere: tensors are stored by name (``model/<module>/<param>``,
``optim/<name>/<param index>/<key>``), everything else (step, optimiser hyper-parameters, the
caller's metadata) as JSON in the safetensors header. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save, save_file
from torch import nn

from lsdm.atomic import atomic_path
from lsdm.config import LSDMConfig
from lsdm.errors import InputError


def _optimiser_tensors(name: str, optimiser: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimiser.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim/{name}/{index}/{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as one safetensors blob (for sending weights as a single object)."""
    return save({k: v.detach().contiguous() for k, v in state.items()})


def state_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    """The inverse of :func:`state_to_bytes`; raises ``SafetensorError`` on a malformed blob."""
    return load(blob)


def save_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimisers: dict[str, torch.optim.Optimizer] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            # clone: safetensors refuses tensors that share storage (tied weights, views)
            tensors[f"model/{name}/{key}"] = value.detach().cpu().contiguous().clone()
    optimiser_meta = {}
    for name, optimiser in (optimisers or {}).items():
        extra, optimiser_meta[name] = _optimiser_tensors(name, optimiser)
        tensors |= {k: v.cpu() for k, v in extra.items()}
    header = {
        "metadata": json.dumps(metadata or {}),
        "optimisers": json.dumps(optimiser_meta),
    }
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["metadata"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"not a readable checkpoint: {path}: {err}") from None


def load_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    optimisers: dict[str, torch.optim.Optimizer] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore ``modules`` (strictly: every key must match) and ``optimisers`` in place from
    ``path``; returns the caller's metadata."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            header = f.metadata()
            for name, module in modules.items():
                prefix = f"model/{name}/"
                state = {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
                module.load_state_dict(state, strict=True)
            saved_optimisers = json.loads(header.get("optimisers", "{}"))
            for name, optimiser in (optimisers or {}).items():
                meta = saved_optimisers[name]
                state: dict[int, dict] = {}
                prefix = f"optim/{name}/"
                for key in keys:
                    if key.startswith(prefix):
                        index, field = key[len(prefix) :].split("/", 1)
                        state.setdefault(int(index), {})[field] = f.get_tensor(key)
                for key, value in meta["scalars"].items():
                    index, field = key.split("/", 1)
                    state.setdefault(int(index), {})[field] = value
                optimiser.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
            return json.loads(header["metadata"])
    except (SafetensorError, OSError, KeyError, RuntimeError, ValueError) as err:
        raise InputError(f"checkpoint does not fit this model: {path}: {err}") from None


def checkpoint_identity(config: LSDMConfig, labels: dict[int, str]) -> dict[str, Any]:
    """The metadata that makes a checkpoint usable on its own: its configuration and vocabulary."""
    return {"config": config.model_dump(mode="json"), "labels": labels}


def read_identity(path: Path, kind: str) -> tuple[LSDMConfig, dict[int, str]]:
    """Configuration and label vocabulary of a checkpoint of ``kind`` ("vqgan" or "ldm")."""
    metadata = read_metadata(path)
    if metadata.get("kind") != kind:
        found = metadata.get("kind", "unknown")
        raise InputError(f"not a {kind} checkpoint (it holds a {found} model): {path}")
    try:
        config = LSDMConfig.model_validate(metadata["config"])
        return config, {int(k): v for k, v in metadata["labels"].items()}
    except (KeyError, ValueError) as err:
        raise InputError(f"checkpoint metadata is incomplete: {path}: {err}") from None
