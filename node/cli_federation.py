"""``lsdm-node`` commands of the federation: the site key, joining, the generator bundle
(verify, generate) and the privacy ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from node.cli_common import (
    PolicyOpt,
    app,
    err,
    out,
    user_errors,
)
from node.errors import UserError
from policies import DEFAULT_SITE_POLICY, load_site_policy


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
        f"+ diffusion {prov.rounds.diffusion}, DP {dp}"
        + ("" if prov.dp == "none" else " (as each site reported it)"),
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
    release = result.report.release
    out.print(f"report: {out_dir / 'report.html'} and {out_dir / 'report.json'}", markup=False)
    if release.releasable:
        out.print(f"releasable under policy {site_policy.name}", markup=False)
        return
    out.print(f"NOT releasable under policy {site_policy.name}:", markup=False)
    for reason in release.reasons:
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
