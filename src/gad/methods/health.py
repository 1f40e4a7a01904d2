"""The warnings a user needs to trust a GAD run, and the counters behind them.

Read from each step's logged row: a non-finite loss or gradient (the update was skipped; many
in a row stop the run), a discriminator that wins for too long (with the shortcut it most
likely uses, from the step's construction signals), and a response length that runs away from
its post-warmup value (reward hacking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from gad.config import load as cfg

console = Console(stderr=True)


@dataclass
class Health:
    """Counters behind the warnings; saved in checkpoints so a resume keeps them."""

    bad_steps: int = 0
    skipped_steps: int = 0
    acc_streak: int = 0
    base_length: float | None = None
    warned: list[str] = field(default_factory=list)


def likely_shortcut(row: dict[str, Any]) -> str:
    """What most likely lets the discriminator win, read from one step's signals."""
    teacher_cut = row.get("signals/teacher_cut_share", 0.0)
    student_cut = row.get("response/truncated_share", 0.0)
    acc_finished, acc_cut = row.get("d/accuracy_finished"), row.get("d/accuracy_cut")
    if abs(teacher_cut - student_cut) > 0.2:
        return (
            f"likely the length limit: {teacher_cut:.0%} of teacher answers and "
            f"{student_cut:.0%} of student samples are cut off (accuracy {acc_finished:.2f} on "
            f"finished samples, {acc_cut:.2f} on cut ones); raise max_response_tokens"
        )
    if row.get("signals/noncanonical_share", 0.0) > 0.5:
        return (
            f"{row['signals/noncanonical_share']:.0%} of samples are non-canonical tokenisations "
            "of their text; the discriminator sees re-encoded text, so this is the student's "
            "sampling (temperature?), not the encoding"
        )
    return (
        "no construction shortcut in sight (cut-off shares match, text re-encoded): the "
        "student is far from the teacher; a longer warmup or a lower d_lr may help"
    )


def check(
    h: Health,
    c: cfg.GADConfig,
    stage_name: str,
    d_learns: bool,
    step: int,
    row: dict[str, Any],
) -> list[str]:
    """Update the counters from one step's row and return (and print) its warnings. A run
    stops when `h.bad_steps` reaches `max_bad_steps` (the runner checks, after saving)."""
    warnings = []
    if not finite(row):
        h.bad_steps += 1
        h.skipped_steps += 1
        warnings.append(f"non-finite loss or gradient at step {step}: update skipped")
    else:
        h.bad_steps = 0
    acc = row.get("d/accuracy")
    if acc is not None and d_learns:
        h.acc_streak = h.acc_streak + 1 if acc > c.d_acc_warn else 0
        if h.acc_streak == c.d_acc_warn_steps:
            warnings.append(
                f"discriminator accuracy above {c.d_acc_warn} for {c.d_acc_warn_steps} steps: "
                + likely_shortcut(row)
            )
    length = row.get("response/length_mean")
    if length is not None and stage_name == "gad":
        if h.base_length is None:
            h.base_length = length
        elif length > c.length_warn_ratio * h.base_length and "length" not in h.warned:
            h.warned.append("length")
            warnings.append(
                f"mean response length {length:.0f} exceeds {c.length_warn_ratio}x its "
                f"post-warmup value {h.base_length:.0f}: possible reward hacking"
            )
    for w in warnings:
        console.print(f"[yellow]warning (step {step}): {w}[/]")
    return warnings


def finite(row: dict[str, Any]) -> bool:
    """No loss and no gradient norm of the row is NaN or infinite."""
    losses_ok = all(
        math.isfinite(v) for k, v in row.items() if isinstance(v, float) and "loss" in k
    )
    return losses_ok and all(math.isfinite(v) for k, v in row.items() if k.endswith("grad_norm"))
