"""The generator: semantic maps in, synthetic volumes out (a pipeline of VQ-GAN, diffusion model
and sampler, after the diffusers layout: network, schedule and loop are separate things).

A map is generated at its own resolution, in RAS orientation (as the models were trained), and
the volume is turned back to the map's voxel order and written with the map's own affine, so it
overlays its map exactly. Any map whose sides the networks can halve often enough is accepted.

Every map gets its own noise, seeded by the run seed and the map's id, so a volume depends only
on (seed, map, steps, guidance): not on batch composition, and not on whether the run was resumed.
An output folder records those settings (:mod:`lsdm.synthetic_folder`), so a run is resumed only
under the settings it began with.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from lsdm.checkpoint import file_sha256
from lsdm.cohort import MAPS_DIR, NIFTI_SUFFIX, read_nifti, subject_id, write_nifti
from lsdm.config import LSDMConfig
from lsdm.diffusion import LatentDiffusion, load_ldm, sample_latents
from lsdm.errors import InputError
from lsdm.synthetic_folder import GenerationSettings, SyntheticFolder, map_checksums
from lsdm.training import default_device
from lsdm.vqgan import VQGAN, load_vqgan

RAS = axcodes2ornt("RAS")


@dataclass(frozen=True)
class SemanticMap:
    id: str
    path: Path
    labels: np.ndarray  # (D, H, W) integer labels, in RAS voxel order
    affine: np.ndarray  # the file's own affine
    to_file_order: np.ndarray  # nibabel orientation transform from RAS back to the file's order
    original: np.ndarray  # the file's array, as written back beside the synthetic volume


def map_seed(seed: int, map_id: str) -> int:
    return (seed << 32) + zlib.crc32(map_id.encode())


def _generation_weights(vqgan: VQGAN, ldm: LatentDiffusion) -> dict[str, torch.Tensor]:
    tensors = {
        "vqgan/codebook": vqgan.codebook,
        "vqgan/latent_low": vqgan.latent_low,
        "vqgan/latent_high": vqgan.latent_high,
    }
    for key, value in vqgan.autoencoder.decoder.state_dict().items():
        tensors[f"vqgan/decoder/{key}"] = value
    for key, value in ldm.ema.module.state_dict().items():
        tensors[f"unet/{key}"] = value
    return tensors


def generation_tensors(vqgan: VQGAN, ldm: LatentDiffusion) -> dict[str, torch.Tensor]:
    """Exactly the weights that generation uses (what a generator bundle holds), copied."""
    weights = _generation_weights(vqgan, ldm)
    return {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}


class Generator:
    def __init__(
        self,
        vqgan: VQGAN,
        ldm: LatentDiffusion,
        config: LSDMConfig,
        labels: dict[int, str],
        device: torch.device | str = "cpu",
    ):
        self.vqgan, self.ldm = vqgan.to(device).eval(), ldm.to(device).eval()
        self.config, self.labels, self.device = config, labels, torch.device(device)
        self.vocabulary = np.array(sorted(labels))
        # the VQ-GAN's compression, then the UNet's latent patch and levels
        self.size_factor = vqgan.config.downsampling * ldm.downsampling
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        """SHA-256 of the configuration, vocabulary and generation weights: equal for the same
        model whether it came from checkpoints or from a bundle."""
        if self._sha256 is None:
            digest = hashlib.sha256(self.config.model_dump_json().encode())
            digest.update(repr(sorted(self.labels.items())).encode())
            for key, value in sorted(_generation_weights(self.vqgan, self.ldm).items()):
                value = value.detach().cpu().contiguous()  # one tensor at a time: no model copy
                digest.update(f"{key} {value.dtype} {tuple(value.shape)}".encode())
                digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._sha256 = digest.hexdigest()
        return self._sha256

    @classmethod
    def from_checkpoints(
        cls, vqgan_path: Path, ldm_path: Path, device: torch.device | str | None = None
    ) -> Generator:
        device = device or default_device()
        ldm, config, labels, metadata = load_ldm(ldm_path, device)
        if metadata.get("vqgan_sha256") != file_sha256(vqgan_path):
            raise InputError(
                f"the diffusion model was trained against another VQ-GAN: {vqgan_path}"
            )
        vqgan, _ = load_vqgan(vqgan_path, device)
        return cls(vqgan, ldm, config, labels, device)

    def read_map(self, path: Path) -> SemanticMap:
        """Read and check a map file; raises :class:`InputError` naming the file when the model
        cannot take it (unreadable, not 3D, non-integer, unknown labels, unsuitable shape)."""
        try:
            original, affine = read_nifti(path)  # refuses a huge declared shape before reading
        except Exception as err:
            raise InputError(f"unreadable map {path}: {err}") from None
        if original.ndim != 3:
            raise InputError(f"map is not 3D (shape {original.shape}): {path}")
        if not np.all(np.isfinite(original)) or not np.all(original == np.round(original)):
            raise InputError(f"map has non-integer values: {path}")
        unknown = np.setdiff1d(np.unique(original), self.vocabulary)
        if unknown.size:
            raise InputError(
                f"map has labels {unknown.astype(int).tolist()} outside the model's vocabulary "
                f"{self.vocabulary.tolist()}: {path}"
            )
        orientation = io_orientation(affine)
        labels = apply_orientation(original, orientation)
        if any(n % self.size_factor for n in labels.shape):
            raise InputError(
                f"map shape {labels.shape} (RAS) cannot be taken: every side must be divisible "
                f"by {self.size_factor}: {path}"
            )
        return SemanticMap(
            id=subject_id(Path(path)),
            path=Path(path),
            labels=labels.astype(np.int64),
            affine=affine,
            to_file_order=ornt_transform(RAS, orientation),
            original=original,
        )

    def one_hot(self, labels: np.ndarray) -> torch.Tensor:
        """(D, H, W) label values -> (L, D, H, W) one-hot over the vocabulary."""
        index = torch.from_numpy(np.searchsorted(self.vocabulary, labels))
        return F.one_hot(index, len(self.vocabulary)).permute(3, 0, 1, 2).float()

    @torch.no_grad()
    def generate(
        self,
        maps: torch.Tensor,
        seeds: list[int],
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """One-hot ``maps`` (B, L, D, H, W) -> volumes (B, 1, D, H, W) in [-1, 1]; sample ``i``
        starts from noise seeded with ``seeds[i]``."""
        steps = steps or self.config.diffusion.sampling_steps
        if guidance_scale is None:
            guidance_scale = self.config.diffusion.guidance_scale
        latent_shape = self.vqgan.latent_shape(maps.shape[2:])
        noise = torch.stack(
            [torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(self.device)
        latents = sample_latents(
            self.ldm,
            maps.to(self.device),
            noise,
            steps,
            guidance_scale,
            clip_to_unit=self.vqgan.config.latent_scaling == "range",
        )
        return self.vqgan.decode(latents).clamp(-1.0, 1.0).cpu()

    def check_folder(self, maps_dir: Path) -> list[Path]:
        """The ``*.nii.gz`` maps of ``maps_dir`` (or ``maps_dir/maps``), every one checked; raises
        :class:`InputError` on the first that the model cannot take."""
        maps_dir = Path(maps_dir)
        if (maps_dir / MAPS_DIR).is_dir():
            maps_dir = maps_dir / MAPS_DIR
        paths = sorted(maps_dir.glob(f"*{NIFTI_SUFFIX}"))
        if not paths:
            raise InputError(f"no maps (*{NIFTI_SUFFIX}) in {maps_dir}")
        for path in paths:
            self.read_map(path)
        return paths

    def settings(
        self,
        paths: list[Path],
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        maps_augmented: bool = False,
    ) -> GenerationSettings:
        """The settings a folder generated from ``paths`` records (defaults resolved)."""
        sampling = self.config.diffusion
        return GenerationSettings(
            generator_sha256=self.sha256,
            sampler=sampling.objective,
            steps=steps or sampling.sampling_steps,
            guidance=sampling.guidance_scale if guidance_scale is None else guidance_scale,
            seed=seed,
            maps_augmented=maps_augmented,
            maps=map_checksums(paths),
        )

    def generate_folder(
        self,
        paths: list[Path],
        out: Path,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int | None = None,
        on_done: Callable[[int, int], None] | None = None,
        maps_augmented: bool = False,
    ) -> list[str]:
        """Generate a volume for every map of ``paths`` (from :meth:`check_folder`, so that all
        problems surface before the first file is written) into ``out/images/<id>.nii.gz``, with
        the map used in ``out/maps/<id>.nii.gz``, recording the settings and each volume in
        ``out/generation.json`` (:class:`~lsdm.synthetic_folder.SyntheticFolder`). A folder begun
        with the same settings resumes: volumes recorded there are kept; one begun with other
        settings is refused. ``maps_augmented`` only declares, for the record, that ``paths`` are
        deformed copies of the user's maps. Returns the ids generated now.
        """
        settings = self.settings(paths, seed, steps, guidance_scale, maps_augmented)
        folder = SyntheticFolder(out)
        todo_ids = set(folder.begin(settings))
        todo = [p for p in paths if subject_id(p) in todo_ids]
        batch_size = batch_size or self.config.diffusion.batch_size
        by_shape: dict[tuple, list[SemanticMap]] = {}
        for path in todo:
            semantic_map = self.read_map(path)
            by_shape.setdefault(semantic_map.labels.shape, []).append(semantic_map)
        done = len(paths) - len(todo)
        if on_done is not None:
            on_done(done, len(paths))
        for group in by_shape.values():
            for first in range(0, len(group), batch_size):
                batch = group[first : first + batch_size]
                volumes = self.generate(
                    torch.stack([self.one_hot(m.labels) for m in batch]),
                    [map_seed(settings.seed, m.id) for m in batch],
                    settings.steps,
                    settings.guidance,
                )
                for semantic_map, volume in zip(batch, volumes, strict=True):
                    image = apply_orientation(volume[0].numpy(), semantic_map.to_file_order)
                    write_nifti(
                        folder.map(semantic_map.id), semantic_map.original, semantic_map.affine
                    )
                    write_nifti(
                        folder.image(semantic_map.id), image.astype(np.float32), semantic_map.affine
                    )
                folder.add([m.id for m in batch])
                done += len(batch)
                if on_done is not None:
                    on_done(done, len(paths))
        return [subject_id(p) for p in todo]
