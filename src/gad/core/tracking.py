"""Run bookkeeping shared by every trainer: the metrics JSONL, trackers, and phase timers."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class PhaseTimer:
    """Wall seconds per named phase of a step (verl-style `with timer("rollout"):`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{phase}": round(s, 4) for phase, s in self.seconds.items()}


class MetricsLog:
    """Appends one JSON line per logged step to `metrics.jsonl` and forwards to trackers.

    On resume the lines past the resumed step are dropped: they belong to work that the
    checkpoint does not contain and that will be redone.
    """

    def __init__(self, run_dir: Path, accelerator: Any, *, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        if accelerator.is_main_process:
            if resume_step is None:
                self.path.write_text("")
            elif self.path.exists():
                kept = [
                    line
                    for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step
                ]
                self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numeric, step=step)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible rather than crash
    return value


def tracker_config(values: dict[str, Any]) -> dict[str, Any]:
    """A config for trackers: TensorBoard's hparams take only int, float, str and bool."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in values.items()}


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
