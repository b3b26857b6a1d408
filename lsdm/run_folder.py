"""A training run's output folder: its configuration, latest checkpoint and metrics log.

    <out>/config.json          the run's LSDMConfig and the cohort's label vocabulary
    <out>/checkpoint.safetensors
    <out>/metrics.jsonl        one JSON object per logged step

A folder holds one run. Starting a run in a folder that already has one is refused (``--resume``
continues it instead), so no finished work is ever overwritten by accident. A run that stopped
before its first checkpoint left nothing to continue or to lose: a new run starts over in its
folder. The temporary files of a write that was killed are removed when a run starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lsdm.atomic import atomic_write_text, remove_partial_files
from lsdm.config import LSDMConfig
from lsdm.errors import InputError


class RunFolder:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.config_path = self.root / "config.json"
        self.checkpoint_path = self.root / "checkpoint.safetensors"
        self.metrics_path = self.root / "metrics.jsonl"

    def has_run(self) -> bool:
        return self.checkpoint_path.exists() or self.config_path.exists()

    def _never_checkpointed(self) -> bool:
        """A run's configuration (and log) but no checkpoint, and nothing else of anyone's."""
        if self.checkpoint_path.exists() or not self.config_path.is_file():
            return False
        own = {self.config_path.name, self.metrics_path.name}
        return all(
            p.name in own or (p.name.startswith(".") and ".partial" in p.name)
            for p in self.root.iterdir()
        )

    def check_can_start(self, resume: bool) -> None:
        """Raise :class:`InputError` unless the folder suits a new run (or a resumed one); clears
        what a run that stopped before its first checkpoint left, for a new run."""
        if resume:
            if not self.checkpoint_path.is_file():
                hint = (
                    " (the run stopped before its first checkpoint: start it again without "
                    "--resume)"
                    if self.config_path.is_file()
                    else ""
                )
                raise InputError(f"nothing to resume: no checkpoint in {self.root}{hint}")
        elif self.root.exists() and any(self.root.iterdir()):
            if self._never_checkpointed():
                for path in (self.config_path, self.metrics_path):
                    path.unlink(missing_ok=True)
            else:
                hint = " (use --resume to continue it)" if self.has_run() else ""
                raise InputError(f"output folder is not empty{hint}: {self.root}")
        if self.root.is_dir():
            remove_partial_files(self.root)

    def write_config(self, config: LSDMConfig, labels: dict[int, str]) -> None:
        document = {"config": config.model_dump(mode="json"), "labels": labels}
        atomic_write_text(self.config_path, json.dumps(document, indent=2))

    def read_config(self) -> tuple[LSDMConfig, dict[int, str]]:
        try:
            document = json.loads(self.config_path.read_text())
            labels = {int(k): v for k, v in document["labels"].items()}
            return LSDMConfig.model_validate(document["config"]), labels
        except (OSError, KeyError, ValueError) as err:
            raise InputError(f"unreadable run configuration {self.config_path}: {err}") from None

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line; a non-finite value is a bug of the caller (JSON has no NaN)."""
        line = json.dumps(record, allow_nan=False)
        with self.metrics_path.open("a") as f:
            f.write(line + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def forget_metrics_after(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint a resumed run restarts from: they will be
        logged again, and a log must not hold two different values for one step."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
