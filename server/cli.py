"""``lsdm-server``: what a coordinator runs. Thin: parse, call one function, print."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Med-LSDM coordinator: set up a federation, register sites, run federated training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DirArg = Annotated[Path, typer.Argument(help="the coordinator folder")]


def user_errors(fn: Callable) -> Callable:
    """A user's mistake (:class:`InputError`, the one base of user errors, or a clash with
    existing files) is one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lsdm.errors import InputError

        try:
            return fn(*args, **kwargs)
        except (InputError, FileExistsError) as e:
            err.print(f"error: {e}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        except OSError as e:
            err.print(f"error: {e.strerror or e}: {e.filename or ''}", markup=False)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@user_errors
def init(
    folder: DirArg,
    host: Annotated[
        list[str],
        typer.Option(
            "--host",
            help="a name or address sites will use to reach this coordinator "
            "(repeat for several; localhost and 127.0.0.1 are always included)",
        ),
    ] = ["localhost"],  # noqa: B006 (typer reads the default, never mutates it)
    policy: Annotated[
        str, typer.Option("--policy", help="federation policy: a preset name or a policy file")
    ] = "federation",
) -> None:
    """Make a coordinator folder: CA and server certificate, signing key, federation policy,
    settings, and the code-free Flower app."""
    from lsdm.errors import InputError
    from policies import FederationPolicy, load_policy
    from server.settings import CoordinatorSettings, init_coordinator

    federation = load_policy(policy)
    if not isinstance(federation, FederationPolicy):
        raise InputError(f"{policy} is a site policy; a federation policy is needed here")
    init_coordinator(folder, federation, CoordinatorSettings(hosts=host))
    out.print(f"coordinator folder: {folder}")
    out.print(
        f"give sites: {folder / 'tls' / 'ca.pem'}; register their keys with lsdm-server register"
    )


@app.command()
@user_errors
def register(
    folder: DirArg,
    key: Annotated[Path, typer.Argument(help="the site's public key (from lsdm-node keygen)")],
    name: Annotated[str, typer.Option("--name", help="the site's name (letters, digits, -_)")],
) -> None:
    """Allow a site in: record its public key under a name."""
    from server.settings import register_site

    register_site(folder, key, name)
    out.print(f"registered {name} (takes effect at the next lsdm-server serve)")


@app.command()
@user_errors
def sites(folder: DirArg) -> None:
    """List the registered sites."""
    from server.settings import Coordinator

    coordinator = Coordinator(folder)
    coordinator.check()
    table = Table("site", "key")
    for name, path in coordinator.registered_sites().items():
        kind, blob = path.read_text().split()[:2]
        table.add_row(name, f"{kind} …{blob[-16:]}")
    out.print(table)


def _print_event(entry: dict) -> None:
    event = entry.get("event")
    if event == "listening":
        out.print(
            f"listening on {entry['address']} (fleet API only); sites: "
            f"{', '.join(entry['sites']) or 'none registered'}"
        )
    elif event == "run":
        out.print(f"training run {entry['run_id']} started")
    elif event == "start":
        out.print(f"rounds {entry['after_round'] + 1}..{entry['total_rounds']} to go")
    elif event == "calibrated":
        out.print(f"latent scale agreed by {', '.join(entry['sites'])}")
    elif event == "round":
        losses = "; ".join(
            f"{site}: n={m['num_samples']} "
            + " ".join(f"{k}={v:.4g}" for k, v in m.items() if k != "num_samples")
            for site, m in entry["accepted"].items()
        )
        out.print(
            f"round {entry['round']} ({entry['phase']}) {entry['outcome']}: {losses}", markup=False
        )
        for site, reason in entry["rejected"].items():
            out.print(f"  {site}: {reason}", markup=False)
    elif event == "handed_out":
        out.print(f"generator bundle {entry['bundle']} stored by: {', '.join(entry['stored'])}")
        for site, reason in entry["refused"].items():
            out.print(f"  {site}: {reason}", markup=False)
    elif event == "finished":
        out.print(f"finished {entry['rounds']} rounds")


@app.command()
@user_errors
def serve(
    folder: DirArg,
    address: Annotated[
        str, typer.Option("--address", help="HOST:PORT sites connect to (TLS, fleet API only)")
    ] = "0.0.0.0:9092",
    resume: Annotated[
        bool, typer.Option("--resume", help="continue after the last completed round")
    ] = False,
) -> None:
    """Run the federation: SuperLink, gateway, and the training run, until the last round."""
    from server.serve import serve as run_serve
    from server.settings import Coordinator

    run_serve(folder, address, resume, _print_event)
    state = Coordinator(folder).state
    out.print(f"shared models: {state / 'vqgan.safetensors'}, {state / 'ldm.safetensors'}")


@app.command()
@user_errors
def demo(
    out_dir: Annotated[Path, typer.Argument(help="new folder for everything the demo makes")],
    sites: Annotated[int, typer.Option(min=2, max=8, help="phantom sites")] = 3,
    subjects: Annotated[int, typer.Option(min=1, help="phantom subjects per site")] = 6,
    vqgan_rounds: Annotated[int, typer.Option(min=1, help="rounds of phase 1 (VQ-GAN)")] = 4,
    diffusion_rounds: Annotated[int, typer.Option(min=1, help="rounds of phase 2")] = 5,
    vqgan_steps: Annotated[int, typer.Option(min=1, help="local VQ-GAN steps per round")] = 50,
    diffusion_steps: Annotated[int, typer.Option(min=1, help="local LDM steps per round")] = 100,
) -> None:
    """A whole federation on this machine: phantom sites with their own cohorts and keys, a
    coordinator on 127.0.0.1 with TLS and site authentication, both phases at the tiny preset,
    then synthetic volumes from the shared model and OUT/comparison.png."""
    from server.demo import run_federated_demo

    agreement = run_federated_demo(
        out_dir,
        sites=sites,
        subjects=subjects,
        rounds=(vqgan_rounds, diffusion_rounds),
        local_steps=(vqgan_steps, diffusion_steps),
        on_event=_print_event,
    )
    out.print(f"comparison sheet: {out_dir / 'comparison.png'}")
    out.print(agreement.describe())


@app.command()
@user_errors
def publish(
    folder: DirArg,
    out_file: Annotated[Path, typer.Option("--out", help="the bundle file to write")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="a federation checkpoint to export (default: the final models of serve)",
        ),
    ] = None,
) -> None:
    """Export the shared generator as one bundle signed with the coordinator's key."""
    from server.publish import publish as run_publish

    manifest = run_publish(folder, out_file, checkpoint)
    prov = manifest.provenance
    dp = "none" if prov.dp == "none" else "per site, ε as each site reported it"
    out.print(f"bundle: {out_file}", markup=False)
    out.print(
        f"federation {prov.federation}, {prov.sites} site(s), rounds vqgan {prov.rounds.vqgan} "
        f"+ diffusion {prov.rounds.diffusion}, DP {dp}; "
        f"signed by {manifest.signer['public_key_sha256'][:16]}…",
        markup=False,
    )
    out.print(f"sites verify it with: {folder / 'signing.pub.pem'}", markup=False)
