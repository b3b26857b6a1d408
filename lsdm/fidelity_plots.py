"""Pictures of the evaluation and of the release report: Dice per label, intensities per label,
the release sheet (map, synthetic volume, overlay) and the memorisation distances. Each is a PNG
written atomically; none measures anything."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from lsdm.atomic import atomic_path  # noqa: E402
from lsdm.fidelity import DiceScores  # noqa: E402
from lsdm.memorisation import Memorisation  # noqa: E402
from lsdm.preview import content_centre, planes  # noqa: E402
from lsdm.segmenter import Volumes  # noqa: E402


def _save(fig, path: Path, dpi: int) -> None:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_dice(dice: DiceScores, path: Path) -> None:
    """Per-label Dice of the real-trained segmenter on real and on synthetic volumes."""
    names = list(dice.real.per_class)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3))
    for offset, key, scores in ((-0.2, "real", dice.real), (0.2, "synthetic", dice.synthetic)):
        values = [np.nan if scores.per_class.get(n) is None else scores.per_class[n] for n in names]
        ax.bar(x + offset, values, width=0.4, label=key)
    ax.set_xticks(x, names)
    ax.set_ylabel("Dice (real-trained UNet)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    _save(fig, path, 110)


def plot_intensities(real: Volumes, synthetic: Volumes, labels: dict[int, str], path: Path) -> None:
    """Histograms of each label's voxels in real and synthetic volumes, both read by the real
    subjects' maps (paired volumes)."""
    real = real.subset(synthetic.ids)
    vocabulary = sorted(labels)
    fig, axes = plt.subplots(1, len(vocabulary), figsize=(2.6 * len(vocabulary), 2.4))
    bins = np.linspace(-1, 1, 41)
    for index, ax in enumerate(np.atleast_1d(axes)):
        mask = real.labels == index
        for volumes, name in ((real, "real"), (synthetic, "synthetic")):
            values = volumes.images[:, 0][mask].numpy()
            if values.size:
                ax.hist(values, bins=bins, density=True, alpha=0.5, label=name)
        ax.set_title(labels[vocabulary[index]], fontsize=8)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, 110)


def save_release_sheet(
    volumes: Volumes, rows: list[int], labels: dict[int, str], path: Path
) -> None:
    """One row per chosen subject: its map, the synthetic volume and the map over it, each in
    three planes through the map's content centre."""
    n_labels = len(labels)
    colours = plt.get_cmap("tab10")(np.arange(max(n_labels, 2)))
    label_cmap = ListedColormap(colours[:n_labels])
    fig, axes = plt.subplots(len(rows), 9, figsize=(13.5, 1.7 * len(rows) + 0.4), squeeze=False)
    for r, i in enumerate(rows):
        image = volumes.images[i, 0].numpy()
        label = volumes.labels[i].numpy()
        centre = content_centre(label, is_map=True)
        lo, hi = np.percentile(image, [1, 99])
        label_planes, image_planes = planes(label, centre), planes(image, centre)
        for p in range(3):
            axes[r, p].imshow(
                label_planes[p], cmap=label_cmap, vmin=-0.5, vmax=n_labels - 0.5,
                interpolation="nearest",
            )  # fmt: skip
            axes[r, 3 + p].imshow(image_planes[p], cmap="gray", vmin=lo, vmax=hi)
            axes[r, 6 + p].imshow(image_planes[p], cmap="gray", vmin=lo, vmax=hi)
            overlay = np.ma.masked_where(label_planes[p] == 0, label_planes[p])
            axes[r, 6 + p].imshow(
                overlay, cmap=label_cmap, vmin=-0.5, vmax=n_labels - 0.5, alpha=0.4,
                interpolation="nearest",
            )  # fmt: skip
        axes[r, 0].set_ylabel(volumes.ids[i], fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for c, title in ((1, "map"), (4, "synthetic"), (7, "overlay")):
        axes[0, c].set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path, 100)


def plot_memorisation(memorisation: Memorisation, path: Path) -> None:
    """Histograms of the nearest-training distances of synthetic and reference volumes, with
    the near-copy threshold."""
    fig, ax = plt.subplots(figsize=(6, 2.6))
    synthetic = [e.distance for e in memorisation.synthetic]
    reference = [e.distance for e in memorisation.reference_volumes]
    bins = np.linspace(0, max([*synthetic, *reference, memorisation.threshold]) * 1.05, 30)
    ax.hist(reference, bins=bins, alpha=0.6, label=f"real ({memorisation.reference})")
    ax.hist(synthetic, bins=bins, alpha=0.6, label="synthetic")
    ax.axvline(memorisation.threshold, color="red", linestyle="--", label="near-copy threshold")
    ax.set_xlabel("distance to the nearest training volume (map-residual)")
    ax.set_ylabel("volumes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, 100)
