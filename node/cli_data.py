"""``lsdm-node`` commands on the data side: the site secret, policies, DICOM de-identification,
scanning, cohort preparation and re-linking, the phantom PACS export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from deid.keys import KEY_FILE, SiteKeys, default_keys_dir
from node.cli_common import (
    KeysOpt,
    PolicyOpt,
    _count_files,
    _keys,
    _progress,
    app,
    err,
    out,
    policy_app,
    user_errors,
)
from node.errors import UserError
from policies import DEFAULT_SITE_POLICY, load_policy, load_site_policy, policy_to_yaml


# -- init, policy ----------------------------------------------------------------------------------
@app.command()
@user_errors
def init(keys: KeysOpt = None) -> None:
    """Create the site's secret key store (once). The secret is never printed."""
    root = (keys or default_keys_dir()).expanduser()
    if (root / KEY_FILE).exists():
        SiteKeys.load(root)  # checks that it is readable and not exposed
        out.print(f"site secret already present in {root}", markup=False)
        return
    created = SiteKeys.create(root)
    out.print(
        f"created the site secret in {root} (fingerprint {created.fingerprint})", markup=False
    )


@policy_app.command("show")
@user_errors
def policy_show(
    policy: Annotated[
        str, typer.Argument(help="a preset (strict, research, federation) or a file")
    ],
) -> None:
    """Print a policy, with every default filled in, as YAML."""
    out.print(policy_to_yaml(load_policy(policy)), markup=False, highlight=False, end="")


@policy_app.command("validate")
@user_errors
def policy_validate(
    policy: Annotated[Path, typer.Argument(help="a policy file (YAML, JSON or TOML)")],
) -> None:
    """Check a policy file: 'ok' or one error line per problem (exit status 2)."""
    loaded = load_policy(policy)
    out.print(f"ok: {policy}: {loaded.kind} policy '{loaded.name}'", markup=False)


# -- deid-dicom, scan ------------------------------------------------------------------------------
@app.command("deid-dicom")
@user_errors
def deid_dicom(
    src: Annotated[Path, typer.Argument(help="a folder of DICOM files (any depth) or one file")],
    dst: Annotated[Path, typer.Argument(help="new folder for the de-identified copies")],
    policy: PolicyOpt = DEFAULT_SITE_POLICY,
    keys: KeysOpt = None,
    quarantine: Annotated[
        Path | None,
        typer.Option(help="copy quarantined originals here (site-private, never published)"),
    ] = None,
) -> None:
    """De-identify DICOM files (PS3.15 Annex E Basic profile + the policy's options)."""
    from node.deid_tree import check_paths, deidentify_tree

    site_policy = load_site_policy(policy)
    keys_root = (keys or default_keys_dir()).expanduser()
    check_paths(src, dst, keys_root)
    site_keys = _keys(keys)
    total = _count_files(src)
    with _progress() as bar:
        task = bar.add_task("de-identifying", total=total)
        report = deidentify_tree(
            src, dst, site_policy, site_keys, quarantine=quarantine,
            on_file=lambda n: bar.update(task, completed=n),
        )  # fmt: skip
    for s in report.quarantined:
        err.print(f"quarantined: {s.path}: {s.reason}", markup=False, highlight=False)
    for s in report.skipped:
        err.print(f"skipped: {s.path}: {s.reason}", markup=False, highlight=False)
    out.print(
        f"wrote {report.written} file(s) in {len(report.series)} series to {dst}; "
        f"{len(report.quarantined)} quarantined, {len(report.skipped)} skipped; scan clean",
        markup=False,
    )


@app.command()
@user_errors
def scan(
    folder: Annotated[Path, typer.Argument(help="a folder (or file) about to be published")],
    policy: PolicyOpt = DEFAULT_SITE_POLICY,
    originals: Annotated[
        Path | None,
        typer.Option(
            help="the input it was made from: its names, IDs, dates and UIDs are searched for "
            "byte by byte in every output file"
        ),
    ] = None,
) -> None:
    """Report identifying data in DICOM, NIfTI headers, JSON and file names. Exit 1 if any."""
    from deid.files import NotDicom, iter_files, read_dicom
    from deid.scan import KnownValues, scan_path

    if not folder.exists():
        raise UserError(f"not found: {folder}")
    if originals is not None and not originals.exists():
        raise UserError(f"not found: {originals}")
    site_policy = load_site_policy(policy)
    known = KnownValues()
    if originals is not None:
        for path in iter_files(originals):
            try:
                known.add(read_dicom(path, header_only=True))
            except NotDicom:
                continue
    findings = scan_path(folder, policy=site_policy, known_values=known.values)
    if not findings:
        out.print(f"clean: no identifying data found in {folder}", markup=False)
        return
    table = Table("file", "where", "kind", "hint", title=f"{len(findings)} finding(s)")
    for f in findings:
        table.add_row(f.path, f.where, f.kind, f.hint)
    out.print(table)
    raise typer.Exit(1)


# -- prepare ---------------------------------------------------------------------------------------
@app.command()
@user_errors
def prepare(
    input: Annotated[Path, typer.Option("--input", "-i", help="the PACS export: DICOM, any depth")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="new cohort folder to create")],
    maps: Annotated[
        Path | None,
        typer.Option(help="label maps: <SeriesInstanceUID>.nii.gz files and/or DICOM SEG"),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(help="CSV of 'series UID or folder,map file' rows (relative to --maps)"),
    ] = None,
    policy: PolicyOpt = DEFAULT_SITE_POLICY,
    keys: KeysOpt = None,
) -> None:
    """De-identify a PACS export into a cohort: images/, maps/, cohort.json, audit.jsonl."""
    from node.prepare import prepare_cohort

    site_policy = load_site_policy(policy)
    if not input.is_dir():
        raise UserError(f"input folder not found: {input}")
    site_keys = _keys(keys)
    total = _count_files(input)
    with _progress() as bar:
        reading = bar.add_task("reading headers", total=total)
        volumes = bar.add_task("building volumes", total=None)
        report = prepare_cohort(
            input, out_dir, site_policy, site_keys, maps_dir=maps, pairs=pairs,
            on_file=lambda n: bar.update(reading, completed=n),
            on_series=lambda i, n: bar.update(volumes, completed=i, total=n),
        )  # fmt: skip
    for s in report.skipped:
        err.print(f"skipped: {s.path}: {s.reason}", markup=False, highlight=False)
    for pseudonym, reason in report.rejected:
        err.print(f"rejected: series {pseudonym}: {reason}", markup=False, highlight=False)
    for path in report.unpaired_maps:
        err.print(f"unpaired: {path}: a map that matches no series", markup=False, highlight=False)
    out.print(
        f"cohort of {len(report.subjects)} subject(s) written to {out_dir}; "
        f"{len(report.rejected)} series rejected, {len(report.skipped)} file(s) skipped; "
        "scan clean",
        markup=False,
    )


@app.command()
@user_errors
def relink(
    pseudonym: Annotated[str, typer.Argument(help="a pseudonym from a cohort or audit log")],
    keys: KeysOpt = None,
) -> None:
    """Site-only: show which original a pseudonym stands for (from the encrypted link table)."""
    site_keys = _keys(keys, create=False)
    matches = [r for r in site_keys.read_links() if r["pseudonym"] == pseudonym]
    if not matches:
        raise UserError(f"no such pseudonym in this site's link table: {pseudonym}")
    record = matches[-1]
    out.print(f"{record['kind']} {pseudonym} = {record['original']}", markup=False)


# -- phantom PACS export ---------------------------------------------------------------------
@app.command("phantom-pacs")
@user_errors
def phantom_pacs(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="new folder for the export")],
    subjects: Annotated[int, typer.Option(min=1, help="number of phantom subjects")] = 3,
    shape: Annotated[
        tuple[int, int, int], typer.Option(help="volume shape D H W (slices, rows, columns)")
    ] = (16, 32, 32),
    seed: Annotated[int, typer.Option(help="random seed (same seed, same export)")] = 0,
    enhanced: Annotated[
        bool, typer.Option(help="write every other subject as one Enhanced MR multi-frame object")
    ] = True,
) -> None:
    """Write phantom subjects as a PACS export with fake identity, plus their label maps.

    Layout: OUT/dicom/<NAME_ID>/<DATE>_.../SE<n>/*.dcm and OUT/maps/<SeriesInstanceUID>.nii.gz,
    ready for `lsdm-node prepare --input OUT/dicom --maps OUT/maps`.
    """
    from node.phantom_pacs import write_phantom_pacs

    if any(n < 4 for n in shape):
        raise UserError(f"every side of --shape must be at least 4: {shape}")
    uids = write_phantom_pacs(out_dir, subjects=subjects, shape=shape, seed=seed, enhanced=enhanced)
    out.print(f"wrote {len(uids)} phantom series to {out_dir}/dicom and maps to {out_dir}/maps")
