"""The one run loop of every training stage (SFT, reward model, the GAD warmup and GAD stage,
SODA): steps from where a resumed run left off to the planned total, each logged, shown and
checked, with periodic and final checkpoints. A stage gives it only its step and its hooks
(save, and a check of each step's row); what a step computes is the stage's own business.

It also makes the stage's accelerator (`make_accelerator`: processes, precision, trackers).

A resumed stage restores its own state (models, optimizers, random streams) before the loop
starts at `start_step`; saving at the same steps as an uninterrupted run is what makes the two
match bit for bit.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console

from gad.config import load as cfg
from gad.config.load import UserError
from gad.core import checkpoint
from gad.core.progress import Bar
from gad.core.tracking import MetricsLog, PhaseTimer
from gad.models import precision

console = Console(stderr=True)
C = TypeVar("C")


def start(config: C, run_dir: Path, config_file: Path) -> tuple[C, Any]:
    """A stage's run begins: its folder writable, its precision resolved (`auto` says what it
    chose and why), its accelerator made, and the resolved config written (main process)."""
    checkpoint.check_writable(run_dir)
    config, choice = precision.apply(config)
    accelerator = make_accelerator(config.mixed_precision, config.report_to, run_dir)
    if accelerator.is_main_process:
        cfg.save(config, config_file, {"mixed_precision": choice.reason})
    return config, accelerator


def resume_point(run_dir: Path, resume: bool) -> Path | None:
    """The latest checkpoint of `run_dir` when resuming, else None (said when there is none)."""
    found = checkpoint.latest(run_dir) if resume else None
    if resume and found is None:
        console.print(f"no checkpoint yet in {run_dir}: starting fresh")
    return found


def restore(resume_from: Path | None, name: str, **load: Any) -> dict[str, Any]:
    """The state saved in `resume_from`, its optimizers (`load`, as `checkpoint.load_state`
    takes them) and random streams restored; `{"step": 0}` for a fresh start."""
    if resume_from is None:
        return {"step": 0}
    state = checkpoint.load_state(resume_from, **load)
    console.print(f"{name}: resuming from {resume_from} at step {state['step']}")
    return state


@dataclass(frozen=True)
class Loop:
    """How a stage's steps run, logged and saved."""

    name: str
    """The progress bar's label."""
    total: int
    """The planned steps; the loop stops after step `total`."""
    start_step: int
    """Steps already done (a resumed run's checkpoint step; 0 when fresh)."""
    metrics: MetricsLog
    show: tuple[str, ...]
    """The stats the progress bar shows."""
    enabled: bool
    """This process shows the progress (the main process)."""
    save: Callable[[int, bool], Path]
    """Writes a checkpoint at a step; `final` is True for the one after the last step."""
    save_every: int
    """A checkpoint every this many steps (0: none) before the last."""
    save_final: bool
    """Write a checkpoint after the last step."""
    log_every: int = 1
    """Log every this many steps (and the last)."""
    step_time: str | None = None
    """The metric that gets each step's wall time (None: the step reports its own)."""
    check: Callable[[int, dict[str, Any]], None] | None = None
    """Reads each finished step's row before it is logged (health checks); may add to it, or
    save and raise to stop the run."""


def shown(row: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The latest values of a few stats, for the progress bar (`g/loss 0.123  d/acc 0.5`)."""
    return "  ".join(
        f"{k.split('/')[-1]} {row[k]:.3g}" for k in keys if isinstance(row.get(k), int | float)
    )


def run(loop: Loop, step_fn: Callable[[int, PhaseTimer], dict[str, Any]]) -> dict[str, Any]:
    """Steps `start_step` .. `total - 1`; `step_fn(step, timer)` returns the step's row (the
    timer's phases are added to it). Returns the last step's row ({} when none ran)."""
    row: dict[str, Any] = {}
    bar = Bar(loop.name, loop.total, "steps", loop.enabled, start=loop.start_step)
    try:
        for step in range(loop.start_step, loop.total):
            t0 = time.perf_counter()
            timer = PhaseTimer()
            row = step_fn(step, timer)
            row.update(timer.as_metrics())
            if loop.step_time:
                row[loop.step_time] = time.perf_counter() - t0
            done = step + 1
            if loop.check is not None:
                loop.check(done, row)
            if done % loop.log_every == 0 or done == loop.total:
                loop.metrics.log(done, row)
            bar.update(done, shown(row, loop.show))
            if loop.save_every and done % loop.save_every == 0 and done < loop.total:
                loop.save(done, False)
    finally:
        bar.close()
    if loop.save_final:
        loop.save(loop.total, True)
    return row


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The module each `report_to` tracker needs (an optional extra of gad)."""


def make_accelerator(mixed_precision: str, report_to: str, run_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    module = TRACKER_PACKAGES.get(report_to)
    if module is not None and importlib.util.find_spec(module) is None:
        raise UserError(
            f"report_to={report_to} needs the {module} package: pip install 'gad[{report_to}]'"
        )

    # accelerate keeps one process-wide state; a second stage in the same process (the demo,
    # a notebook) may ask for another precision. The distributed group itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)

    # Without an accelerator device, accelerate only forms a multi-process (gloo) group when
    # told it runs on CPU; torchrun's environment alone leaves each process on its own.
    has_device = torch.cuda.is_available() or (
        hasattr(torch, "accelerator") and torch.accelerator.is_available()
    )
    return Accelerator(
        cpu=not has_device,
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_dir=str(run_dir),
    )
