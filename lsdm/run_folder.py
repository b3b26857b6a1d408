"""A training run's output folder: its configuration, latest checkpoint and metrics log.

    <out>/config.json          the run's LSDMConfig and the cohort's label vocabulary
    <out>/checkpoint.safetensors
    <out>/metrics.jsonl        one JSON object per logged step

A folder holds one run. Starting a run in a folder that already has one is refused (``--resume``
continues it instead), so no finished work is ever overwritten by accident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lsdm.atomic import atomic_write_text
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

    def check_can_start(self, resume: bool) -> None:
        """Raise :class:`InputError` unless the folder suits a new run (or a resumed one)."""
        if resume:
            if not self.checkpoint_path.is_file():
                raise InputError(f"nothing to resume: no checkpoint in {self.root}")
        elif self.root.exists() and any(self.root.iterdir()):
            hint = " (use --resume to continue it)" if self.has_run() else ""
            raise InputError(f"output folder is not empty{hint}: {self.root}")

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
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def forget_metrics_after(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint a resumed run restarts from: they will be
        logged again, and a log must not hold two different values for one step."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
