"""What the central training loops share: starting or resuming a run folder, and the step loop
with its metrics window, checkpoint cadence and per-step seeding.

Resuming from step ``s`` gives the run an uninterrupted one would have had: model and optimiser
state come from the checkpoint, the batch of every step is a function of the step
(:class:`lsdm.data.StepBatchSampler`), and torch's random state is re-seeded at every step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsdm.config import LSDMConfig
from lsdm.errors import InputError
from lsdm.run_folder import RunFolder

StepCallback = Callable[[int, int, dict[str, float]], None]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def begin_run(
    out: Path, config: LSDMConfig, labels: dict[int, str], resume: bool, steps_field: str
) -> tuple[RunFolder, LSDMConfig]:
    """Check ``out`` suits a new (or resumed) run and record its configuration.

    A resumed run keeps the configuration it started with, except for its total steps
    (``config.train.<steps_field>``), which the caller may raise.
    """
    run = RunFolder(out)
    run.check_can_start(resume)
    if resume:
        saved, saved_labels = run.read_config()
        if saved_labels != labels:
            raise InputError(f"cohort vocabulary {labels} differs from the run's {saved_labels}")
        config = saved.with_overrides(train={steps_field: getattr(config.train, steps_field)})
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_config(config, labels)
    return run, config


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def run_steps(
    run: RunFolder,
    config: LSDMConfig,
    start: int,
    steps: int,
    batches: Iterable[Any],
    step_fn: Callable[[int, Any], dict[str, float]],
    save: Callable[[int], None],
    volumes_per_batch: int,
    on_step: StepCallback | None = None,
) -> None:
    """Run ``step_fn(step, batch)`` for steps ``start .. steps-1``; log the mean losses of every
    ``log_every`` steps (with throughput) to the run's metrics, and ``save(done)`` every
    ``checkpoint_every`` steps and at the end."""
    window: list[dict[str, float]] = []
    window_start = time.perf_counter()
    for step, batch in zip(range(start, steps), batches, strict=True):
        torch.manual_seed(step_seed(config.train.seed, step))
        losses = step_fn(step, batch)
        diverged = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if diverged:  # nothing after this step is saved: the last checkpoint stays resumable
            name, value = next(iter(diverged.items()))
            raise InputError(
                f"training diverged at step {step + 1}: {name} is {value}; lower the learning "
                f"rate or check the cohort ({run.root})"
            )
        window.append(losses)
        done = step + 1
        if done % config.train.log_every == 0 or done == steps:
            elapsed = time.perf_counter() - window_start
            means = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
            rate = len(window) * volumes_per_batch / elapsed
            run.log({"step": done, **means, "volumes_per_s": rate})
            window, window_start = [], time.perf_counter()
        if done % config.train.checkpoint_every == 0 or done == steps:
            save(done)
        if on_step is not None:
            on_step(done, steps, losses)
