"""What a `gad label` run produced: its counts (labelled, set aside and why, missing), how
accurate its pseudo-labels and labels are against ground truth (read only after labelling),
and the table it prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gad.data import chats
from gad.data.answers import Extractor, Vote, accuracy, truth_key


@dataclass
class LabelSummary:
    """What a `gad label` run produced; also written as `<output_dir>/summary.json`."""

    output: str
    """The labelled records file."""
    task: str
    """`verifiable` or `open`."""
    prompts: int = 0
    """Prompts of the input (after `limit`)."""
    labelled_prompts: int = 0
    """Prompts with at least one labelled response."""
    set_aside_prompts: int = 0
    """Prompts set aside, all reasons (verifiable: no pseudo-label; open: no labelled response)."""
    set_aside_no_answer: int = 0
    """Verifiable: no teacher sample had an extractable answer."""
    set_aside_tie: int = 0
    """Verifiable: two or more answers shared the top vote count."""
    set_aside_low_share: int = 0
    """Verifiable: the top answer's vote share was below `min_vote_share`."""
    judge_failed: int = 0
    """Open: responses whose verdict failed or could not be had (set aside one by one)."""
    missing_responses: int = 0
    """Responses that collection did not produce (still failing; rerun to retry)."""
    teacher_responses: int = 0
    """Labelled teacher responses."""
    student_responses: int = 0
    """Labelled student responses."""
    good_teacher: int = 0
    """Labelled teacher responses with good = true (the SFT warmup's data)."""
    good_student: int = 0
    """Labelled student responses with good = true."""
    mean_vote_share: float | None = None
    """Verifiable: mean vote share of the kept prompts."""
    mean_label: float | None = None
    """Mean label of the labelled responses (share correct, or mean judge score)."""
    pseudo_label_accuracy: float | None = None
    """With ground truth: share of kept prompts whose pseudo-label equals the truth."""
    label_accuracy: float | None = None
    """With ground truth: share of labelled responses whose correct/incorrect label agrees with
    their correctness against the truth."""
    teacher_truth_accuracy: float | None = None
    """With ground truth: share of all teacher samples (kept or not) that are right."""
    student_truth_accuracy: float | None = None
    """With ground truth: share of all student samples that are right."""
    truth_missing: int = 0
    """With ground truth: prompts without a truth entry (not in the accuracies)."""
    seconds: float = 0.0
    """Wall time of the run, collection included."""
    set_aside_file: str = ""
    """Where the set-aside prompts and responses are listed, with their reasons."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Collection summaries of the teacher and student runs."""


def truth_report(
    summary: LabelSummary,
    truth: dict[str, str],
    extractor: Extractor,
    votes: dict[str, Vote],
    labelled: list[chats.Record],
    teacher_groups: dict[str, list[chats.Record]],
    student_groups: dict[str, list[chats.Record]],
) -> None:
    """Fill the ground-truth accuracies of `summary` (read only after labelling)."""
    summary.truth_missing = sum(pid not in truth for pid in votes)
    keys = {pid: truth_key(extractor, answer) for pid, answer in truth.items()}
    kept = [(pid, v) for pid, v in votes.items() if v.status == "ok" and pid in keys]
    if kept:
        summary.pseudo_label_accuracy = sum(v.label == keys[pid] for pid, v in kept) / len(kept)
    judged = [r for r in labelled if r.meta["prompt_id"] in keys]
    if judged:
        agree = sum(
            r.meta["good"] == (r.meta["extracted"] == keys[r.meta["prompt_id"]]) for r in judged
        )
        summary.label_accuracy = agree / len(judged)
    for name, groups in (("teacher", teacher_groups), ("student", student_groups)):
        records = [r for pid, group in groups.items() if pid in keys for r in group]
        if records:
            result = accuracy(records, truth, extractor)
            value = sum(result["values"]) / len(result["values"])
            setattr(summary, f"{name}_truth_accuracy", value)


def count_labels(summary: LabelSummary, labelled: list[chats.Record]) -> None:
    """Fill the label counts of `summary` (`prompts` already set)."""
    labelled_ids = {r.meta["prompt_id"] for r in labelled}
    summary.labelled_prompts = len(labelled_ids)
    summary.set_aside_prompts = summary.prompts - len(labelled_ids)
    summary.teacher_responses = sum(r.meta["source"] == "teacher" for r in labelled)
    summary.student_responses = len(labelled) - summary.teacher_responses
    summary.good_teacher = sum(r.meta["good"] and r.meta["source"] == "teacher" for r in labelled)
    summary.good_student = sum(r.meta["good"] and r.meta["source"] == "student" for r in labelled)
    if labelled:
        summary.mean_label = sum(r.meta["label"] for r in labelled) / len(labelled)


def print_summary(summary: LabelSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    table = Table(title=f"label ({summary.task}) -> {summary.output}", show_header=False)
    rows: list[tuple[str, Any]] = [
        ("prompts", summary.prompts),
        ("labelled prompts", summary.labelled_prompts),
        ("set-aside prompts", summary.set_aside_prompts),
    ]
    if summary.task == "verifiable":
        rows += [
            ("  no teacher answer", summary.set_aside_no_answer),
            ("  tie", summary.set_aside_tie),
            ("  vote share too low", summary.set_aside_low_share),
            ("mean vote share (kept)", pct(summary.mean_vote_share)),
        ]
    else:
        rows.append(("responses whose verdict failed", summary.judge_failed))
    rows += [
        (
            "labelled teacher / student responses",
            "/".join(str(x) for x in (summary.teacher_responses, summary.student_responses)),
        ),
        (
            "good teacher / student responses",
            "/".join(str(x) for x in (summary.good_teacher, summary.good_student)),
        ),
        ("missing responses (collection failed)", summary.missing_responses),
    ]
    if summary.pseudo_label_accuracy is not None or summary.truth_missing:
        rows += [
            ("pseudo-label accuracy (ground truth)", pct(summary.pseudo_label_accuracy)),
            ("label accuracy (ground truth)", pct(summary.label_accuracy)),
            ("teacher samples right", pct(summary.teacher_truth_accuracy)),
            ("student samples right", pct(summary.student_truth_accuracy)),
            ("prompts without ground truth", summary.truth_missing),
        ]
    rows.append(("seconds", f"{summary.seconds:.1f}"))
    for name, value in rows:
        table.add_row(name, str(value))
    console = Console()
    console.print(table)
    if summary.set_aside_prompts or summary.judge_failed:
        console.print(f"[yellow]set-aside prompts/responses are listed in {summary.set_aside_file}")
    if summary.missing_responses:
        console.print("[yellow]some responses could not be collected; rerun to retry them")
