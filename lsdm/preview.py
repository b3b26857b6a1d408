"""PNG sheets of mid-slices in the three planes, for looking at volumes side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lsdm.atomic import atomic_path  # noqa: E402


def content_centre(volume: np.ndarray, is_map: bool) -> tuple[int, int, int]:
    """Per axis, the slice holding most of the content (a map's labelled voxels, or an image's
    brightest tenth): it cuts through the anatomy, where the geometric centre of a breast MRI
    falls between the breasts."""
    content = volume > 0 if is_map else volume >= np.percentile(volume, 90)
    return tuple(
        int(np.argmax(content.sum(axis=tuple(a for a in range(3) if a != axis))))
        for axis in range(3)
    )


def planes(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """The three orthogonal slices of a (D, H, W) volume through ``centre``, rotated for display."""
    d, h, w = centre
    return [np.rot90(volume[d]), np.rot90(volume[:, h]), np.rot90(volume[:, :, w])]


def save_sheet(
    rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]],
    path: Path,
    label_columns: Sequence[str] = (),
) -> None:
    """One row per subject, for each of its named volumes three planes.

    ``rows``: ``[(row_title, [(column_title, volume (D, H, W)), ...]), ...]``. Columns whose title
    is in ``label_columns`` are drawn as label maps (a categorical colour map), the others in grey
    with a 1-99 percentile window per volume. All volumes of a row are cut through the same point,
    the content centre of the row's first volume.
    """
    n_cols = 3 * max(len(vols) for _, vols in rows)
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(1.6 * n_cols, 1.8 * len(rows)), squeeze=False
    )
    for r, (row_title, volumes) in enumerate(rows):
        first_title, first = volumes[0]
        centre = content_centre(np.asarray(first, dtype=np.float32), first_title in label_columns)
        for v, (title, volume) in enumerate(volumes):
            is_map = title in label_columns
            lo, hi = (0, 4) if is_map else np.percentile(volume, [1, 99])
            for p, plane in enumerate(planes(np.asarray(volume, dtype=np.float32), centre)):
                ax = axes[r, 3 * v + p]
                ax.imshow(
                    plane,
                    cmap="tab10" if is_map else "gray",
                    vmin=lo,
                    vmax=hi,
                    interpolation="nearest",
                )
                if r == 0 and p == 1:
                    ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(row_title, fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
