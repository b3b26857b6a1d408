"""The demo's map agreement (lsdm.demo.map_agreement) on volumes whose answer is known: held-out
real images posing as synthetic ones score exactly as the real images do, against their own map
and another subject's, and fall to near chance against their map mirrored; an untrained
autoencoder's reconstructions score near chance."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from lsdm.cohort import IMAGES_DIR, NIFTI_SUFFIX
from lsdm.config import preset
from lsdm.data import make_dataset, open_cohort
from lsdm.demo import map_agreement
from lsdm.phantom import write_cohort
from lsdm.vqgan import VQGAN
from tests.helpers import CONDITIONING_SHAPE


def test_real_images_posing_as_synthetic_score_as_real(tmp_path):
    config = preset("tiny").with_overrides(data={"shape": CONDITIONING_SHAPE})
    write_cohort(tmp_path / "train", subjects=4, shape=CONDITIONING_SHAPE, seed=3)
    write_cohort(tmp_path / "heldout", subjects=3, shape=CONDITIONING_SHAPE, seed=4)
    heldout = open_cohort(tmp_path / "heldout")
    images = tmp_path / "synthetic" / IMAGES_DIR
    images.mkdir(parents=True)
    dataset = make_dataset(heldout, config.data)
    for i, sid in enumerate(heldout.ids):
        volume = dataset[i]["image"][0].numpy()
        nib.save(nib.Nifti1Image(volume, np.eye(4)), images / f"{sid}{NIFTI_SUFFIX}")

    untrained = VQGAN(config.vqgan)
    scores = map_agreement(
        [open_cohort(tmp_path / "train")], heldout, tmp_path / "synthetic", untrained, config,
        tmp_path / "sheet.png",
    )  # fmt: skip

    assert scores.map_agreement_synthetic == scores.map_agreement_real > 0.5
    assert scores.map_agreement_synthetic_swapped == scores.map_agreement_real_swapped
    assert scores.map_agreement_real_swapped < scores.map_agreement_real - 0.1
    assert scores.map_agreement_mirrored < 0.35
    # an untrained autoencoder reconstructs nothing of the anatomy
    assert scores.map_agreement_reconstructed < 0.3
    assert (tmp_path / "sheet.png").stat().st_size > 0
