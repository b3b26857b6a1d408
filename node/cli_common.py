"""What every ``lsdm-node`` command shares: the Typer app, the consoles, the user-error wrapper, the
site key store and the progress bar. The commands live in :mod:`node.cli_data` (keys, policies,
de-identification, cohorts) and :mod:`node.cli_federation` (federation, bundle, generation)."""

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

from deid.keys import SiteKeys, default_keys_dir
from lsdm.errors import InputError
from node.errors import ScanFailed
from policies import PolicyError

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
