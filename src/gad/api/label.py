"""`gad label`: the teacher's judgement as labels (reward distillation, SPEC §4 steps 1-2).

For every prompt, `k` teacher samples (`teacher.collect` with `n=k`) and `k` student samples (the
same journaled collection with a local model, exactly as `gad generate` runs it) are gathered;
both are resumable. Then every response is labelled:

verifiable  an extractor (`number`, `choice`, `boxed`; `gad.answers`) reads each response's
            final answer. The majority vote over the teacher's extracted answers is the prompt's
            pseudo-label (`majority_vote`): its vote share is the top answer's count over ALL
            teacher samples of the prompt, abstentions (no extractable answer) included, so a
            teacher that rarely answers is not trusted. A prompt is set aside, with its reason,
            when no teacher sample has an answer (`no_answer`), when two or more answers share
            the top count (`tie`: the teacher is split, so no answer is preferred by an
            arbitrary rule), or when the top share is below `min_vote_share` (`low_share`).
            Each response of a kept prompt is correct (label 1) when its extracted answer equals
            the pseudo-label, else incorrect (label 0; a response without an answer is
            incorrect).
open        the teacher rates every response 1-10 through `gad.rating` (the judge's prompt,
            parser and cache, on the shared chat client): the judge writes a reference answer
            per prompt, then rates the response against it; the response's score is its label.
            A response whose verdict could not be had or parsed is set aside (`judge_failed`),
            per response.

The collections and the judge take their settings from this config (`collect_config`,
`generate_config`, `judge_config`): the shared parts they are composed of (`parts.values`), plus
the few set on purpose, each with its reason.

Output (`<output_dir>/labels.jsonl`): chat records, one per labelled response,

    {"id": "<prompt id>#t<k>" | "<prompt id>#s<k>", "messages": prompt + [response],
     "meta": {"prompt_id", "source": "teacher" | "student", "sample", "model", "finish_reason",
              "label": 1.0 | 0.0 | judge score, "good": bool, "label_kind": "vote" | "judge",
              vote:  "extracted", "pseudo_label", "vote_share", "votes", "abstained",
              judge: "judge": {"score", "reference_score", "verdict"}}}

`good` is what the SFT warmup of `gad train --method reward-distill` keeps (teacher responses
with good = true): correct for votes, score >= `good_score` for the judge. Set-aside prompts and
responses go to `set_aside.jsonl` with their reason and votes; the counts are printed and
written to `summary.json`. Nothing is dropped without being counted.

Ground truth (a `gad tasks` truth file) is read only after labelling and only to report how
accurate the pseudo-labels and the labels are; labelling never sees it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gad.api import label_summary, rating, teacher
from gad.config import load as cfg
from gad.config.load import CollectConfig, GenerateConfig, JudgeConfig, LabelConfig
from gad.config.parts import ApiClient, LocalGeneration, Sampling, TokenLimits, values
from gad.data import chats, evalsets
from gad.data.answers import (
    EXTRACTORS,
    Extractor,
    Vote,
    majority_vote,
    prompt_id,
    read_truth,
)


def collect_config(config: LabelConfig, prompts: Path, out: Path) -> CollectConfig:
    """The teacher's collection: `k` samples of every prompt into `<out>/teacher.jsonl`."""
    # The prompt file is label's own, already validated, limited and checked against
    # `exclude`, so collect does none of that again (and its saved config says so).
    return CollectConfig(
        **values(config, ApiClient, LocalGeneration, TokenLimits, Sampling),
        prompts=str(prompts),
        output=str(out / "teacher.jsonl"),
        backend=config.backend,
        model=config.teacher,
        n=config.k,
    )


def generate_config(config: LabelConfig, prompts: Path, out: Path) -> GenerateConfig:
    """The student's samples, run exactly as `gad generate` runs them."""
    shared = values(config, LocalGeneration, TokenLimits, Sampling)
    return GenerateConfig(
        **{**shared, "temperature": config.student_temperature},
        model=config.student or "",
        prompts=str(prompts),
        output=str(out / "student.jsonl"),
        n=config.student_k if config.student_k is not None else config.k,
    )


def judge_config(config: LabelConfig) -> JudgeConfig:
    """The judge of `task: open`: the teacher (unless `judge_backend` / `judge_model` say
    otherwise), greedy, its cache in `<output_dir>/judge`; its batches as label's other local
    models, its prompt limit its own (a rating prompt holds a question, a reference and an
    answer)."""
    return JudgeConfig(
        **values(config, ApiClient, LocalGeneration),
        backend=config.judge_backend or config.backend,
        model=config.judge_model or config.teacher,
        cache_dir=str(Path(config.output_dir) / "judge"),
        temperature=0.0,  # label's temperature is the teacher's sampling; a judge is greedy
        max_response_tokens=config.max_response_tokens,
    )


def _by_prompt(path: Path) -> dict[str, list[chats.Record]]:
    """Collected records grouped by prompt id, each group in sample order."""
    groups: dict[str, list[chats.Record]] = {}
    if not path.exists():
        return groups
    for record in chats.read_records(path).records:
        groups.setdefault(prompt_id(record), []).append(record)
    for group in groups.values():
        group.sort(key=lambda r: int(r.meta.get("sample", 0)))
    return groups


def _labelled(
    prompt: chats.Record,
    response: chats.Record,
    source: str,
    label: float,
    good: bool,
    **extra: Any,
) -> chats.Record:
    tag = "t" if source == "teacher" else "s"
    meta = {
        "prompt_id": prompt.id,
        "source": source,
        "sample": int(response.meta.get("sample", 0)),
        "model": response.meta.get("teacher"),
        "finish_reason": response.meta.get("finish_reason"),
        "label": label,
        "good": good,
        **extra,
    }
    messages = prompt.prompt + [{"role": "assistant", "content": response.response or ""}]
    return chats.Record(f"{prompt.id}#{tag}{meta['sample']}", messages, meta)


def label_by_vote(
    prompts: list[chats.Record],
    teacher_groups: dict[str, list[chats.Record]],
    student_groups: dict[str, list[chats.Record]],
    extractor: Extractor,
    min_share: float,
) -> tuple[list[chats.Record], list[dict[str, Any]], dict[str, Vote]]:
    """Verifiable labels: (labelled records, set-aside entries, vote per prompt id)."""
    labelled: list[chats.Record] = []
    set_aside: list[dict[str, Any]] = []
    votes: dict[str, Vote] = {}
    for prompt in prompts:
        teachers = teacher_groups.get(prompt.id, [])
        extracted = [extractor(r.response or "") for r in teachers]
        vote = majority_vote(extracted, min_share)
        votes[prompt.id] = vote
        if vote.status != "ok":
            set_aside.append(
                {
                    "id": prompt.id,
                    "reason": vote.status,
                    "vote_share": vote.share,
                    "votes": vote.votes,
                    "samples": vote.samples,
                    "abstained": vote.abstained,
                }
            )
            continue
        provenance = {
            "label_kind": "vote",
            "pseudo_label": vote.label,
            "vote_share": vote.share,
            "votes": vote.votes,
            "abstained": vote.abstained,
        }
        for source, group in (("teacher", teachers), ("student", student_groups.get(prompt.id))):
            for response in group or []:
                got = extractor(response.response or "")
                correct = got == vote.label
                labelled.append(
                    _labelled(
                        prompt,
                        response,
                        source,
                        float(correct),
                        correct,
                        extracted=got,
                        **provenance,
                    )
                )
    return labelled, set_aside, votes


def label_by_judge(
    config: LabelConfig,
    prompts: list[chats.Record],
    teacher_groups: dict[str, list[chats.Record]],
    student_groups: dict[str, list[chats.Record]],
    backend: Any = None,
) -> tuple[list[chats.Record], list[dict[str, Any]]]:
    """Open-ended labels: the judge's 1-10 score of each response against its own reference
    answer (`gad.judge`'s protocol and cache); (labelled records, set-aside entries)."""
    judging = judge_config(config)
    responses = [
        (prompt, source, response)
        for prompt in prompts
        for source, groups in (("teacher", teacher_groups), ("student", student_groups))
        for response in groups.get(prompt.id, [])
    ]
    cache = rating.Cache(judging.cache_dir)
    try:
        protocol = rating.Judge(backend or rating.make_backend(judging), cache, judging)
        refs = protocol.references([p.prompt for p in prompts])
        ref_by_id = {p.id: ref for p, ref in zip(prompts, refs, strict=True)}
        rated = [
            (i, (p.prompt, ref_by_id[p.id]["text"], r.response or ""))
            for i, (p, _, r) in enumerate(responses)
            if ref_by_id[p.id]["status"] == "ok"
        ]
        verdicts = dict(
            zip([i for i, _ in rated], protocol.verdicts([item for _, item in rated]), strict=True)
        )
    finally:
        cache.close()
    labelled: list[chats.Record] = []
    set_aside: list[dict[str, Any]] = []
    for i, (prompt, source, response) in enumerate(responses):
        ref = ref_by_id[prompt.id]
        verdict = verdicts.get(i, ref)  # no reference: the reference's error is the reason
        if verdict["status"] != "ok":
            set_aside.append(
                {
                    "id": response.id,
                    "prompt_id": prompt.id,
                    "source": source,
                    "reason": "judge_failed",
                    "error": verdict.get("error") or verdict.get("text"),
                }
            )
            continue
        reference_score, score = verdict["scores"]
        labelled.append(
            _labelled(
                prompt,
                response,
                source,
                float(score),
                score >= config.good_score,
                label_kind="judge",
                judge={
                    "score": score,
                    "reference_score": reference_score,
                    "verdict": verdict["text"],
                    "model": judging.model,
                },
            )
        )
    return labelled, set_aside


def run(config: LabelConfig, *, judge_backend: Any = None) -> label_summary.LabelSummary:
    """Collect, label, write `labels.jsonl`, `set_aside.jsonl` and `summary.json` into
    `config.output_dir`; returns (and prints) the summary. `judge_backend` replaces the judge
    the config names (tests)."""
    started = time.monotonic()
    if not config.prompts:
        raise cfg.ConfigError("'prompts' is required: a chat-record file of prompts to label")
    if config.k < 1:
        raise cfg.ConfigError(f"'k' must be at least 1, got {config.k}")
    if not 0.0 <= config.min_vote_share <= 1.0:
        raise cfg.ConfigError(f"'min_vote_share' must lie in [0, 1], got {config.min_vote_share}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(config, out / "config.yaml")
    loaded = evalsets.records_of(config.prompts, "prompts", skip_invalid=config.skip_invalid)
    prompts = loaded.records if config.limit is None else loaded.records[: config.limit]
    evalsets.refuse_overlap(prompts, config.exclude, config.prompts)
    if config.ground_truth:
        read_truth(config.ground_truth)  # a bad truth file fails now, not after collection
    # One validated prompt file feeds both collections, so both see exactly the same prompts.
    prompt_file = out / "prompts.jsonl"
    chats.write_records(prompt_file, prompts)

    summary = label_summary.LabelSummary(output=str(out / "labels.jsonl"), task=config.task)
    summary.prompts = len(prompts)
    teacher_run = teacher.collect(collect_config(config, prompt_file, out))
    summary.extra["teacher_collect"] = asdict(teacher_run)
    student_k = config.student_k if config.student_k is not None else config.k
    if config.student and student_k > 0:
        job = evalsets.generation_job(generate_config(config, prompt_file, out))
        summary.extra["student_collect"] = asdict(teacher.collect(job))
    teacher_groups = _by_prompt(out / "teacher.jsonl")
    student_groups = _by_prompt(out / "student.jsonl") if config.student and student_k else {}
    expected = len(prompts) * (config.k + (student_k if config.student else 0))
    got = sum(len(teacher_groups.get(p.id, [])) for p in prompts)
    got += sum(len(student_groups.get(p.id, [])) for p in prompts)
    summary.missing_responses = expected - got

    extractor = EXTRACTORS[config.extractor]
    votes: dict[str, Vote] = {}
    if config.task == "verifiable":
        labelled, set_aside, votes = label_by_vote(
            prompts, teacher_groups, student_groups, extractor, config.min_vote_share
        )
        reasons = Counter(entry["reason"] for entry in set_aside)
        summary.set_aside_no_answer = reasons["no_answer"]
        summary.set_aside_tie = reasons["tie"]
        summary.set_aside_low_share = reasons["low_share"]
        kept = [v.share for v in votes.values() if v.status == "ok"]
        summary.mean_vote_share = sum(kept) / len(kept) if kept else None
    else:
        labelled, set_aside = label_by_judge(
            config, prompts, teacher_groups, student_groups, judge_backend
        )
        summary.judge_failed = len(set_aside)
    label_summary.count_labels(summary, labelled)
    if config.ground_truth and config.task == "verifiable":
        label_summary.truth_report(
            summary,
            read_truth(config.ground_truth),
            extractor,
            votes,
            labelled,
            teacher_groups,
            student_groups,
        )

    chats.write_records(out / "labels.jsonl", labelled)
    summary.set_aside_file = str(out / "set_aside.jsonl")
    with open(summary.set_aside_file, "w", encoding="utf-8") as f:
        for entry in set_aside:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    summary.seconds = round(time.monotonic() - started, 3)
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    label_summary.print_summary(summary)
    return summary
