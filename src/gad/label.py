"""`gad label`: the teacher's judgement as labels (reward distillation, SPEC §4 steps 1-2).

For every prompt, `k` teacher samples (`teacher.collect` with `n=k`) and `k` student samples (the
same journaled collection with a local model, exactly as `gad generate` runs it) are gathered;
both are resumable. Then every response is labelled:

verifiable  an extractor (`number`, `choice`, `boxed`) reads each response's final answer. The
            majority vote over the teacher's extracted answers is the prompt's pseudo-label
            (`majority_vote`): its vote share is the top answer's count over ALL teacher samples
            of the prompt, abstentions (no extractable answer) included, so a teacher that
            rarely answers is not trusted. A prompt is set aside, with its reason, when no
            teacher sample has an answer (`no_answer`), when two or more answers share the top
            count (`tie`: the teacher is split, so no answer is preferred by an arbitrary rule),
            or when the top share is below `min_vote_share` (`low_share`). Each response of a
            kept prompt is correct (label 1) when its extracted answer equals the pseudo-label,
            else incorrect (label 0; a response without an answer is incorrect).
open        the teacher rates every response 1-10 through `gad.judge` (its backends, prompt,
            parser and cache): the judge writes a reference answer per prompt, then rates the
            response against it; the response's score is its label. A response whose verdict
            could not be had or parsed is set aside (`judge_failed`), per response.

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
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from gad import config as cfg
from gad import data, evalsets, teacher
from gad.config import CollectConfig, GenerateConfig, JudgeConfig, LabelConfig

# ---------------------------------------------------------------- answer extractors

Extractor = Callable[[str], str | None]

# A number not glued to a word or a decimal point on its left. The minus sign counts only when
# it does not follow a word character or ")": in "7-3" it is an operator, in "= -3" a sign.
_NUMBER = re.compile(r"(?<![\w.)\]])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_PHRASE = re.compile(r"\banswer\b\s*(?:is\b|:|=)", re.IGNORECASE)
_HASHES = "####"
_CHOICE = "ABCDEFGHIJ"  # up to 10 options, as MMLU-Pro


def normalize_number(text: str) -> str:
    """Canonical form of a number: no thousands commas, no leading zeros, no trailing decimal
    zeros, no negative zero ("1,200.50" -> "1200.5", "-0.0" -> "0", "007" -> "7")."""
    s = text.replace(",", "").strip()
    negative = s.startswith("-")
    whole, _, frac = s.lstrip("-").partition(".")
    frac = frac.rstrip("0")
    out = (whole.lstrip("0") or "0") + (f".{frac}" if frac else "")
    return f"-{out}" if negative and out != "0" else out


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(text)


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[starts[-1] : i - 1].strip() if depth == 0 else None


def _after_answer_phrase(text: str) -> tuple[str, str] | None:
    """(clause, rest) after the last "answer is" / "answer:" / "answer =": the clause runs to
    the end of its line or sentence, the rest to the end of the text. None without a phrase."""
    found = list(_ANSWER_PHRASE.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end() :]
    # A sentence ends at a period followed by a space or the end, not at a decimal point.
    return re.split(r"\n|\.(?:\s|$)", rest.lstrip(), maxsplit=1)[0], rest


def extract_number(text: str) -> str | None:
    """The final numeric answer of a response, normalised (`normalize_number`), or None.

    In order: the number in the last `\\boxed{}`; the first number after the last "####" (GSM8K
    style); in the clause after the last "answer is" / "answer:" the number after its last "="
    if it has one ("The answer is 3 + 4 = 7"), else its first number ("The answer is 42, 2 more
    than 40"), else the first number after the phrase ("Answer:" then "**42**" on the next
    line); otherwise the last number of the text, so the numbers of the reasoning before it are
    ignored. Thousands commas are allowed; a "-" right after a digit is an operator, not a sign
    ("7-3" holds 7 and 3).
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        found = _numbers(boxed)
        if found:
            return normalize_number(found[-1])
    if _HASHES in text:
        found = _numbers(text.rsplit(_HASHES, 1)[1])
        if found:
            return normalize_number(found[0])
    phrase = _after_answer_phrase(text)
    if phrase is not None:
        clause, rest = phrase
        # "answer is: 3 + 4 = 7" means 7; "answer is:\n**7**" has it on the next line.
        found = _numbers(clause.rsplit("=", 1)[-1]) or _numbers(rest)
        if found:
            return normalize_number(found[0])
    found = _numbers(text)
    return normalize_number(found[-1]) if found else None


_LETTER = f"[{_CHOICE}]"
# The phrase is matched in any case, the letter only as a capital: "the answer is a ..." is
# not a choice.
_CHOICE_PHRASE = re.compile(
    rf"\b(?:answer|option|choice)(?:\s+is\b|\s*:)?[\s*]*[(\[]?((?-i:{_LETTER}))\b(?![\w'])",
    re.IGNORECASE,
)
_CHOICE_ALONE = re.compile(rf"^\W{{0,2}}({_LETTER})(?:\s*$|[).:\]])")
_CHOICE_PAREN = re.compile(rf"\(({_LETTER})\)")


def extract_choice(text: str) -> str | None:
    """The multiple-choice letter (A-J) a response picks, or None.

    In order: a letter alone in the last `\\boxed{}`; the letter after the last "answer is" /
    "answer:" / "option" / "choice" ("The answer is (B)"); a response that is just a letter
    ("B", "B.", "(B)", "B) Paris"); the last parenthesised letter "(C)". Only capitals count,
    and a leading letter only when punctuation or nothing follows it ("A cat..." is no choice).
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        m = _CHOICE_ALONE.match(boxed.strip())
        if m:
            return m.group(1).upper()
    found = list(_CHOICE_PHRASE.finditer(text))
    if found:
        return found[-1].group(1).upper()
    m = _CHOICE_ALONE.match(text.strip())
    if m:
        return m.group(1)
    found = _CHOICE_PAREN.findall(text)
    return found[-1] if found else None


def normalize_expression(text: str) -> str:
    """A light canonical form of a math expression: no spaces, `$`, `\\left`/`\\right`,
    `\\!`, `\\,` or trailing period; a plain number as `normalize_number` writes it."""
    s = re.sub(r"\\left|\\right|\\[!,;]|\$|\s", "", text).rstrip(".")
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", s):
        return normalize_number(s)
    return s


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, normalised (`normalize_expression`), or None."""
    boxed = _last_boxed(text)
    return normalize_expression(boxed) if boxed else None


EXTRACTORS: dict[str, Extractor] = {
    "number": extract_number,
    "choice": extract_choice,
    "boxed": extract_boxed,
}
"""The extractors by the name `LabelConfig.extractor` and `EvalConfig.extractor` use."""


def truth_key(extractor: Extractor, answer: str) -> str:
    """A ground-truth answer in the form the extractor gives ("1,000" -> "1000", "B" -> "B");
    a bare expression that the extractor does not recognise is normalised as is."""
    found = extractor(answer)
    return found if found is not None else normalize_expression(answer)


# ---------------------------------------------------------------- majority vote

VoteStatus = Literal["ok", "no_answer", "tie", "low_share"]


@dataclass(frozen=True)
class Vote:
    """The teacher's vote on one prompt."""

    label: str | None
    """The pseudo-label (the top answer) when `status == "ok"`, else None."""
    share: float
    """Top answer's count / all samples, abstentions included (0 when nobody answered)."""
    votes: dict[str, int]
    """Count per extracted answer, most votes first (equal counts: first seen first)."""
    samples: int
    """Teacher samples of the prompt."""
    abstained: int
    """Samples without an extractable answer."""
    status: VoteStatus
    """`ok`, or why the prompt is set aside: `no_answer`, `tie`, `low_share`."""


def majority_vote(answers: Sequence[str | None], min_share: float) -> Vote:
    """Majority vote over one prompt's extracted teacher answers (None = abstained).

    Checked in this order: no answer at all -> `no_answer`; two or more answers with the top
    count -> `tie` (set aside whatever the share: no order-dependent tie-break); top count /
    len(answers) below `min_share` -> `low_share`; else `ok` with that answer as the label.
    """
    given = [a for a in answers if a is not None]
    counts = Counter(given)  # insertion-ordered: equal counts keep first-seen order
    votes = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    abstained = len(answers) - len(given)
    if not given:
        return Vote(None, 0.0, {}, len(answers), abstained, "no_answer")
    top = max(counts.values())
    share = top / len(answers)
    leaders = [a for a, c in votes.items() if c == top]
    if len(leaders) > 1:
        return Vote(None, share, votes, len(answers), abstained, "tie")
    if share < min_share:
        return Vote(None, share, votes, len(answers), abstained, "low_share")
    return Vote(leaders[0], share, votes, len(answers), abstained, "ok")


# ---------------------------------------------------------------- ground truth


def read_truth(path: str | Path) -> dict[str, str]:
    """Ground-truth answers by prompt id from a truth file (`{"id", "answer"}` per line, as
    `gad tasks` writes); errors name the file, line and field."""
    path = Path(path)
    if not path.exists():
        raise data.DataError(f"{path}: no such file")
    truth: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise data.DataError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str | int):
            raise data.DataError(f"{where}: field 'id': must be a string")
        if not isinstance(obj.get("answer"), str | int | float):
            raise data.DataError(f"{where}: field 'answer': must be a string or a number")
        truth[str(obj["id"])] = str(obj["answer"])
    return truth


def prompt_id(record: data.Record) -> str:
    """`meta.prompt_id` (a sample of a prompt), else the record id."""
    key = record.meta.get("prompt_id") if record.meta else None
    return str(key) if key is not None else record.id


def accuracy(
    records: list[data.Record], truth: dict[str, str], extractor: Extractor
) -> dict[str, Any]:
    """Per-record correctness of answers against ground truth, matched by prompt id.

    Returns `values` (1.0/0.0 per record with a truth entry, in record order), `answered`
    (records with an extractable answer) and `no_truth` (ids of records without a truth entry).
    """
    values: list[float] = []
    answered = 0
    no_truth: list[str] = []
    for record in records:
        key = prompt_id(record)
        if key not in truth:
            no_truth.append(record.id)
            continue
        got = extractor(record.response or "")
        answered += got is not None
        values.append(float(got is not None and got == truth_key(extractor, truth[key])))
    return {"values": values, "answered": answered, "no_truth": no_truth}


# ---------------------------------------------------------------- labelling


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


def _collect_teacher(config: LabelConfig, prompts: Path, out: Path) -> teacher.CollectSummary:
    return teacher.collect(
        CollectConfig(
            prompts=str(prompts),
            output=str(out / "teacher.jsonl"),
            backend=config.backend,
            model=config.teacher,
            base_url=config.base_url,
            api_key_env=config.api_key_env,
            n=config.k,
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_tokens,
            max_prompt_tokens=config.max_prompt_tokens,
            concurrency=config.concurrency,
            max_retries=config.max_retries,
            request_timeout=config.request_timeout,
            batch_size=config.batch_size,
            dtype=config.dtype,
            seed=config.seed,
        )
    )


def _collect_student(config: LabelConfig, prompts: Path, out: Path) -> teacher.CollectSummary:
    job = evalsets.generation_job(
        GenerateConfig(
            model=config.student or "",
            prompts=str(prompts),
            output=str(out / "student.jsonl"),
            n=config.student_k if config.student_k is not None else config.k,
            temperature=config.student_temperature,
            top_p=config.top_p,
            max_tokens=config.max_tokens,
            max_prompt_tokens=config.max_prompt_tokens,
            batch_size=config.batch_size,
            dtype=config.dtype,
            seed=config.seed,
        )
    )
    return teacher.collect(job)


def _by_prompt(path: Path) -> dict[str, list[data.Record]]:
    """Collected records grouped by prompt id, each group in sample order."""
    groups: dict[str, list[data.Record]] = {}
    if not path.exists():
        return groups
    for record in data.read_records(path).records:
        groups.setdefault(prompt_id(record), []).append(record)
    for group in groups.values():
        group.sort(key=lambda r: int(r.meta.get("sample", 0)))
    return groups


def _labelled(
    prompt: data.Record, response: data.Record, source: str, label: float, good: bool, **extra: Any
) -> data.Record:
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
    return data.Record(f"{prompt.id}#{tag}{meta['sample']}", messages, meta)


def label_by_vote(
    prompts: list[data.Record],
    teacher_groups: dict[str, list[data.Record]],
    student_groups: dict[str, list[data.Record]],
    extractor: Extractor,
    min_share: float,
) -> tuple[list[data.Record], list[dict[str, Any]], dict[str, Vote]]:
    """Verifiable labels: (labelled records, set-aside entries, vote per prompt id)."""
    labelled: list[data.Record] = []
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
    prompts: list[data.Record],
    teacher_groups: dict[str, list[data.Record]],
    student_groups: dict[str, list[data.Record]],
    backend: Any = None,
) -> tuple[list[data.Record], list[dict[str, Any]]]:
    """Open-ended labels: the judge's 1-10 score of each response against its own reference
    answer (`gad.judge`'s protocol and cache); (labelled records, set-aside entries)."""
    from gad import judge

    judge_config = JudgeConfig(
        backend=config.judge_backend or config.backend,
        model=config.judge_model or config.teacher,
        base_url=config.base_url,
        api_key_env=config.api_key_env,
        cache_dir=str(Path(config.output_dir) / "judge"),
        temperature=0.0,
        max_tokens=config.max_tokens,
        concurrency=config.concurrency,
        max_retries=config.max_retries,
        request_timeout=config.request_timeout,
        batch_size=config.batch_size,
        dtype=config.dtype,
        seed=config.seed,
    )
    responses = [
        (prompt, source, response)
        for prompt in prompts
        for source, groups in (("teacher", teacher_groups), ("student", student_groups))
        for response in groups.get(prompt.id, [])
    ]
    cache = judge.Cache(judge_config.cache_dir)
    try:
        protocol = judge.Judge(backend or judge.make_backend(judge_config), cache, judge_config)
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
    labelled: list[data.Record] = []
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
                    "model": judge_config.model,
                },
            )
        )
    return labelled, set_aside


def _truth_report(
    summary: LabelSummary,
    truth: dict[str, str],
    extractor: Extractor,
    votes: dict[str, Vote],
    labelled: list[data.Record],
    teacher_groups: dict[str, list[data.Record]],
    student_groups: dict[str, list[data.Record]],
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


def run(config: LabelConfig, *, judge_backend: Any = None) -> LabelSummary:
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
    loaded = data.read_records(config.prompts, skip_invalid=config.skip_invalid)
    prompts = loaded.records if config.limit is None else loaded.records[: config.limit]
    evalsets.refuse_overlap(prompts, config.exclude, config.prompts)
    if config.ground_truth:
        read_truth(config.ground_truth)  # a bad truth file fails now, not after collection
    # One validated prompt file feeds both collections, so both see exactly the same prompts.
    prompt_file = out / "prompts.jsonl"
    data.write_records(prompt_file, prompts)

    summary = LabelSummary(output=str(out / "labels.jsonl"), task=config.task)
    summary.prompts = len(prompts)
    summary.extra["teacher_collect"] = asdict(_collect_teacher(config, prompt_file, out))
    student_k = config.student_k if config.student_k is not None else config.k
    if config.student and student_k > 0:
        summary.extra["student_collect"] = asdict(_collect_student(config, prompt_file, out))
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
    labelled_ids = {r.meta["prompt_id"] for r in labelled}
    summary.labelled_prompts = len(labelled_ids)
    summary.set_aside_prompts = len(prompts) - len(labelled_ids)
    summary.teacher_responses = sum(r.meta["source"] == "teacher" for r in labelled)
    summary.student_responses = len(labelled) - summary.teacher_responses
    summary.good_teacher = sum(r.meta["good"] and r.meta["source"] == "teacher" for r in labelled)
    summary.good_student = sum(r.meta["good"] and r.meta["source"] == "student" for r in labelled)
    if labelled:
        summary.mean_label = sum(r.meta["label"] for r in labelled) / len(labelled)
    if config.ground_truth and config.task == "verifiable":
        _truth_report(
            summary,
            read_truth(config.ground_truth),
            extractor,
            votes,
            labelled,
            teacher_groups,
            student_groups,
        )

    data.write_records(out / "labels.jsonl", labelled)
    summary.set_aside_file = str(out / "set_aside.jsonl")
    with open(summary.set_aside_file, "w", encoding="utf-8") as f:
        for entry in set_aside:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    summary.seconds = round(time.monotonic() - started, 3)
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    print_summary(summary)
    return summary


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
