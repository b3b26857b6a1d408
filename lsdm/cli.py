"""``lsdm``: the model's command line (phantom cohorts, central training).

Thin by design: parse, load the configuration, call one library function, print. A user's mistake
is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lsdm.errors import InputError

app = typer.Typer(
    help="Med-LSDM: phantom cohorts and central training of the 3D VQ-GAN.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train a model centrally on one cohort.", no_args_is_help=True)
app.add_typer(train_app, name="train")

console = Console(stderr=True)


def user_errors(command):
    """Turn :class:`InputError` (and a clash with existing files) into one line and exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (InputError, FileExistsError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@app.command()
@user_errors
def phantom(
    out: Annotated[Path, typer.Option(help="Cohort folder to create (absent or empty).")],
    subjects: Annotated[int, typer.Option(min=1, help="Number of subjects.")] = 8,
    shape: Annotated[
        tuple[int, int, int], typer.Option(help="Volume shape D H W (voxel axes R, A, S).")
    ] = (32, 64, 64),
    seed: Annotated[int, typer.Option(help="Cohort seed: the same seed gives the same files.")] = 0,
) -> None:
    """Make a phantom cohort of breast-MRI-like subjects: images/, maps/, cohort.json."""
    from lsdm.atomic import staged_directory
    from lsdm.phantom import write_cohort

    if min(shape) < 8:
        raise InputError(f"shape {shape}: every side needs at least 8 voxels")
    with progress_bar() as bar, staged_directory(out) as stage:
        task = bar.add_task("phantom", total=subjects, status="")
        manifest = write_cohort(stage, subjects, shape, seed, lambda: bar.advance(task))
    print(f"wrote {len(manifest.subjects)} subjects to {out}")


def _load_config(preset: str, config: Path | None):
    from lsdm.config import load_config
    from lsdm.config import preset as named_preset

    return load_config(config) if config else named_preset(preset)


@train_app.command("vqgan")
@user_errors
def train_vqgan(
    cohort: Annotated[Path, typer.Option(help="Cohort folder (images/, maps/, cohort.json).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoint, metrics, reconstructions.")],
    preset: Annotated[str, typer.Option(help="Named configuration: tiny or reference.")] = "tiny",
    config: Annotated[
        Path | None, typer.Option(help="YAML configuration (overrides --preset).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Total training steps (default: the config's).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
) -> None:
    """Train the 3D VQ-GAN on a cohort; writes a safetensors checkpoint, metrics.jsonl,
    reconstructions/ and preview.png into --out."""
    from lsdm.data import open_cohort
    from lsdm.train_vqgan import train_vqgan as run_training

    settings = _load_config(preset, config)
    if steps is not None:
        settings = settings.with_overrides(train={"vqgan_steps": steps})
    data = open_cohort(cohort)  # every input problem is found before anything is written
    with progress_bar() as bar:
        task = bar.add_task("vqgan", total=settings.train.vqgan_steps, status="")

        def show(done: int, total: int, losses: dict[str, float]) -> None:
            bar.update(task, completed=done, status=f"L1 {losses['recon_l1']:.4f}")

        result = run_training(data, settings, out, resume=resume, on_step=show)
    mean_psnr = sum(result.psnr.values()) / len(result.psnr)
    print(f"trained to step {result.step}; reconstruction PSNR {mean_psnr:.2f} dB")
    print(f"checkpoint: {out / 'checkpoint.safetensors'}")
    print(f"preview:    {out / 'preview.png'}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs (absent or empty).")],
    preset: Annotated[str, typer.Option(help="Named configuration: tiny or reference.")] = "tiny",
    steps: Annotated[int | None, typer.Option(min=1, help="VQ-GAN training steps.")] = None,
) -> None:
    """The main job on built-in data: make a phantom cohort, train the VQ-GAN on it, write
    reconstructions and a preview picture."""
    from lsdm.demo import run_demo

    settings = _load_config(preset, None)
    if steps is not None:
        settings = settings.with_overrides(train={"steps": steps})
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder is not empty: {out}")
    with progress_bar() as bar:
        task = bar.add_task("vqgan", total=settings.train.steps, status="")

        def show(done: int, total: int, losses: dict[str, float]) -> None:
            bar.update(task, completed=done, status=f"L1 {losses['recon_l1']:.4f}")

        result = run_demo(out, settings, on_step=show)
    mean_psnr = sum(result.psnr.values()) / len(result.psnr)
    print(f"phantom cohort:  {out / 'cohort'}")
    print(f"VQ-GAN run:      {out / 'vqgan'} (step {result.step}, PSNR {mean_psnr:.2f} dB)")
    print(f"reconstructions: {out / 'vqgan' / 'reconstructions'}")
    print(f"preview picture: {out / 'vqgan' / 'preview.png'}")


if __name__ == "__main__":
    app()
