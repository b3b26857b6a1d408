"""``lsdm evaluate``: how useful synthetic volumes are, measured against the real cohort they
mirror, by the protocol of :mod:`lsdm.fidelity` with every measure on. Every synthetic volume
must come from the map of a subject of that cohort (same id, identical map).

Writes into ``out`` (absent or empty): ``metrics.json`` (a :class:`lsdm.fidelity.Fidelity`),
``dice.png``, ``intensities.png`` and ``extractor.safetensors`` (the Fréchet extractor, whose
SHA-256 the metrics give).
"""

from __future__ import annotations

from pathlib import Path

from lsdm.atomic import atomic_write_text
from lsdm.config import LSDMConfig
from lsdm.data import Cohort
from lsdm.errors import InputError
from lsdm.fidelity import Fidelity, FidelitySettings, OnStage, measure_fidelity, open_synthetic
from lsdm.fidelity_plots import plot_dice, plot_intensities
from lsdm.resnet_features import ResNetExtractor
from lsdm.segmenter import load_volumes

METRICS_JSON = "metrics.json"
EXTRACTOR_FILE = "extractor.safetensors"


def evaluate(
    real: Cohort,
    synthetic_dir: Path,
    out: Path,
    config: LSDMConfig,
    steps: int = 300,
    seed: int = 0,
    test_share: float = 0.34,
    on_stage: OnStage | None = None,
    resnet: ResNetExtractor | None = None,
) -> Fidelity:
    """Measure the synthetic volumes of ``synthetic_dir`` against ``real`` and write the files
    above. With ``resnet`` (user-supplied 3D ResNet weights), a second Fréchet distance in its
    features is reported as ``frechet_distance_resnet``."""
    synthetic = open_synthetic(synthetic_dir, real.labels, real=real)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder is not empty: {out}")
    ids = sorted(set(real.ids) & set(synthetic.ids))
    if len(ids) < 2:
        raise InputError(f"need at least 2 subjects with synthetic volumes, found {len(ids)}")
    settings = FidelitySettings(
        segmentation_steps=steps,
        seed=seed,
        test_share=test_share,
        synthetic_training=True,
        paired=True,
    )
    real_volumes = load_volumes(real, config, ids)
    synthetic_volumes = load_volumes(synthetic, config, ids)
    out.mkdir(parents=True, exist_ok=True)
    fidelity = measure_fidelity(
        real_volumes,
        synthetic_volumes,
        real.labels,
        settings,
        out / EXTRACTOR_FILE,
        on_stage=on_stage,
        resnet=resnet,
    )
    plot_dice(fidelity.dice, out / "dice.png")
    plot_intensities(real_volumes, synthetic_volumes, real.labels, out / "intensities.png")
    atomic_write_text(out / METRICS_JSON, fidelity.model_dump_json(indent=2))
    return fidelity


def load_metrics(path: Path) -> Fidelity:
    """A ``metrics.json`` written by :func:`evaluate`, validated."""
    try:
        return Fidelity.model_validate_json(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"not a metrics file of lsdm evaluate: {path}: {err}") from None
