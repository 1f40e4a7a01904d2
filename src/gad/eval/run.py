"""`gad eval`: one system's answers measured, reporting only what was measured.

Answers are matched to the reference answers by prompt id (`meta.prompt_id`, else the record
id, on both sides); how many of either side found no partner is printed and saved, and no match
at all is an error, not a table of `n/a`. Lengths are counted with the student's tokenizer
(`student_model`), else the teacher's (`teacher_model`), else in whitespace-separated words, and
the result names the unit: a count from a record's metadata would mix units between records
written by different tools, and records from another tool carry none. A metric a pair cannot
have (an n-gram F1 for n above either side's word count) is left out of its mean, and every mean
carries the number of records behind it (`n`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gad.config.load import ConfigError, EvalConfig, UserError
from gad.data import chats
from gad.eval.evaluate import (
    bootstrap_ci,
    compare_to_teacher,
    length_stats,
    reverse_kl_estimate,
    teacher_logprob,
)


class EvalError(UserError):
    """The answers cannot be evaluated as asked (nothing to evaluate, no answer matches)."""


def _with_ci(values: list[float], reps: int, seed: int) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean, low, high = bootstrap_ci(values, reps=reps, seed=seed)
    return {"mean": mean, "low": low, "high": high, "n": len(values)}


def _records(path: str, setting: str) -> list[chats.Record]:
    records = chats.read_records(path).records
    if not records:
        raise EvalError(f"{setting}: {path} holds no chat records")
    return records


def length_counter(config: EvalConfig) -> tuple[str, Callable[[str], int]]:
    """(unit, text -> length): the student's tokenizer, else the teacher's, else words."""
    model = config.student_model or config.teacher_model
    if not model:
        return "words", lambda text: len(text.split())
    from gad.models import store

    tokenizer = store.load_tokenizer(model)
    whose = "student" if config.student_model else "teacher"

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return f"tokens ({whose} tokenizer: {model})", tokens


def _lengths(answers: list[chats.Record], count: Callable[[str], int], config: Any) -> dict:
    answered = [a for a in answers if a.response is not None]
    lengths = [float(count(a.response or "")) for a in answered]
    stats = length_stats([int(x) for x in lengths], [False] * len(lengths))
    # Only a record that says how it ended can count as cut or not.
    said = [a.meta["finish_reason"] == "length" for a in answered if "finish_reason" in a.meta]
    return {
        "length_mean": _with_ci(lengths, config.bootstrap_reps, config.seed),
        "length_median": stats["median"],
        "length_p95": stats["p95"],
        "truncated_share": {"mean": sum(said) / len(said) if said else None, "n": len(said)},
    }


def _against_reference(
    answers: list[chats.Record], config: EvalConfig, metrics: dict[str, Any]
) -> dict[str, Any]:
    assert config.reference is not None
    references = _records(config.reference, "reference")
    try:
        summary = compare_to_teacher(answers, references)
    except ValueError as err:
        raise EvalError(f"reference: {config.reference}: {err}") from err
    answered_refs = len(references) - len(summary["unmatched_teacher"])
    if answered_refs == 0:
        raise EvalError(
            f"no answer in {config.answers} matches a reference in {config.reference} by id "
            f"(meta.prompt_id, else the record id): answer ids e.g. {answers[0].id!r}, "
            f"reference ids e.g. {references[0].id!r}"
        )
    metrics["rouge_l"] = _with_ci(summary["rouge_l_values"], config.bootstrap_reps, config.seed)
    for n, values in summary["ngram_f1_values"].items():
        metrics[f"ngram_f1_{n}"] = _with_ci(values, config.bootstrap_reps, config.seed)
    return {
        "matched": summary["matched"],
        "unmatched_answers": len(summary["unmatched_student"]),
        "unmatched_references": len(summary["unmatched_teacher"]),
        "unmatched_answer_ids": summary["unmatched_student"],
        "unmatched_reference_ids": summary["unmatched_teacher"],
        "no_response": summary["no_response"],
    }


def _accuracy(answers: list[chats.Record], config: EvalConfig, metrics: dict[str, Any]) -> dict:
    from gad.data import answers as extract

    if not config.ground_truth:
        raise ConfigError("metric 'accuracy' needs 'ground_truth' (a truth file)")
    scored = extract.accuracy(
        answers, extract.read_truth(config.ground_truth), extract.EXTRACTORS[config.extractor]
    )
    metrics["accuracy"] = _with_ci(scored["values"], config.bootstrap_reps, config.seed)
    metrics["answered_share"] = scored["answered"] / len(answers) if answers else None
    return {"no_truth": len(scored["no_truth"])}


def _lab(answers: list[chats.Record], config: EvalConfig, metrics: dict[str, Any]) -> None:
    """The teacher's log-likelihood of the answers, and with the student a reverse-KL estimate."""
    from gad.models import store

    assert config.teacher_model is not None
    teacher_model, teacher_tok = store.load(config.teacher_model)
    scored = [a for a in answers if a.response is not None]
    prompts = [a.prompt for a in scored]
    responses = [a.response or "" for a in scored]
    finished = [chats.record_finished(a) for a in scored]
    values = teacher_logprob(teacher_model, teacher_tok, prompts, responses, finished=finished)
    metrics["teacher_logprob"] = _with_ci(values, config.bootstrap_reps, config.seed)
    if not config.student_model or not scored:
        return
    student_model, student_tok = store.load(config.student_model)
    kl = reverse_kl_estimate(
        student_model,
        student_tok,
        teacher_model,
        teacher_tok,
        prompts,
        responses,
        finished=finished,
    )
    metrics["reverse_kl"] = {
        "mean": kl["mean"],
        "low": kl["mean"] - 1.96 * kl["stderr"],
        "high": kl["mean"] + 1.96 * kl["stderr"],
        "n": kl["n"],
    }
    metrics["reverse_kl_per_token"] = kl["per_token"]


def output_path(config: EvalConfig) -> Path:
    """Where the result goes: `output`, else `<answers>.eval.json`."""
    return Path(config.output or str(Path(config.answers).with_suffix("")) + ".eval.json")


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Metrics of one system's answers, written as a result JSON that `gad report` tabulates.
    Every value that averages over records carries its count and a 95% bootstrap CI."""
    answers = _records(config.answers, "answers")
    unit, count = length_counter(config)
    metrics: dict[str, Any] = _lengths(answers, count, config)
    notes: dict[str, Any] = {"length_unit": unit}
    if config.metric == "accuracy":
        notes |= _accuracy(answers, config, metrics)
    if config.reference:
        notes |= _against_reference(answers, config, metrics)
    if config.teacher_model:
        _lab(answers, config, metrics)
    result = {
        "name": config.name or Path(config.answers).stem,
        "answers": config.answers,
        "reference": config.reference,
        "records": len(answers),
        "metrics": metrics,
        **notes,
    }
    output = output_path(config)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    result["output"] = str(output)
    return result
