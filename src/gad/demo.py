"""`gad demo`: the quick start, every stage of the product on real models in minutes.

A built-in local teacher answers bundled prompts; the student is trained on those answers with
SeqKD and with GAD (warmup + GAD stage); the untouched student and both trained students answer
held-out prompts; the answers are scored with the judge-free and lab metrics; `gad report` writes
the Markdown report and plots. Each stage's wall time is printed and kept in the report, which
states the budget: a run this short is a smoke test of the pipeline, not a result.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gad.config import load as cfg

console = Console()

# The metrics shown in the terminal, with short headers (the report has them all, with CIs).
SHOWN = {
    "rouge_l": "ROUGE-L",
    "ngram_f1_1": "unigram F1",
    "teacher_logprob": "teacher logp/token",
    # Per answer beside per token: a per-token KL falls when answers merely get longer.
    "reverse_kl": "reverse KL/answer",
    "reverse_kl_per_token": "reverse KL/token",
    "length_mean": "length",
}


def bundled_prompts() -> Path:
    """The prompt file shipped with gad (40 everyday prompts written for it, CC0)."""
    return Path(str(importlib.resources.files("gad") / "assets" / "prompts.jsonl"))


class StageClock:
    """Wall time per stage, printed as each stage ends."""

    def __init__(self, total: int) -> None:
        self.seconds: dict[str, float] = {}
        self.total = total

    @contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        console.rule(f"{len(self.seconds) + 1}/{self.total} {name}: {what}")
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started
        console.print(f"[green]{name} done in {self.seconds[name]:.0f} s[/]")


def split_prompts(config: cfg.DemoConfig, out: Path) -> tuple[Path, Path, Path]:
    """All demo prompts, the train part and the held-out part, as files in `out`."""
    from gad.data import chats

    source = config.prompts or str(bundled_prompts())
    records = chats.read_records(source).records
    wanted = config.num_train + config.num_held_out
    if len(records) < wanted:
        raise cfg.ConfigError(
            f"{source} has {len(records)} prompts; the demo needs num_train + num_held_out = "
            f"{wanted}"
        )
    prompts = [chats.Record(r.id, r.prompt, r.meta) for r in records[:wanted]]
    paths = out / "prompts.jsonl", out / "train_prompts.jsonl", out / "held_out_prompts.jsonl"
    chats.write_records(paths[0], prompts)
    chats.write_records(paths[1], prompts[: config.num_train])
    chats.write_records(paths[2], prompts[config.num_train :])
    return paths


def _split_answers(teacher_file: Path, held_out: Path, out: Path) -> tuple[Path, Path]:
    """The teacher's answers divided into the training data and the held-out references."""
    from gad.data import chats

    held_ids = {r.id for r in chats.read_records(held_out).records}
    answers = chats.read_records(teacher_file).records
    train_path, ref_path = out / "teacher_train.jsonl", out / "teacher_held_out.jsonl"
    chats.write_records(train_path, [r for r in answers if r.id not in held_ids])
    chats.write_records(ref_path, [r for r in answers if r.id in held_ids])
    return train_path, ref_path


def budget_text(config: cfg.DemoConfig, seconds: dict[str, float], teacher: str) -> str:
    """The report's preface: what was run, how long each stage took, and what it is worth."""
    rows = "\n".join(f"| {name} | {s:.0f} |" for name, s in seconds.items())
    gad_prompts = config.gad_steps * config.batch_prompts
    return (
        "**This is a smoke test of the pipeline, not a result.** The budget was sized to finish "
        "in about 20 minutes on a 2-core CPU: "
        f"teacher `{teacher}` answered {config.num_train} training and {config.num_held_out} "
        f"held-out prompts (at most {config.max_response_tokens} tokens each); SeqKD ran "
        f"{config.sft_epochs} epoch(s) at lr {config.lr:g}; GAD ran a one-epoch warmup at lr "
        f"{config.lr:g} then {config.gad_steps} GRPO steps ({gad_prompts} prompts x "
        f"{config.n_samples} samples) at lr {config.gad_lr:g}. With {config.num_held_out} "
        "held-out prompts the confidence intervals are wide; differences between the systems "
        "here say nothing about the methods. See docs/benchmarks.md for measured comparisons.\n\n"
        "| stage | seconds |\n|---|---|\n" + rows + "\n"
    )


def _training_configs(
    config: cfg.DemoConfig, train_data: Path, held_out: Path, student_model: str, out: Path
) -> tuple[cfg.SFTConfig, cfg.GADConfig]:
    """The SeqKD baseline's and GAD's configs: the same data, student, budget and seed."""
    shared = dict(
        data=str(train_data),
        model=student_model,
        lr=config.lr,
        max_response_tokens=config.max_response_tokens,
        seed=config.seed,
        mixed_precision=config.mixed_precision,
        save_every=0,
        save_state=False,
        exclude=str(held_out),
    )
    sft_config = cfg.SFTConfig(
        **shared,
        output_dir=str(out / "seqkd"),
        epochs=config.sft_epochs,
        micro_batch_size=config.batch_prompts,
    )
    gad_config = cfg.GADConfig(
        **shared,
        output_dir=str(out / "gad"),
        warmup_epochs=1.0,
        warmup_d_only_steps=1,
        batch_prompts=config.batch_prompts,
        n_samples=config.n_samples,
        micro_batch_size=8,
        d_lr=config.gad_lr,
    )
    return sft_config, gad_config


def _generate_and_evaluate(
    config: cfg.DemoConfig,
    clock: StageClock,
    systems: dict[str, str],
    held_out: Path,
    references: Path,
    teacher_model: str,
) -> list[dict[str, Any]]:
    """Each system answers the held-out prompts; each is scored against the teacher."""
    from gad.api import teacher
    from gad.data import evalsets
    from gad.eval import run as eval_run

    out = Path(config.output_dir)
    answers: dict[str, Path] = {}
    with clock("generate", f"each system answers the {config.num_held_out} held-out prompts"):
        for name, model in systems.items():
            answers[name] = out / "answers" / f"{name}.jsonl"
            job = evalsets.generation_job(
                cfg.GenerateConfig(
                    model=model,
                    prompts=str(held_out),
                    output=str(answers[name]),
                    max_response_tokens=config.max_response_tokens,
                    seed=config.seed,
                )
            )
            teacher.collect(job, progress=False)

    results = []
    with clock("eval", "judge-free metrics vs the teacher, and the lab metrics"):
        for name, model in systems.items():
            results.append(
                eval_run.run_eval(
                    cfg.EvalConfig(
                        answers=str(answers[name]),
                        name=name,
                        reference=str(references),
                        teacher_model=teacher_model,
                        student_model=model,
                        seed=config.seed,
                    )
                )
            )

    return results


def run(config: cfg.DemoConfig) -> dict[str, Any]:
    """Run every stage; returns the stage times, the result files and the report's path."""
    from gad.api import teacher
    from gad.eval import report
    from gad.methods import stage as gad_stage
    from gad.models import store
    from gad.train import sft

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(config, out / "config.yaml")
    started = time.perf_counter()
    clock = StageClock(total=7)
    teacher_model, student_model = config.teacher, config.student

    with clock("models", "build or convert the built-in models (once, cached)"):
        if config.tiny:
            teacher_model = str(store.build_tiny(out / "tiny-teacher", seed=1))
            student_model = str(store.build_tiny(out / "tiny-student", seed=2))
        else:
            store.resolve(teacher_model)
            store.resolve(student_model)
    all_prompts, _, held_out = split_prompts(config, out)

    with clock("teacher", f"{teacher_model} answers {config.num_train + config.num_held_out}"):
        teacher_file = out / "teacher.jsonl"
        teacher.collect(
            cfg.CollectConfig(
                prompts=str(all_prompts),
                output=str(teacher_file),
                backend="local",
                model=teacher_model,
                max_response_tokens=config.max_response_tokens,
                generation_batch_size=32,
                seed=config.seed,
            )
        )
        train_data, references = _split_answers(teacher_file, held_out, out)

    sft_config, gad_config = _training_configs(config, train_data, held_out, student_model, out)
    with clock("seqkd", f"{student_model} fine-tuned on the teacher's answers"):
        seqkd_final = sft.train(sft_config)
    with clock("gad", f"warmup, then {config.gad_steps} GRPO steps against the discriminator"):
        gad_stage.train(dataclasses.replace(gad_config, stage="warmup"))
        gad_final = gad_stage.train(
            dataclasses.replace(
                gad_config, stage="gad", lr=config.gad_lr, max_steps=config.gad_steps
            )
        )

    systems = {"student": student_model, "seqkd": str(seqkd_final), "gad": str(gad_final)}
    results = _generate_and_evaluate(config, clock, systems, held_out, references, teacher_model)

    with clock("report", "Markdown report and plots"):
        report_path = report.write_report(
            [out / "seqkd", out / "gad"],
            [r["output"] for r in results],
            out / "report",
            title="gad demo",
            preface=budget_text(config, clock.seconds, teacher_model),
        )

    total = time.perf_counter() - started
    _print_summary(results, clock.seconds, total)
    console.print(f"report: [bold]{report_path}[/]")
    summary = {
        "seconds": clock.seconds,
        "total_seconds": total,
        "results": [r["output"] for r in results],
        "report": str(report_path),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _print_summary(results: list[dict[str, Any]], seconds: dict[str, float], total: float) -> None:
    times = Table(title="wall time per stage")
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for name, s in seconds.items():
        times.add_row(name, f"{s:.0f}")
    times.add_row("[bold]total[/]", f"[bold]{total:.0f}[/]")
    console.print(times)
    table = Table(title="held-out comparison: means (a smoke test of the pipeline, not a result)")
    table.add_column("system")
    for header in SHOWN.values():
        table.add_column(header, justify="right")
    for result in results:
        metrics = result["metrics"]
        cells = [_mean(metrics.get(key)) for key in SHOWN]
        table.add_row(result["name"], *cells)
    console.print(table)


def _mean(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("mean")
    return "n/a" if value is None else f"{value:.3g}"
