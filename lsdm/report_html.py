"""``report.html``: a release report (:class:`lsdm.release_report.ReleaseReport`) as one page.
Reads the report's fields; measures and plots nothing (the pictures are already in ``report/``).
:func:`write_report` writes the report's two files, ``report.json`` and ``report.html``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from lsdm.atomic import atomic_write_text
from lsdm.release_report import REPORT_HTML, REPORT_JSON, ReleaseDecision, ReleaseReport

if TYPE_CHECKING:
    from lsdm.fidelity import Fidelity
    from lsdm.memorisation import Memorisation

CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
    "padding:2px 8px;text-align:left;font-size:90%}img{max-width:100%}"
    ".ok{background:#d9f2d9;padding:.5em}.bad{background:#f7d4d4;padding:.5em}"
)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
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


def _fields(model: BaseModel, leave_out: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    return [(k, getattr(model, k)) for k in type(model).model_fields if k not in leave_out]


def _grid(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _release(release: ReleaseDecision | None) -> list[str]:
    releasable = release is not None and release.releasable
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in (release.reasons if release else []))
    return [
        f'<div class="{"ok" if releasable else "bad"}">',
        f'<h2 id="release">{"RELEASABLE" if releasable else "NOT RELEASABLE"}</h2>',
        f"<ul>{reasons}</ul>" if reasons else "<p>Every rule of the release gate is met.</p>",
        _table(_fields(release, ("releasable", "reasons")) if release else []),
        "</div>",
    ]


def _fidelity(fid: Fidelity, dice_picture: str) -> list[str]:
    dice = fid.dice
    dice_rows = [
        [name, value, dice.synthetic.per_class.get(name)]
        for name, value in dice.real.per_class.items()
    ]
    dice_rows.append(["mean", dice.real.mean, dice.synthetic.mean])
    fd, div, segmenter = fid.frechet_distance, fid.diversity, fid.segmenter
    return [
        '<h2 id="fidelity">Fidelity against the real cohort</h2>',
        f"<p>{html.escape(dice.definition)}; segmenter: {html.escape(segmenter.network)}, "
        f"trained on the {html.escape(segmenter.trained_on)} for {segmenter.steps} steps.</p>",
        _grid(["label", "Dice on real", "Dice on synthetic"], dice_rows),
        f'<img src="{html.escape(dice_picture)}" alt="Dice per label">',
        _table(
            [
                ("Fréchet distance", fd.value),
                ("extractor", fd.extractor),
                ("extractor SHA-256", fd.extractor_sha256),
                ("volumes (real, synthetic)", [fd.real_volumes, fd.synthetic_volumes]),
                ("MS-SSIM between synthetic", div.ms_ssim_between_synthetic),
                ("MS-SSIM between real", div.ms_ssim_between_real),
            ]
        ),
    ]


def _memorisation(mem: Memorisation, picture: str) -> list[str]:
    mem_rows = [
        [e.id, e.nearest_training, e.distance, "NEAR-COPY" if e.near_copy else ""]
        for e in mem.synthetic
    ]
    ref_rows = [[e.id, e.nearest_training, e.distance] for e in mem.reference_volumes]
    return [
        '<h2 id="memorisation">Memorisation</h2>',
        f"<p>Distance: {html.escape(mem.distance)}.</p>",
        f"<p>Reference: {html.escape(mem.reference_description)}. Rule: "
        f"{html.escape(mem.threshold_rule)} (threshold {_fmt(mem.threshold)}).</p>",
        _table(
            [
                ("median synthetic distance", mem.synthetic_median),
                ("median reference distance", mem.reference_median),
                ("ratio", mem.median_ratio),
                ("near-copies", mem.near_copies or "none"),
            ]
        ),
        f'<img src="{html.escape(picture)}" alt="distances">',
        _grid(["synthetic", "nearest training", "distance", "flag"], mem_rows),
        f"<h3>Reference ({html.escape(mem.reference)})</h3>",
        _grid(["real", "nearest training", "distance"], ref_rows),
    ]


def render_html(report: ReleaseReport) -> str:
    pics = report.pictures
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Synthetic release report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Synthetic release report</h1>",
        *_release(report.release),
        '<h2 id="provenance">Provenance</h2>',
        _table(_fields(report.provenance)),
        '<h2 id="generation">Generation</h2>',
        _table(_fields(report.generation)),
        '<h2 id="dataset">Dataset</h2>',
        _table(_fields(report.dataset, ("ids",))),
        '<h2 id="pictures">Pictures</h2>',
        f"<p>{html.escape(pics.sheet_columns)}; subjects "
        f"{html.escape(_fmt(pics.sheet_subjects))}.</p>",
        f'<img src="{html.escape(pics.sheet)}" alt="map, synthetic and overlay">',
        *_fidelity(report.fidelity, pics.dice),
        *_memorisation(report.memorisation, pics.memorisation),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(report: ReleaseReport, out: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out`` (atomically); the gate must have
    decided (``report.release``)."""
    if report.release is None:
        raise ValueError("the release decision is missing: apply the gate first")
    out = Path(out)
    atomic_write_text(out / REPORT_JSON, report.model_dump_json(indent=2))
    atomic_write_text(out / REPORT_HTML, render_html(report))
    return out / REPORT_JSON, out / REPORT_HTML
