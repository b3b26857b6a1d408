"""Writes that never leave a half-written file or folder behind: stage beside, then rename.

A process killed mid-write (``kill -9``, power loss) cannot clean up after itself, so what it
leaves is named to be found again: hidden ``.<random>.partial<suffixes>`` files
(:func:`atomic_path`, removed by :func:`remove_partial_files`) and hidden
``.<out>.<pid>.<random>.partial`` folders (:func:`staged_directory`, whose next run for the same
``out`` removes those of processes no longer running).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``.

    The temporary name keeps ``path``'s suffixes (``.nii.gz``), which some writers go by.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".partial" + "".join(path.suffixes[-2:])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_partial_files(folder: Path) -> list[Path]:
    """Remove the temporary files that :func:`atomic_path` calls in ``folder`` left behind when
    their process was killed; returns them. Call it only where no other process is writing."""
    removed = []
    for path in Path(folder).glob(".*.partial*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_dead_stages(out: Path) -> None:
    """Staging folders for ``out`` whose process is gone (killed before it could clean up)."""
    prefix, suffix = f".{out.name}.", ".partial"
    for stage in out.parent.glob(f"{prefix}*{suffix}"):
        parts = stage.name[len(prefix) : -len(suffix)].split(".")  # <pid>.<random>, no dots
        if len(parts) != 2 or not parts[0].isdigit() or not stage.is_dir():
            continue  # another output's (".a.1.<pid>.<random>.partial" is a.1's, not a's)
        if not _running(int(parts[0])):
            shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; on success it becomes ``out``.

    ``out`` must not exist or be empty, so that nothing of a user's is ever replaced. On failure
    the staging folder is removed and ``out`` is untouched. The staging folder's name holds the
    process id, so that a later run can tell a killed run's leftovers from a live one's.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder is not empty: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_stages(out)
    stage = Path(
        tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".partial")
    )
    try:
        yield stage
        if out.exists():
            out.rmdir()
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
