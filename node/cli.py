"""``lsdm-node``: what a site operator runs. Thin: parse, load the policy and keys, call, print."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deid.keys import KEY_FILE, SiteKeys, default_keys_dir
from lsdm.errors import InputError
from node.errors import ScanFailed, UserError
from policies import DEFAULT_SITE_POLICY, PolicyError, load_policy, load_site_policy, policy_to_yaml

app = typer.Typer(
    help="Med-LSDM site node: de-identify a PACS export into a training cohort, and more.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
policy_app = typer.Typer(help="Show and check site and federation policies.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

KeysOpt = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        help="the site's private key store (default $LSDM_NODE_KEYS or ~/.lsdm-node); "
        "never inside anything you publish",
        show_default=False,
    ),
]
PolicyOpt = Annotated[
    str,
    typer.Option("--policy", "-p", help="a preset (strict, research) or a policy file"),
]


def _quiet_pydicom() -> None:
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False)
    return typer.Exit(code)


def user_errors(fn: Callable) -> Callable:
    """A user's mistake is one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_pydicom()
        try:
            return fn(*args, **kwargs)
        except PolicyError as e:
            for problem in e.problems:
                err.print(f"error: {e.source}: {problem}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        except InputError as e:  # the one base of user errors (UserError, KeyStoreError, ...)
            raise _fail(str(e)) from None
        except FileExistsError as e:
            raise _fail(str(e)) from None
        except ScanFailed as e:
            for finding in e.findings[:50]:
                err.print(f"finding: {finding.line()}", markup=False, highlight=False)
            if len(e.findings) > 50:
                err.print(f"... and {len(e.findings) - 50} more", markup=False)
            raise _fail(f"{e}; nothing was written", code=1) from None
        except OSError as e:
            raise _fail(f"{e.strerror or e}: {e.filename or ''}") from None

    return wrapper


def _keys(path: Path | None, *, create: bool = True) -> SiteKeys:
    root = (path or default_keys_dir()).expanduser()
    if not create:
        return SiteKeys.load(root)
    keys, created = SiteKeys.open(root)
    if created:
        err.print(
            f"created the site secret in {root} (mode 0600). Back it up: without it pseudonyms "
            "cannot be reproduced or re-linked.",
            markup=False,
        )
    return keys


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def _count_files(root: Path) -> int:
    from deid.files import iter_files

    return sum(1 for _ in iter_files(root))


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


# -- federation: keygen, join ----------------------------------------------------------------------
@app.command()
@user_errors
def keygen(
    folder: Annotated[Path, typer.Argument(help="folder for site_key and site_key.pub")],
) -> None:
    """Make the site's federation key pair; give site_key.pub to the coordinator."""
    from node.keygen import make_site_key

    private, public = make_site_key(folder)
    out.print(f"private key: {private} (mode 0600, stays at the site)", markup=False)
    out.print(
        f"public key:  {public} (send to the coordinator: lsdm-server register)", markup=False
    )


@app.command()
@user_errors
def join(
    server: Annotated[str, typer.Option("--server", help="the coordinator's HOST:PORT")],
    ca: Annotated[Path, typer.Option("--ca", help="the coordinator's CA certificate (ca.pem)")],
    key: Annotated[Path, typer.Option("--key", help="the site's private key (lsdm-node keygen)")],
    cohort: Annotated[Path, typer.Option("--cohort", help="the de-identified cohort folder")],
    policy: PolicyOpt = DEFAULT_SITE_POLICY,
    workdir: Annotated[
        Path | None,
        typer.Option(help="folder for the site's round state (default: COHORT/../federation)"),
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for local training")] = 1,
    coordinator_key: Annotated[
        Path,
        typer.Option(
            "--coordinator-key",
            help="the coordinator's public signing key (signing.pub.pem), pinned at the first "
            "join: the generator bundle handed out at the end must be signed with it",
        ),
    ] = ...,
) -> None:
    """Join a federation: run a Flower SuperNode that trains on the cohort each round.

    Only weights and aggregate metrics leave the site (sample count and mean losses; a DP site
    sends its ε instead of losses). The node refuses apps that carry code, rounds its policy
    rules out (or its privacy budget cannot pay for) and a foreign label vocabulary; it
    reconnects by itself when the coordinator restarts. When training ends it stores the signed
    generator bundle in WORKDIR/generator.lsdm, if the signature verifies.
    """
    from node.join import JoinSpec
    from node.join import join as run_join

    spec = JoinSpec(
        server=server,
        ca=ca,
        key=key,
        cohort=cohort,
        policy=policy,
        workdir=workdir or cohort.resolve().parent / f"{cohort.resolve().name}-federation",
        threads=threads,
        coordinator_key=coordinator_key,
    )
    raise typer.Exit(run_join(spec))


# -- generator bundle: verify, generate ------------------------------------------------------------
CoordinatorKeyOpt = Annotated[
    Path,
    typer.Option(
        "--coordinator-key", help="the coordinator's public signing key (signing.pub.pem)"
    ),
]


@app.command()
@user_errors
def verify(
    bundle: Annotated[Path, typer.Argument(help="a generator bundle (lsdm-server publish)")],
    coordinator_key: CoordinatorKeyOpt,
) -> None:
    """Check a generator bundle's signature against the coordinator key: valid, or what is wrong."""
    from node.generate import verify as verify_bundle

    manifest = verify_bundle(bundle, coordinator_key)
    prov = manifest.provenance
    dp = (
        "none"
        if prov.dp == "none"
        else ", ".join(
            f"{s}: none" if b == "none" else f"{s}: ε={b.epsilon:.3g}, δ={b.delta:.1g}"
            for s, b in prov.dp.items()
        )
    )
    out.print(f"valid: {bundle}", markup=False)
    out.print(
        f"  federation {prov.federation}, {prov.sites} site(s), rounds vqgan {prov.rounds.vqgan} "
        f"+ diffusion {prov.rounds.diffusion}, DP {dp}",
        markup=False,
    )
    out.print(
        f"  {prov.software_version}, created {prov.created_at}, signer "
        f"{manifest.signer['public_key_sha256'][:16]}…",
        markup=False,
    )


@app.command()
@user_errors
def generate(
    bundle: Annotated[Path, typer.Option("--bundle", help="the generator bundle")],
    coordinator_key: CoordinatorKeyOpt,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder (resumable)")],
    maps: Annotated[
        Path | None, typer.Option("--maps", help="a folder of label maps (*.nii.gz)")
    ] = None,
    from_cohort: Annotated[
        Path | None, typer.Option("--from-cohort", help="use this de-identified cohort's maps")
    ] = None,
    real: Annotated[
        Path | None,
        typer.Option(help="the site's real cohort for the report (default: --from-cohort)"),
    ] = None,
    holdout: Annotated[
        Path | None,
        typer.Option(help="real subjects NOT used in training, as the memorisation reference"),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(min=1, max=1000, help="sampling steps (default: the bundle's model config)"),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(min=0.0, help="classifier-free guidance (default: the bundle's model config)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed: same seed and map give the same volume")] = 0,
    batch_size: Annotated[int | None, typer.Option(min=1, help="maps per batch")] = None,
    augment_maps: Annotated[
        bool,
        typer.Option(help="deform every map first (label-preserving), so no map is a patient's"),
    ] = False,
    segmentation_steps: Annotated[
        int, typer.Option(min=1, help="training steps of the report's segmenter")
    ] = 200,
    report: Annotated[bool, typer.Option(help="build the release report")] = True,
    strict: Annotated[
        bool, typer.Option(help="exit with status 1 when the release gate fails")
    ] = False,
    policy: PolicyOpt = DEFAULT_SITE_POLICY,
) -> None:
    """Generate a synthetic dataset from label maps with a verified bundle, plus its release
    report (report.json, report.html) and the site policy's release decision."""
    from rich.progress import TimeRemainingColumn

    from node.generate import GenerateSpec
    from node.generate import generate as run_generate

    site_policy = load_site_policy(policy)
    spec = GenerateSpec(
        bundle=bundle, coordinator_key=coordinator_key, out=out_dir, maps=maps,
        from_cohort=from_cohort, real=real, holdout=holdout, steps=steps, guidance=guidance,
        seed=seed, batch_size=batch_size, augment_maps=augment_maps,
        segmentation_steps=segmentation_steps, report=report,
    )  # fmt: skip
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("generating", total=None)

        def stage(name: str, total: int):
            sub = bar.add_task(name, total=total)
            return lambda done: bar.update(sub, completed=done)

        result = run_generate(
            spec,
            site_policy,
            on_done=lambda done, total: bar.update(task, completed=done, total=total),
            on_stage=stage,
        )
    out.print(
        f"generated {result.generated} volume(s) ({result.total} in all) into {out_dir / 'images'}",
        markup=False,
    )
    if result.report is None:
        return
    release = result.report["release"]
    out.print(f"report: {out_dir / 'report.html'} and {out_dir / 'report.json'}", markup=False)
    if release["releasable"]:
        out.print(f"releasable under policy {site_policy.name}", markup=False)
        return
    out.print(f"NOT releasable under policy {site_policy.name}:", markup=False)
    for reason in release["reasons"]:
        out.print(f"  - {reason}", markup=False)
    if strict:
        raise typer.Exit(1)


@app.command()
@user_errors
def privacy(
    cohort: Annotated[Path, typer.Argument(help="the de-identified cohort folder")],
    policy: PolicyOpt = DEFAULT_SITE_POLICY,
) -> None:
    """The cohort's privacy budget: ε spent by every DP-SGD step ever taken on it (its ledger,
    COHORT/privacy-ledger.json) and ε left, at the policy's δ and with its accountant."""
    from lsdm.cohort import MANIFEST_NAME
    from node.ledger import Ledger, LedgerError

    if not (cohort / MANIFEST_NAME).is_file():
        raise UserError(f"not a cohort (no {MANIFEST_NAME}): {cohort}")
    dp = load_site_policy(policy).dp
    try:
        ledger = Ledger.of_cohort(cohort)
    except LedgerError as e:
        raise UserError(str(e)) from None
    spent = ledger.epsilon(dp.target_delta, dp.accountant)
    table = Table("when", "phase", "round", "steps", "noise multiplier")
    for entry in ledger.rounds:
        table.add_row(
            str(entry.get("time", "")),
            str(entry.get("phase", "")),
            str(entry.get("round", "")),
            str(entry.get("steps", "")),
            f"{entry['noise_multiplier']:.3g}" if "noise_multiplier" in entry else "",
        )
    if ledger.rounds:
        out.print(table)
    out.print(f"ledger: {ledger.path} ({ledger.steps} DP-SGD steps)", markup=False)
    out.print(
        f"ε spent: {spent:.4g} at δ = {dp.target_delta:g} ({dp.accountant} accountant)",
        markup=False,
    )
    state = "enabled" if dp.enabled else "DISABLED: training with this policy spends no ε"
    out.print(
        f"ε left: {max(0.0, dp.target_epsilon - spent):.4g} of {dp.target_epsilon:g} "
        f"(policy {policy}, DP {state})",
        markup=False,
    )
