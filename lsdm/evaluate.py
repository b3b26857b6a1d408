"""``lsdm evaluate``: how useful synthetic volumes are, measured against the real cohort they
mirror. Every synthetic volume must come from the map of a subject of that cohort.

Protocol (all seeds fixed and reported): the real cohort is split into train and test subjects.
A MONAI BasicUNet is trained to segment, and scored by per-class foreground Dice on the test
subjects:

- ``real``: trained on real train volumes, scored on real test volumes;
- ``synthetic``: the same network, scored on the synthetic volumes made from the test maps
  (the published protocol: near ``real`` means the synthetic volumes show what the maps say);
- ``train_synthetic_test_real``: trained on the synthetic train volumes, scored on real test ones;
- ``real_plus_synthetic``: trained on both, scored on real test volumes.

Beside these: the Fréchet distance between real and synthetic volumes in the feature space of the
``real`` network (its bottleneck, averaged over space; the network is saved as
``extractor.safetensors`` and its SHA-256 reported), MS-SSIM between synthetic volumes
(diversity) and between real ones (for reference), paired PSNR/SSIM of each synthetic volume
against the real volume of its map, and per-label intensity distributions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.networks.nets import BasicUNet  # noqa: E402

from lsdm.atomic import atomic_path, atomic_write_text  # noqa: E402
from lsdm.checkpoint import (
    file_sha256,  # noqa: E402
    save_checkpoint,  # noqa: E402
)
from lsdm.cohort import IMAGES_DIR, MAPS_DIR, NIFTI_SUFFIX  # noqa: E402
from lsdm.config import LSDMConfig  # noqa: E402
from lsdm.data import Cohort, StepBatchSampler, make_dataset  # noqa: E402
from lsdm.errors import InputError  # noqa: E402
from lsdm.metrics import (  # noqa: E402
    foreground_dice,
    frechet_distance,
    label_intensity_distances,
    ms_ssim,
    paired_psnr_ssim,
)
from lsdm.resnet_features import ResNetExtractor


@dataclass
class Volumes:
    ids: list[str]
    images: torch.Tensor  # (N, 1, D, H, W) in [-1, 1]
    labels: torch.Tensor  # (N, D, H, W) index into the vocabulary


def pair_synthetic(real: Cohort, synthetic_dir: Path) -> Cohort:
    """The synthetic volumes of ``synthetic_dir`` (``images/`` and ``maps/``, as ``lsdm sample``
    writes them) as a cohort, each checked to come from the map of a real subject."""
    synthetic_dir = Path(synthetic_dir)
    images = sorted((synthetic_dir / IMAGES_DIR).glob(f"*{NIFTI_SUFFIX}"))
    if not images:
        raise InputError(f"no synthetic volumes in {synthetic_dir / IMAGES_DIR}")
    real_maps = {p["id"]: p["map"] for p in real.pairs}
    pairs = []
    for image in images:
        sid = image.name[: -len(NIFTI_SUFFIX)]
        used_map = synthetic_dir / MAPS_DIR / image.name
        if sid not in real_maps:
            raise InputError(f"synthetic volume whose map is not in the real cohort: {image}")
        if not used_map.is_file():
            raise InputError(f"synthetic volume without the map it was made from: {image}")
        same = np.array_equal(
            np.asarray(nib.load(used_map).dataobj), np.asarray(nib.load(real_maps[sid]).dataobj)
        )
        if not same:
            raise InputError(
                f"map differs from the real subject's map {real_maps[sid]}: {used_map}"
            )
        pairs.append({"id": sid, "image": str(image), "map": str(used_map)})
    return Cohort(root=synthetic_dir, labels=real.labels, pairs=pairs)


def split_subjects(ids: list[str], seed: int, test_share: float) -> tuple[list[str], list[str]]:
    """(train ids, test ids): a seeded split with at least one test subject."""
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = max(1, round(test_share * len(ids)))
    return sorted(ids[i] for i in order[n_test:]), sorted(ids[i] for i in order[:n_test])


def load_volumes(cohort: Cohort, config: LSDMConfig, ids: list[str]) -> Volumes:
    by_id = {p["id"]: p for p in cohort.pairs}
    subset = Cohort(cohort.root, cohort.labels, [by_id[i] for i in ids])
    dataset = make_dataset(subset, config.data)
    items = [dataset[i] for i in range(len(dataset))]
    return Volumes(
        ids=list(ids),
        images=torch.stack([item["image"].as_tensor() for item in items]),
        labels=torch.stack([item["map"].as_tensor().argmax(0) for item in items]),
    )


def make_segmenter(num_labels: int) -> BasicUNet:
    """A small MONAI BasicUNet (four levels: sides divisible by 16). Upsampling by interpolation:
    on a CPU the backward pass of 3D transposed convolutions is several times slower."""
    return BasicUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=num_labels,
        features=(8, 8, 16, 32, 32, 8),
        norm=("instance", {"affine": True}),
        upsample="nontrainable",
    )


def train_segmenter(
    train: list[Volumes],
    num_labels: int,
    steps: int,
    seed: int,
    on_step: Callable | None,
    device: torch.device | str = "cpu",
) -> BasicUNet:
    """Train on ``device`` (the volumes stay on the CPU, batches move); the model stays there."""
    torch.manual_seed(seed)
    model = make_segmenter(num_labels).to(device)
    images = torch.cat([v.images for v in train])
    labels = torch.cat([v.labels for v in train])
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    for step, batch in enumerate(StepBatchSampler(len(images), 2, seed, 0, steps)):
        target = labels[batch].unsqueeze(1).to(device)
        loss = loss_fn(model(images[batch].to(device)), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if on_step is not None:
            on_step(step + 1)
    return model.eval()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def segment_dice(model: BasicUNet, volumes: Volumes, vocabulary: list[int]) -> dict:
    """Mean over subjects of each label's foreground Dice (NaN-free mean per label)."""
    per_subject = []
    for image, truth in zip(volumes.images, volumes.labels, strict=True):
        prediction = model(image[None].to(_device_of(model))).argmax(1)[0].cpu()
        per_subject.append(
            foreground_dice(prediction.numpy(), truth.numpy(), list(range(len(vocabulary))))
        )
    per_class = {}
    for index, label in enumerate(vocabulary):
        if index == 0:
            continue
        values = [s["per_class"][index] for s in per_subject if not np.isnan(s["per_class"][index])]
        per_class[label] = float(np.mean(values)) if values else float("nan")
    present = [v for v in per_class.values() if not np.isnan(v)]
    return {"per_class": per_class, "mean": float(np.mean(present)) if present else float("nan")}


def bottleneck_features(model: BasicUNet, images: torch.Tensor) -> np.ndarray:
    """(N, C): the UNet's deepest block, averaged over space: the Fréchet feature extractor."""
    captured = []
    handle = model.down_4.register_forward_hook(
        lambda m, i, out: captured.append(out.mean((2, 3, 4)).cpu())
    )
    with torch.no_grad():
        for image in images:
            model(image[None].to(_device_of(model)))
    handle.remove()
    return torch.cat(captured).numpy()


def mean_pairwise_ms_ssim(
    images: torch.Tensor, max_pairs: int | None = None, seed: int = 0
) -> float:
    """Mean MS-SSIM over pairs of ``images`` (N, 1, D, H, W): all pairs, or ``max_pairs`` of them
    drawn without replacement (seeded) when there are more."""
    pairs = list(combinations(range(len(images)), 2))
    if not pairs:
        return float("nan")
    if max_pairs is not None and len(pairs) > max_pairs:
        chosen = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(chosen)]
    return float(np.mean([ms_ssim(images[a, 0].numpy(), images[b, 0].numpy()) for a, b in pairs]))


def evaluate(
    real: Cohort,
    synthetic_dir: Path,
    out: Path,
    config: LSDMConfig,
    steps: int = 300,
    seed: int = 0,
    test_share: float = 0.34,
    on_stage: Callable[[str, int], Callable | None] | None = None,
    resnet: ResNetExtractor | None = None,
) -> dict:
    """Run the protocol above; writes metrics.json, dice.png, intensities.png and
    extractor.safetensors into ``out`` (absent or empty) and returns the metrics. With
    ``resnet`` (user-supplied 3D ResNet weights), a second Fréchet distance in its features is
    reported as ``frechet_distance_resnet``."""
    progress = on_stage or (lambda name, total: None)
    synthetic = pair_synthetic(real, synthetic_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder is not empty: {out}")
    ids = sorted(set(real.ids) & set(synthetic.ids))
    train_ids, test_ids = split_subjects(ids, seed, test_share)
    if not train_ids:
        raise InputError(f"need at least 2 subjects with synthetic volumes, found {len(ids)}")
    vocabulary = sorted(real.labels)
    volumes = {
        (kind, split): load_volumes(cohort, config, split_ids)
        for kind, cohort in (("real", real), ("synthetic", synthetic))
        for split, split_ids in (("train", train_ids), ("test", test_ids))
    }
    n = len(vocabulary)

    def trained(name: str, train: list[Volumes]) -> BasicUNet:
        return train_segmenter(train, n, steps, seed, progress(f"segmenter: {name}", steps))

    on_real = trained("real", [volumes["real", "train"]])
    on_synthetic = trained("synthetic", [volumes["synthetic", "train"]])
    on_both = trained("real+synthetic", [volumes["real", "train"], volumes["synthetic", "train"]])
    real_test, synthetic_test = volumes["real", "test"], volumes["synthetic", "test"]
    dice = {
        "real": segment_dice(on_real, real_test, vocabulary),
        "synthetic": segment_dice(on_real, synthetic_test, vocabulary),
        "train_synthetic_test_real": segment_dice(on_synthetic, real_test, vocabulary),
        "real_plus_synthetic": segment_dice(on_both, real_test, vocabulary),
    }

    out.mkdir(parents=True, exist_ok=True)
    extractor_path = out / "extractor.safetensors"
    save_checkpoint(extractor_path, {"segmenter": on_real}, metadata={"kind": "extractor"})
    all_real = torch.cat([volumes["real", s].images for s in ("train", "test")])
    all_synthetic = torch.cat([volumes["synthetic", s].images for s in ("train", "test")])
    all_labels = torch.cat([volumes["real", s].labels for s in ("train", "test")])
    paired = [
        paired_psnr_ssim(r[0].numpy(), s[0].numpy())
        for r, s in zip(all_real, all_synthetic, strict=True)
    ]
    intensities = label_intensity_distances(
        [v[0].numpy() for v in all_real],
        [m.numpy() for m in all_labels],
        [v[0].numpy() for v in all_synthetic],
        [m.numpy() for m in all_labels],
    )
    metrics = {
        "seed": seed,
        "segmentation_steps": steps,
        "subjects": {"train": train_ids, "test": test_ids},
        "labels": {str(k): v for k, v in real.labels.items()},
        "dice": dice,
        "frechet_distance": {
            "value": frechet_distance(
                bottleneck_features(on_real, all_real), bottleneck_features(on_real, all_synthetic)
            ),
            "volumes": len(all_real),
            "extractor": "bottleneck of the MONAI BasicUNet segmenter trained on the real "
            "train split "
            "(spatial mean of its deepest block)",
            "extractor_file": extractor_path.name,
            "extractor_sha256": file_sha256(extractor_path),
        },
        "ms_ssim_between_synthetic": mean_pairwise_ms_ssim(all_synthetic),
        "ms_ssim_between_real": mean_pairwise_ms_ssim(all_real),
        "paired": {
            "psnr_db": float(np.mean([p["psnr_db"] for p in paired])),
            "ssim": float(np.mean([p["ssim"] for p in paired])),
        },
        "intensity_by_label": {real.labels[vocabulary[k]]: v for k, v in intensities.items()},
    }
    if resnet is not None:
        metrics["frechet_distance_resnet"] = {
            "value": frechet_distance(
                resnet.features(all_real).numpy(), resnet.features(all_synthetic).numpy()
            ),
            "volumes": len(all_real),
            "extractor": resnet.name,
            "extractor_file": str(resnet.source),
            "extractor_sha256": resnet.sha256,
        }
    plot_dice(dice, real.labels, out / "dice.png")
    _plot_intensities(all_real, all_synthetic, all_labels, real.labels, out / "intensities.png")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def plot_dice(dice: dict, labels: dict[int, str], path: Path) -> None:
    names = [labels[k] for k in dice["real"]["per_class"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3))
    for offset, key in ((-0.2, "real"), (0.2, "synthetic")):
        ax.bar(x + offset, list(dice[key]["per_class"].values()), width=0.4, label=key)
    ax.set_xticks(x, names)
    ax.set_ylabel("Dice (real-trained UNet)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _plot_intensities(real, synthetic, label_index, labels: dict[int, str], path: Path) -> None:
    vocabulary = sorted(labels)
    fig, axes = plt.subplots(1, len(vocabulary), figsize=(2.6 * len(vocabulary), 2.4))
    bins = np.linspace(-1, 1, 41)
    for index, ax in enumerate(np.atleast_1d(axes)):
        mask = label_index == index
        for volumes, name in ((real, "real"), (synthetic, "synthetic")):
            values = volumes[:, 0][mask].numpy()
            if values.size:
                ax.hist(values, bins=bins, density=True, alpha=0.5, label=name)
        ax.set_title(labels[vocabulary[index]], fontsize=8)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
