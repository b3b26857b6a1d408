"""A synthetic dataset folder and its record, ``generation.json``: the settings the dataset is
made with and the SHA-256 of every volume and map written under them.

    <out>/images/<id>.nii.gz, <out>/maps/<id>.nii.gz   the dataset
    <out>/generation.json                               the record (a :class:`GenerationRecord`)

The record is written before the first volume, with ``complete: false``; each volume is entered
once its two files are in place, and ``complete`` turns true only when every map has its volume.
A folder is therefore never a silent mix:

- a run whose settings (generator, steps, guidance, seed, the maps and whether they were
  augmented) differ from the record's is refused before anything is written;
- a volume counts as done only while its files have the checksums recorded for them; a file that
  is there but not recorded (a run killed between writing and recording it) is made again, a
  recorded file that has since changed is refused;
- :meth:`SyntheticFolder.verify` (the release report starts with it) accepts only a complete
  record whose files are exactly the folder's ``images/`` and ``maps/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lsdm.atomic import atomic_write_text, remove_partial_files
from lsdm.checkpoint import file_sha256
from lsdm.cohort import IMAGES_DIR, MAPS_DIR, NIFTI_SUFFIX, subject_id
from lsdm.errors import InputError

RECORD_NAME = "generation.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationSettings(_Frozen):
    """Everything a volume depends on; two runs with equal settings write identical files."""

    generator_sha256: str = Field(description="the generator's weights and configuration")
    sampler: str
    steps: int
    guidance: float
    seed: int
    maps_augmented: bool = False
    maps: dict[str, str] = Field(description="id -> SHA-256 of the map file generated from")

    def differences(self, other: GenerationSettings) -> list[str]:
        """What ``other`` changes, in words (``steps 10 -> 5``)."""
        changes = []
        if self.generator_sha256 != other.generator_sha256:
            changes.append("another generator")
        for field in ("sampler", "steps", "guidance", "seed", "maps_augmented"):
            before, after = getattr(self, field), getattr(other, field)
            if before != after:
                changes.append(f"{field.replace('_', ' ')} {before} -> {after}")
        if self.maps != other.maps:
            changed = sorted(
                i for i in set(self.maps) | set(other.maps) if self.maps.get(i) != other.maps.get(i)
            )
            shown = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
            changes.append(f"{len(changed)} map(s) differ ({shown})")
        return changes


class VolumeRecord(_Frozen):
    image_sha256: str
    map_sha256: str


class GenerationRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["med-lsdm-generation"] = "med-lsdm-generation"
    format_version: Literal[1] = 1
    complete: bool = False
    settings: GenerationSettings
    volumes: dict[str, VolumeRecord] = Field(default_factory=dict)


class SyntheticFolder:
    """The ``images/``, ``maps/`` and ``generation.json`` of one synthetic dataset."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.record_path = self.root / RECORD_NAME
        self.record: GenerationRecord | None = None

    def image(self, sid: str) -> Path:
        return self.root / IMAGES_DIR / f"{sid}{NIFTI_SUFFIX}"

    def map(self, sid: str) -> Path:
        return self.root / MAPS_DIR / f"{sid}{NIFTI_SUFFIX}"

    def _files(self, leftovers: bool = True) -> set[str]:
        """``images/<name>`` and ``maps/<name>`` of every file there; without ``leftovers``, not
        the temporary files of a write that was killed (:func:`lsdm.atomic.atomic_path`), which
        :meth:`begin` removes."""
        return {
            f"{sub}/{p.name}"
            for sub in (IMAGES_DIR, MAPS_DIR)
            if (self.root / sub).is_dir()
            for p in (self.root / sub).iterdir()
            if leftovers or not (p.name.startswith(".") and ".partial" in p.name)
        }

    def read(self) -> GenerationRecord | None:
        if not self.record_path.exists():
            return None
        try:
            return GenerationRecord.model_validate_json(self.record_path.read_text())
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise InputError(f"unreadable generation record {self.record_path}: {first}") from None

    def _check_volume(self, sid: str, entry: VolumeRecord) -> bool:
        """True when both files are there with their recorded checksums, False when either is
        missing (it will be made again); raises when a recorded file has changed."""
        image, label_map = self.image(sid), self.map(sid)
        if not (image.is_file() and label_map.is_file()):
            return False
        for path, expected in ((image, entry.image_sha256), (label_map, entry.map_sha256)):
            if file_sha256(path) != expected:
                raise InputError(
                    f"{path} changed after it was generated (its checksum differs from "
                    f"{RECORD_NAME}): generate into a new --out folder"
                )
        return True

    def plan(self, settings: GenerationSettings) -> list[str]:
        """The ids still to generate under ``settings``; refuses (:class:`InputError`, nothing
        written) a folder made with other settings, one holding files that no map of
        ``settings`` makes, and one whose recorded files have changed."""
        record = self.read()
        if record is None:
            if self._files(leftovers=False):
                raise InputError(
                    f"{self.root} holds images/ or maps/ but no {RECORD_NAME}, so what made "
                    "them is unknown: generate into a new --out folder"
                )
            return sorted(settings.maps)
        changes = record.settings.differences(settings)
        if changes:
            raise InputError(
                f"{self.root} was generated with other settings ({'; '.join(changes)}): "
                "give the same settings to finish it, or generate into a new --out folder"
            )
        expected = {
            f"{sub}/{sid}{NIFTI_SUFFIX}" for sid in settings.maps for sub in ("images", "maps")
        }
        stray = sorted(self._files(leftovers=False) - expected)
        if stray:
            raise InputError(
                f"{self.root / stray[0]} is not made from any of the maps: remove it, or "
                "generate into a new --out folder"
            )
        done = {sid for sid, entry in record.volumes.items() if self._check_volume(sid, entry)}
        return sorted(set(settings.maps) - done)

    def begin(self, settings: GenerationSettings) -> list[str]:
        """:meth:`plan`, then record the settings; while anything is left to generate the record
        says ``complete: false`` (written before the first new file)."""
        todo = self.plan(settings)
        for folder in (self.root, self.root / IMAGES_DIR, self.root / MAPS_DIR):
            remove_partial_files(folder)
        record = self.read() or GenerationRecord(settings=settings)
        volumes = {s: v for s, v in record.volumes.items() if s not in todo}
        self.record = GenerationRecord(settings=settings, volumes=volumes, complete=not todo)
        if todo or record != self.record or not self.record_path.exists():
            self._write()
        return todo

    def add(self, sids: list[str]) -> None:
        """Record volumes whose image and map have just been written."""
        assert self.record is not None, "begin() first"
        for sid in sids:
            self.record.volumes[sid] = VolumeRecord(
                image_sha256=file_sha256(self.image(sid)), map_sha256=file_sha256(self.map(sid))
            )
        self.record.complete = set(self.record.volumes) == set(self.record.settings.maps)
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.record_path, self.record.model_dump_json(indent=2))

    def verify(self) -> GenerationRecord:
        """The record of a finished dataset whose files are exactly what it records; raises
        :class:`InputError` for an unfinished, altered or unrecorded folder."""
        record = self.read()
        if record is None:
            raise InputError(
                f"{self.root} has no {RECORD_NAME}: nothing shows how its volumes were made"
            )
        if not record.complete:
            raise InputError(
                f"{self.root} is unfinished (its generation was interrupted): run generate "
                "again with the same settings to finish it"
            )
        expected = {
            f"{sub}/{sid}{NIFTI_SUFFIX}" for sid in record.volumes for sub in ("images", "maps")
        }
        stray = sorted(self._files() - expected)
        if stray:
            raise InputError(f"{self.root / stray[0]} was not generated under {RECORD_NAME}")
        for sid, entry in record.volumes.items():
            if not self._check_volume(sid, entry):
                raise InputError(f"{self.image(sid)} or its map is missing from {self.root}")
        return record


def map_checksums(paths: list[Path]) -> dict[str, str]:
    """id -> SHA-256 of each map file, for :attr:`GenerationSettings.maps`."""
    return {subject_id(Path(p)): file_sha256(Path(p)) for p in paths}
