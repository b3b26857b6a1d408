"""The release report of a synthetic dataset: ``report.json`` and ``report.html`` (pictures in
``report/``) beside the dataset's ``images/`` and ``maps/``.

Sections: ``provenance`` (from the generator bundle), ``generation`` (settings), ``dataset``,
``pictures`` (map, synthetic volume and overlay in three planes for a sample of subjects),
``fidelity`` against the site's real cohort, ``memorisation`` (:mod:`lsdm.memorisation`) and
``release`` (the site policy's decision, filled in by the caller: this package knows no policies).

Fidelity protocol (seeded): the real cohort is split into train and test subjects; a MONAI
BasicUNet segmenter (:mod:`lsdm.evaluate`) is trained on the real train volumes and scored by
per-class foreground Dice on the real test volumes and on the synthetic volumes against the maps
they were made from (synthetic volumes made from the segmenter's own training maps are left out
when others exist). The Fréchet distance is computed, unpadded, between all real and all
synthetic volumes in that segmenter's bottleneck features; the extractor is named, its SHA-256
reported, and its weights kept in ``site-private/`` (it was trained on patient images: never
publish that folder). Diversity: mean MS-SSIM between synthetic volumes (lower is more diverse),
with the real volumes' for reference.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from lsdm.atomic import atomic_path, atomic_write_text  # noqa: E402
from lsdm.checkpoint import (
    file_sha256,  # noqa: E402
    save_checkpoint,  # noqa: E402
)
from lsdm.cohort import IMAGES_DIR, MAPS_DIR, NIFTI_SUFFIX  # noqa: E402
from lsdm.config import LSDMConfig  # noqa: E402
from lsdm.data import Cohort  # noqa: E402
from lsdm.errors import InputError  # noqa: E402
from lsdm.evaluate import (  # noqa: E402
    Volumes,
    bottleneck_features,
    load_volumes,
    mean_pairwise_ms_ssim,
    plot_dice,
    segment_dice,
    split_subjects,
    train_segmenter,
)
from lsdm.memorisation import check_memorisation  # noqa: E402
from lsdm.metrics import frechet_distance  # noqa: E402
from lsdm.preview import content_centre, planes  # noqa: E402

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
PICTURES_DIR = "report"
PRIVATE_DIR = "site-private"
SECTIONS = (
    "provenance",
    "generation",
    "dataset",
    "pictures",
    "fidelity",
    "memorisation",
    "release",
)
MAX_DIVERSITY_PAIRS = 100
EXTRACTOR = (
    "bottleneck of a MONAI BasicUNet segmenter trained on the real train split "
    "(spatial mean of its deepest block)"
)


def synthetic_cohort(synthetic_dir: Path, labels: dict[int, str]) -> Cohort:
    """The dataset (``images/`` and ``maps/``) as a cohort; each image must have its map."""
    synthetic_dir = Path(synthetic_dir)
    images = sorted((synthetic_dir / IMAGES_DIR).glob(f"*{NIFTI_SUFFIX}"))
    if not images:
        raise InputError(f"no synthetic volumes in {synthetic_dir / IMAGES_DIR}")
    pairs = []
    for image in images:
        used_map = synthetic_dir / MAPS_DIR / image.name
        if not used_map.is_file():
            raise InputError(f"synthetic volume without the map it was made from: {image}")
        sid = image.name[: -len(NIFTI_SUFFIX)]
        pairs.append({"id": sid, "image": str(image), "map": str(used_map)})
    return Cohort(root=synthetic_dir, labels=labels, pairs=pairs)


def _clean(value: Any) -> Any:
    """JSON-ready: NaN/inf become null, numpy scalars plain numbers, dict keys strings."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _named_dice(dice: dict, labels: dict[int, str]) -> dict:
    return {
        "per_class": {labels[k]: v for k, v in dice["per_class"].items()},
        "mean": dice["mean"],
    }


def build_report(
    synthetic_dir: Path,
    real: Cohort,
    config: LSDMConfig,
    provenance: dict,
    generation: dict | None = None,
    holdout: Cohort | None = None,
    segmentation_steps: int = 200,
    seed: int = 0,
    sample_subjects: int = 4,
    on_stage: Callable[[str, int], Callable | None] | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Measure the dataset in ``synthetic_dir`` and write the report's pictures there; returns
    the report (``release`` still empty: see :func:`write_report`)."""
    progress = on_stage or (lambda name, total: None)
    synthetic_dir = Path(synthetic_dir)
    if len(real.ids) < 3:
        raise InputError(f"the real cohort needs at least 3 subjects, has {len(real.ids)}")
    synthetic = synthetic_cohort(synthetic_dir, real.labels)
    if len(synthetic.ids) < 2:
        raise InputError("the report needs at least 2 synthetic volumes")
    vocabulary = sorted(real.labels)
    syn = load_volumes(synthetic, config, synthetic.ids)
    real_all = load_volumes(real, config, real.ids)

    pictures_dir = synthetic_dir / PICTURES_DIR
    shown = sorted(
        np.random.default_rng(seed).choice(
            len(syn.ids), min(sample_subjects, len(syn.ids)), replace=False
        )
    )
    save_release_sheet(syn, shown, real.labels, pictures_dir / "sheet.png")

    fidelity, segmenter, dice = _fidelity(
        real,
        real_all,
        syn,
        vocabulary,
        segmentation_steps,
        seed,
        progress("segmenter", segmentation_steps),
        device,
    )
    extractor_path = synthetic_dir / PRIVATE_DIR / "extractor.safetensors"
    save_checkpoint(extractor_path, {"segmenter": segmenter}, metadata={})
    fidelity["frechet_distance"]["extractor_file"] = f"{PRIVATE_DIR}/{extractor_path.name}"
    fidelity["frechet_distance"]["extractor_sha256"] = file_sha256(extractor_path)
    plot_dice(dice, real.labels, pictures_dir / "dice.png")

    stage = progress("memorisation check", 1)
    held = None
    if holdout is not None:
        held_volumes = load_volumes(holdout, config, holdout.ids)
        held = (held_volumes.ids, held_volumes.images, held_volumes.labels)
    memorisation = check_memorisation(
        syn.ids,
        syn.images,
        syn.labels,
        real_all.ids,
        real_all.images,
        real_all.labels,
        holdout=held,
    )
    _plot_memorisation(memorisation, pictures_dir / "memorisation.png")
    if stage:
        stage(1)
    return {
        "format": "med-lsdm-release-report",
        "format_version": 1,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "provenance": provenance,
        "generation": generation or {},
        "dataset": {
            "volumes": len(syn.ids),
            "ids": syn.ids,
            "images": f"{IMAGES_DIR}/",
            "maps": f"{MAPS_DIR}/",
            "grid": list(config.data.shape),
            "intensity_scale": "[-1, 1] (the model's scale)",
        },
        "pictures": {
            "sheet": f"{PICTURES_DIR}/sheet.png",
            "sheet_subjects": [syn.ids[i] for i in shown],
            "sheet_columns": "map, synthetic, overlay; each in three planes",
            "dice": f"{PICTURES_DIR}/dice.png",
            "memorisation": f"{PICTURES_DIR}/memorisation.png",
        },
        "fidelity": fidelity,
        "memorisation": memorisation,
        "release": {},
    }


def _fidelity(
    real: Cohort,
    real_all: Volumes,
    syn: Volumes,
    vocabulary: list[int],
    steps: int,
    seed: int,
    on_step: Callable | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict, torch.nn.Module, dict]:
    """The report's ``fidelity`` section, the trained segmenter (the Fréchet extractor) and its
    Dice per label (for the plot)."""
    train_ids, test_ids = split_subjects(real.ids, seed, 0.34)
    index = {sid: i for i, sid in enumerate(real_all.ids)}

    def subset(ids: list[str]) -> Volumes:
        rows = [index[i] for i in ids]
        return Volumes(ids, real_all.images[rows], real_all.labels[rows])

    segmenter = train_segmenter([subset(train_ids)], len(vocabulary), steps, seed, on_step, device)
    seen = set(train_ids)
    unseen = [i for i, sid in enumerate(syn.ids) if sid not in seen]
    scored = unseen or list(range(len(syn.ids)))
    syn_scored = Volumes([syn.ids[i] for i in scored], syn.images[scored], syn.labels[scored])
    dice = {
        "real": segment_dice(segmenter, subset(test_ids), vocabulary),
        "synthetic": segment_dice(segmenter, syn_scored, vocabulary),
    }
    frechet = frechet_distance(
        bottleneck_features(segmenter, real_all.images), bottleneck_features(segmenter, syn.images)
    )
    return (
        {
            "segmenter": {
                "network": "MONAI BasicUNet (features 8, 8, 16, 32, 32, 8; instance norm)",
                "trained_on": "real train split",
                "steps": steps,
                "seed": seed,
                "real_train": train_ids,
                "real_test": test_ids,
                "synthetic_scored": syn_scored.ids,
                "synthetic_scored_rule": (
                    "synthetic volumes whose map is not one of the segmenter's training maps"
                    if unseen
                    else "all synthetic volumes (every one came from a segmenter training map)"
                ),
            },
            "dice": {
                "definition": "per-class foreground Dice (background excluded), mean over subjects",
                "real": _named_dice(dice["real"], real.labels),
                "synthetic": _named_dice(dice["synthetic"], real.labels),
            },
            "frechet_distance": {
                "value": frechet,
                "real_volumes": len(real_all.ids),
                "synthetic_volumes": len(syn.ids),
                "padding": "none: exactly these volumes' features",
                "extractor": EXTRACTOR,
            },
            "diversity": {
                "definition": "mean MS-SSIM between pairs of volumes (lower: more diverse); "
                f"at most {MAX_DIVERSITY_PAIRS} pairs, drawn with the seed",
                "ms_ssim_between_synthetic": mean_pairwise_ms_ssim(
                    syn.images, MAX_DIVERSITY_PAIRS, seed
                ),
                "ms_ssim_between_real": mean_pairwise_ms_ssim(
                    real_all.images, MAX_DIVERSITY_PAIRS, seed
                ),
            },
        },
        segmenter,
        dice,
    )


# -- pictures --------------------------------------------------------------------------------------
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
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _plot_memorisation(memorisation: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 2.6))
    synthetic = [e["distance"] for e in memorisation["synthetic"]]
    reference = [e["distance"] for e in memorisation["reference_volumes"]]
    bins = np.linspace(0, max([*synthetic, *reference, memorisation["threshold"]]) * 1.05, 30)
    ax.hist(reference, bins=bins, alpha=0.6, label=f"real ({memorisation['reference']})")
    ax.hist(synthetic, bins=bins, alpha=0.6, label="synthetic")
    ax.axvline(memorisation["threshold"], color="red", linestyle="--", label="near-copy threshold")
    ax.set_xlabel("distance to the nearest training volume (map-residual)")
    ax.set_ylabel("volumes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# -- writing ---------------------------------------------------------------------------------------
def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out`` (atomically)."""
    missing = [s for s in SECTIONS if s not in report]
    if missing:
        raise ValueError(f"report sections missing: {missing}")
    report = _clean(report)
    out = Path(out)
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=2, allow_nan=False))
    atomic_write_text(out / REPORT_HTML, render_html(report))
    return out / REPORT_JSON, out / REPORT_HTML


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{body}</table>"


def _grid(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict) -> str:
    release, prov = report["release"], report["provenance"]
    fid, mem, pics = report["fidelity"], report["memorisation"], report["pictures"]
    releasable = release.get("releasable")
    verdict = "RELEASABLE" if releasable else "NOT RELEASABLE"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in release.get("reasons", []))
    dice = fid["dice"]
    dice_rows = [
        [name, dice["real"]["per_class"].get(name), dice["synthetic"]["per_class"].get(name)]
        for name in dice["real"]["per_class"]
    ]
    dice_rows.append(["mean", dice["real"]["mean"], dice["synthetic"]["mean"]])
    mem_rows = [
        [e["id"], e["nearest_training"], e["distance"], "NEAR-COPY" if e["near_copy"] else ""]
        for e in mem["synthetic"]
    ]
    ref_rows = [[e["id"], e["nearest_training"], e["distance"]] for e in mem["reference_volumes"]]
    fd = fid["frechet_distance"]
    div = fid["diversity"]
    css = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:left;font-size:90%}img{max-width:100%}"
        ".ok{background:#d9f2d9;padding:.5em}.bad{background:#f7d4d4;padding:.5em}"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Synthetic release report</title>",
        f"<style>{css}</style></head><body>",
        "<h1>Synthetic release report</h1>",
        f'<div class="{"ok" if releasable else "bad"}"><h2 id="release">{verdict}</h2>',
        f"<ul>{reasons}</ul>" if reasons else "<p>Every rule of the release gate is met.</p>",
        _table([(k, v) for k, v in release.items() if k not in ("releasable", "reasons")]),
        "</div>",
        '<h2 id="provenance">Provenance</h2>',
        _table(list(prov.items())),
        '<h2 id="generation">Generation</h2>',
        _table(list(report["generation"].items())),
        '<h2 id="dataset">Dataset</h2>',
        _table([(k, v) for k, v in report["dataset"].items() if k != "ids"]),
        '<h2 id="pictures">Pictures</h2>',
        f"<p>{html.escape(pics['sheet_columns'])}; subjects "
        f"{html.escape(_fmt(pics['sheet_subjects']))}.</p>",
        f'<img src="{html.escape(pics["sheet"])}" alt="map, synthetic and overlay">',
        '<h2 id="fidelity">Fidelity against the real cohort</h2>',
        f"<p>{html.escape(dice['definition'])}; segmenter: "
        f"{html.escape(_fmt(fid['segmenter']['network']))}, trained on the "
        f"{html.escape(fid['segmenter']['trained_on'])} for {fid['segmenter']['steps']} steps.</p>",
        _grid(["label", "Dice on real", "Dice on synthetic"], dice_rows),
        f'<img src="{html.escape(pics["dice"])}" alt="Dice per label">',
        _table(
            [
                ("Fréchet distance", fd["value"]),
                ("extractor", fd["extractor"]),
                ("extractor SHA-256", fd.get("extractor_sha256")),
                ("volumes (real, synthetic)", [fd["real_volumes"], fd["synthetic_volumes"]]),
                ("MS-SSIM between synthetic", div["ms_ssim_between_synthetic"]),
                ("MS-SSIM between real", div["ms_ssim_between_real"]),
            ]
        ),
        '<h2 id="memorisation">Memorisation</h2>',
        f"<p>Distance: {html.escape(mem['distance'])}.</p>",
        f"<p>Reference: {html.escape(mem['reference_description'])}. Rule: "
        f"{html.escape(mem['threshold_rule'])} (threshold {_fmt(mem['threshold'])}).</p>",
        _table(
            [
                ("median synthetic distance", mem["synthetic_median"]),
                ("median reference distance", mem["reference_median"]),
                ("ratio", mem["median_ratio"]),
                ("near-copies", mem["near_copies"] or "none"),
            ]
        ),
        f'<img src="{html.escape(pics["memorisation"])}" alt="distances">',
        _grid(["synthetic", "nearest training", "distance", "flag"], mem_rows),
        f"<h3>Reference ({html.escape(mem['reference'])})</h3>",
        _grid(["real", "nearest training", "distance"], ref_rows),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
