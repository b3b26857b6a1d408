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
    help="Med-LSDM: phantom cohorts, central training (VQ-GAN, latent diffusion), sampling.",
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


def training_task(bar: Progress, name: str, total: int):
    """A progress task for a training loop's ``on_step(done, total, losses)``, showing its loss
    (the VQ-GAN's L1 reconstruction loss, the diffusion model's loss)."""
    task = bar.add_task(name, total=total, status="")

    def show(done: int, total: int, losses: dict[str, float]) -> None:
        loss = losses.get("recon_l1", losses.get("loss"))
        bar.update(task, completed=done, status="" if loss is None else f"loss {loss:.4f}")

    return show


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


# Options that several commands share.
CohortOption = Annotated[Path, typer.Option(help="Cohort folder (images/, maps/, cohort.json).")]
PresetOption = Annotated[str, typer.Option(help="Named configuration: tiny or reference.")]
ConfigOption = Annotated[Path | None, typer.Option(help="YAML configuration (overrides --preset).")]
StepsOption = Annotated[
    int | None, typer.Option(min=1, help="Total training steps (default: the config's).")
]
ResumeOption = Annotated[bool, typer.Option(help="Continue the run in --out.")]


def _load_config(preset: str, config: Path | None):
    from lsdm.config import load_config
    from lsdm.config import preset as named_preset

    return load_config(config) if config else named_preset(preset)


@train_app.command("vqgan")
@user_errors
def train_vqgan(
    cohort: CohortOption,
    out: Annotated[Path, typer.Option(help="Run folder: checkpoint, metrics, reconstructions.")],
    preset: PresetOption = "tiny",
    config: ConfigOption = None,
    steps: StepsOption = None,
    resume: ResumeOption = False,
) -> None:
    """Train the 3D VQ-GAN on a cohort.

    Writes a safetensors checkpoint, metrics.jsonl, reconstructions/ and preview.png into --out.
    """
    from lsdm.data import open_cohort
    from lsdm.train_vqgan import train_vqgan as run_training

    settings = _load_config(preset, config)
    if steps is not None:
        settings = settings.with_overrides(train={"vqgan_steps": steps})
    data = open_cohort(cohort)  # every input problem is found before anything is written
    with progress_bar() as bar:
        show = training_task(bar, "vqgan", settings.train.vqgan_steps)
        result = run_training(data, settings, out, resume=resume, on_step=show)
    mean_psnr = sum(result.psnr.values()) / len(result.psnr)
    print(f"trained to step {result.step}; reconstruction PSNR {mean_psnr:.2f} dB")
    print(f"checkpoint: {out / 'checkpoint.safetensors'}")
    print(f"preview:    {out / 'preview.png'}")


@train_app.command("ldm")
@user_errors
def train_ldm(
    cohort: CohortOption,
    vqgan: Annotated[Path, typer.Option(help="VQ-GAN checkpoint (from lsdm train vqgan).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoint and metrics.")],
    preset: PresetOption = "tiny",
    config: ConfigOption = None,
    steps: StepsOption = None,
    resume: ResumeOption = False,
) -> None:
    """Train the latent diffusion model on a cohort, against a frozen VQ-GAN.

    Writes a safetensors checkpoint and metrics.jsonl into --out.
    """
    from lsdm.data import open_cohort
    from lsdm.train_ldm import train_ldm as run_training

    settings = _load_config(preset, config)
    if steps is not None:
        settings = settings.with_overrides(train={"ldm_steps": steps})
    if not vqgan.is_file():
        raise InputError(f"no such VQ-GAN checkpoint: {vqgan}")
    data = open_cohort(cohort)
    with progress_bar() as bar:
        show = training_task(bar, "diffusion", settings.train.ldm_steps)
        result = run_training(data, vqgan, settings, out, resume=resume, on_step=show)
    print(f"trained to step {result.step}")
    print(f"checkpoint: {out / 'checkpoint.safetensors'}")


@app.command()
@user_errors
def sample(
    vqgan: Annotated[Path, typer.Option(help="VQ-GAN checkpoint.")],
    ldm: Annotated[Path, typer.Option(help="Latent diffusion checkpoint.")],
    maps: Annotated[Path, typer.Option(help="Folder of label maps (*.nii.gz), or a cohort.")],
    out: Annotated[Path, typer.Option(help="Output folder: images/ and maps/.")],
    steps: Annotated[
        int | None,
        typer.Option(min=1, max=1000, help="Sampling steps (default: the model config's)."),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(min=0.0, help="Classifier-free guidance (default: the model config's)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed: same seed and map give the same volume.")] = 0,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Maps per batch.")] = None,
) -> None:
    """Generate a synthetic volume for every map, in the map's own geometry.

    The folder's generation.json records the settings: an interrupted run resumes where it
    stopped when given the same settings; other settings are refused.
    """
    from lsdm.generate import Generator

    for path in (vqgan, ldm):
        if not path.is_file():
            raise InputError(f"no such checkpoint: {path}")
    generator = Generator.from_checkpoints(vqgan, ldm)
    paths = generator.check_folder(maps)  # every map is checked before anything is written
    with progress_bar() as bar:
        task = bar.add_task("sampling", total=None, status="")

        def show(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        made = generator.generate_folder(
            paths,
            out,
            seed=seed,
            steps=steps,
            guidance_scale=guidance,
            batch_size=batch_size,
            on_done=show,
        )
    print(f"generated {len(made)} volumes into {out / 'images'}")


@app.command()
@user_errors
def evaluate(
    real: Annotated[Path, typer.Option(help="The real cohort the synthetic volumes mirror.")],
    synthetic: Annotated[Path, typer.Option(help="Folder with images/ and maps/ (lsdm sample).")],
    out: Annotated[Path, typer.Option(help="Output folder (absent or empty).")],
    preset: PresetOption = "tiny",
    config: ConfigOption = None,
    steps: Annotated[int, typer.Option(min=1, help="Segmentation training steps.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the split and of every training.")] = 0,
    extractor_weights: Annotated[
        Path | None,
        typer.Option(
            help="3D ResNet weights on disk (MedicalNet resnet_N.pth layout, or safetensors): "
            "also report the Fréchet distance in its features."
        ),
    ] = None,
    extractor_depth: Annotated[
        int, typer.Option(help="Depth of the --extractor-weights ResNet (10, 18, 34, 50, ...).")
    ] = 10,
) -> None:
    """Measure synthetic volumes against the real cohort: Dice, Fréchet distance, diversity.

    Writes metrics.json, dice.png, intensities.png and the feature extractor into --out.
    """
    from lsdm.data import open_cohort
    from lsdm.evaluate import evaluate as run_evaluation
    from lsdm.resnet_features import load_resnet_extractor

    settings = _load_config(preset, config)
    cohort = open_cohort(real)
    resnet = None
    if extractor_weights is not None:
        resnet = load_resnet_extractor(extractor_weights, extractor_depth)
    with progress_bar() as bar:

        def stage(name: str, total: int):
            task = bar.add_task(name, total=total, status="")
            return lambda done: bar.update(task, completed=done)

        metrics = run_evaluation(
            cohort, synthetic, out, settings, steps, seed, on_stage=stage, resnet=resnet
        )
    print(metrics.describe())
    print(f"metrics: {out / 'metrics.json'}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs (absent or empty).")],
    preset: PresetOption = "tiny",
) -> None:
    """The main job on built-in phantom data, end to end.

    Phantom cohort -> VQ-GAN -> latent diffusion -> synthetic volumes from held-out phantom
    maps -> a sheet of map, real and synthetic side by side.
    """
    from lsdm.demo import run_demo

    settings = _load_config(preset, None)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder is not empty: {out}")
    with progress_bar() as bar:
        summary = run_demo(
            out, settings, on_stage=lambda name, total: training_task(bar, name, total)
        )
    print(f"training cohort:   {out / 'cohort'}")
    print(
        f"VQ-GAN:            {out / 'vqgan'} (reconstruction PSNR {summary.vqgan_psnr_db:.1f} dB)"
    )
    print(f"diffusion model:   {out / 'ldm'}")
    print(f"synthetic volumes: {out / 'synthetic'} (from the maps in {out / 'heldout'})")
    print(f"comparison sheet:  {out / 'comparison.png'}")
    print(summary.describe())


if __name__ == "__main__":
    app()
