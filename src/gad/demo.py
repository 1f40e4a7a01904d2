"""`gad demo`: the quick start. A built-in local teacher answers bundled prompts, and the
student is fine-tuned on those answers (SeqKD). Offline, minutes on a CPU; a smoke test of the
pipeline, not a result.
"""

from __future__ import annotations

import importlib.resources
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gad import config as cfg

console = Console()


def bundled_prompts() -> Path:
    """The prompt file shipped with gad (40 everyday prompts written for it, CC0)."""
    return Path(str(importlib.resources.files("gad") / "assets" / "prompts.jsonl"))


def run(config: cfg.DemoConfig) -> dict[str, float]:
    from gad import models, sft, teacher

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(config, out / "config.yaml")
    teacher_model, student_model = config.teacher, config.student
    if config.tiny:
        teacher_model = str(models.build_tiny(out / "tiny-teacher", seed=1))
        student_model = str(models.build_tiny(out / "tiny-student", seed=2))
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    collect_config = cfg.CollectConfig(
        prompts=config.prompts or str(bundled_prompts()),
        output=str(out / "teacher.jsonl"),
        backend="local",
        model=teacher_model,
        max_tokens=config.max_tokens,
        limit=config.num_prompts,
    )
    console.rule(f"1/2 teacher {teacher_model} answers {config.num_prompts} prompts")
    teacher.collect(collect_config)
    seconds["collect"] = time.perf_counter() - started

    started = time.perf_counter()
    console.rule(f"2/2 SeqKD: {student_model} fine-tuned on the teacher's answers")
    sft_config = cfg.SFTConfig(
        data=collect_config.output,
        model=student_model,
        output_dir=str(out / "seqkd"),
        epochs=config.sft_epochs,
        lr=config.lr,
        batch_size=4,
        save_every=0,
        resume=True,
    )
    final = sft.train(sft_config)
    seconds["sft"] = time.perf_counter() - started

    table = Table(title="gad demo (a smoke test of the pipeline, not a result)")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("output")
    table.add_row("collect", f"{seconds['collect']:.1f}", collect_config.output)
    table.add_row("seqkd", f"{seconds['sft']:.1f}", str(final))
    console.print(table)
    return seconds
