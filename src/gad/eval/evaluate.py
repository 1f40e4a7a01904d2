"""Judge-free evaluation: text-overlap metrics against the teacher, length statistics, bootstrap
confidence intervals, and "lab" metrics that need the teacher as a local model.

Text metrics (pure Python / numpy, no model):

* `rouge_l`: ROUGE-L F-measure from the `rouge-score` package (its own tokeniser: lowercase,
  runs of ``[a-z0-9]``; no stemming). Non-ASCII text therefore scores 0 there.
* `ngram_f1` / `ngram_f1_all`: clipped n-gram overlap F1 (the paper's Figure 4), with our own
  tokeniser `tokenize` (lowercase, runs of Unicode letters/digits), see its docstring.
* `length_stats`, `bootstrap_ci`, `compare_to_teacher`.

Lab metrics (torch; the caller loads the models, e.g. with `gad.models.load`):

* `teacher_logprob`: the teacher's mean per-token log-likelihood of a response.
* `sequence_logprob`: a model's total log-probability of a response.
* `reverse_kl_estimate`: Monte-Carlo KL(student || teacher) from student samples.

Every model scores the *text* of a response with its own tokenizer and chat template
(`data.encode_prompt` / `data.encode_response`, so the response ends with the model's
end-of-turn token), which is what lets a teacher and student with different vocabularies be
compared. The price: a student's sampled ids are re-tokenised from their decoded text, so the
scored token sequence may differ from the sampled one (and a sample cut at `max_response_tokens` is
scored as if it had ended there, with an end-of-turn token).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from typing import Any

import numpy as np
import torch

from gad.data.chats import Example, Record, encode_prompt, encode_response
from gad.train import engine

# ---------------------------------------------------------------- text metrics

_rouge_scorer: Any = None


def _scorer() -> Any:
    """The ROUGE-L scorer, built once on first use (the import is an optional extra)."""
    global _rouge_scorer
    if _rouge_scorer is None:
        from rouge_score import rouge_scorer

        _rouge_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _rouge_scorer


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_l(candidate: str, reference: str) -> float | None:
    """ROUGE-L F-measure of `candidate` against `reference`; None (not measurable, "n/a")
    when either has no tokens, e.g. an answer in a script rouge-score does not tokenise.

    LCS-based: P = LCS / candidate tokens, R = LCS / reference tokens, F = 2PR / (P + R), on the
    `rouge-score` tokenisation (lowercase, ``[a-z0-9]+`` runs, no stemming).
    """
    if not _ROUGE_TOKEN.search(candidate.lower()) or not _ROUGE_TOKEN.search(reference.lower()):
        return None
    # rouge-score's argument order is (target, prediction).
    return float(_scorer().score(reference, candidate)["rougeL"].fmeasure)


_TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercased runs of Unicode letters and digits; everything else (spaces, punctuation,
    underscores) separates tokens. E.g. ``"Don't stop_now, 2x!"`` -> ``don t stop now 2x``.

    Unicode-aware on purpose (unlike rouge-score's ASCII-only tokeniser) so that non-English
    answers still get an n-gram score.
    """
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def ngram_f1(candidate: str, reference: str, n: int) -> float | None:
    """F1 of clipped n-gram overlap between `candidate` and `reference` (tokens: `tokenize`).

    overlap = Σ_g min(count_cand(g), count_ref(g)) (clipped counts, as BLEU);
    precision = overlap / #candidate n-grams, recall = overlap / #reference n-grams,
    F1 = 2PR / (P + R); 0 when there is no overlap. None (not measurable, "n/a") when either
    side has fewer than n tokens: three words have no 4-gram to compare, which is not a miss.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cand = _ngrams(tokenize(candidate), n)
    ref = _ngrams(tokenize(reference), n)
    n_cand, n_ref = sum(cand.values()), sum(ref.values())
    if n_cand == 0 or n_ref == 0:
        return None
    overlap = sum((cand & ref).values())  # Counter & = element-wise min: the clipping
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_cand, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def ngram_f1_all(candidate: str, reference: str) -> dict[int, float | None]:
    """`ngram_f1` for n = 1..4, keyed by n."""
    return {n: ngram_f1(candidate, reference, n) for n in range(1, 5)}


def length_stats(token_counts: list[int], truncated: list[bool]) -> dict[str, Any]:
    """Summary of response lengths: count, mean, median, p95 and share truncated.

    p95 is numpy's default ("linear", Hyndman–Fan type 7) percentile: linear interpolation
    between the two closest ranks, so it need not be an observed length. With no responses
    the statistics are None (JSON-friendly) and count is 0.
    """
    if len(token_counts) != len(truncated):
        raise ValueError(
            f"token_counts and truncated differ in length ({len(token_counts)} vs {len(truncated)})"
        )
    if not token_counts:
        return {"count": 0, "mean": None, "median": None, "p95": None, "truncated_share": None}
    counts = np.asarray(token_counts, dtype=np.float64)
    return {
        "count": len(token_counts),
        "mean": float(counts.mean()),
        "median": float(np.median(counts)),
        "p95": float(np.percentile(counts, 95)),
        "truncated_share": sum(bool(t) for t in truncated) / len(truncated),
    }


def _prompt_id(record: Record) -> str:
    """Matching key: `meta["prompt_id"]` when present (a student sample of a prompt), else id."""
    key = record.meta.get("prompt_id") if record.meta else None
    return str(key) if key is not None else record.id


def compare_to_teacher(student: list[Record], teacher: list[Record]) -> dict[str, Any]:
    """Mean ROUGE-L and n-gram F1 (n = 1..4) of student responses against the teacher's.

    Records are matched by prompt id: `meta["prompt_id"]` if the record has one, else its `id`
    (same rule on both sides). Several student records may share a prompt (N samples each
    scored against the one teacher answer); two teacher records with the same prompt id are an
    error (which answer would be the reference?). Nothing is dropped silently: student records
    with no teacher are listed by id in `unmatched_student`, teacher prompts no student answered
    in `unmatched_teacher`, and records of either side without a final assistant turn in
    `no_response` (as "student:<id>" / "teacher:<id>"). A pair a metric cannot measure (see
    `rouge_l`, `ngram_f1`) is left out of that metric's mean; means are None when nothing was
    measured. The per-pair values are returned too (`rouge_l_values`, `ngram_f1_values`, in
    student order, the unmeasurable left out), for confidence intervals.
    """
    teacher_by_key: dict[str, Record] = {}
    for record in teacher:
        key = _prompt_id(record)
        if key in teacher_by_key:
            raise ValueError(
                f"teacher records '{teacher_by_key[key].id}' and '{record.id}' share "
                f"prompt id '{key}'"
            )
        teacher_by_key[key] = record

    rouge: list[float] = []
    f1: dict[int, list[float]] = {n: [] for n in range(1, 5)}
    unmatched_student: list[str] = []
    no_response: list[str] = []
    answered: set[str] = set()
    matched = 0
    for record in student:
        key = _prompt_id(record)
        ref = teacher_by_key.get(key)
        if ref is None:
            unmatched_student.append(record.id)
            continue
        answered.add(key)
        if record.response is None:
            no_response.append(f"student:{record.id}")
            continue
        if ref.response is None:
            continue  # reported once below, with the teacher records
        matched += 1
        value = rouge_l(record.response, ref.response)
        if value is not None:
            rouge.append(value)
        for n, value in ngram_f1_all(record.response, ref.response).items():
            if value is not None:
                f1[n].append(value)
    no_response += [f"teacher:{r.id}" for r in teacher if r.response is None]
    unmatched_teacher = [r.id for k, r in teacher_by_key.items() if k not in answered]

    def mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    return {
        "matched": matched,
        "rouge_l": mean(rouge),
        "ngram_f1": {n: mean(v) for n, v in f1.items()},
        "rouge_l_values": rouge,
        "ngram_f1_values": f1,
        "unmatched_student": unmatched_student,
        "unmatched_teacher": unmatched_teacher,
        "no_response": no_response,
    }


def bootstrap_ci(
    values: list[float], *, reps: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and a percentile-bootstrap (1 - alpha) interval.

    `reps` resamples of size n with replacement (numpy `default_rng(seed)`, so the same inputs
    give the same interval); low/high are the alpha/2 and 1 - alpha/2 quantiles (numpy's
    "linear" method) of the resampled means. A single value gives a zero-width interval.
    """
    if not values:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    # Resample in chunks so reps x n indices never exceed ~1M entries in memory at once.
    chunk = max(1, 1_000_000 // len(data))
    means = np.concatenate(
        [
            data[rng.integers(0, len(data), size=(min(chunk, reps - start), len(data)))].mean(1)
            for start in range(0, reps, chunk)
        ]
    )
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(data.mean()), float(low), float(high)


# ---------------------------------------------------------------- lab metrics (local models)


@torch.no_grad()
def _response_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    responses: list[str],
    batch_size: int = 8,
    finished: list[bool] | None = None,
) -> list[torch.Tensor]:
    """Per-token log-probs (float32, CPU) of each response's tokens given its prompt.

    Each pair is tokenised with `tokenizer`'s chat template (`encode_prompt` + `encode_response`,
    so the response includes the end-of-turn token unless `finished[i]` is False: an answer cut
    at its length limit is not charged for an end-of-turn it never wrote), batched with right
    padding. Positions come from the mask, so padding never shifts the real tokens' positions.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    finished = [True] * len(responses) if finished is None else finished
    pairs = [
        (encode_prompt(tokenizer, p), encode_response(tokenizer, p, r, finished=f))
        for p, r, f in zip(prompts, responses, finished, strict=True)
    ]
    examples = [Example(str(i), p + r, len(p), False) for i, (p, r) in enumerate(pairs)]
    parts = engine.chunks(list(range(len(examples))), batch_size)
    was_training = model.training
    model.eval()
    try:
        # The trainer's own path: right padding, positions from the mask, float32 log-probs.
        rows = engine.logprobs(model, examples, engine.pad_id_of(tokenizer), parts)
    finally:
        model.train(was_training)
    return [row.cpu() for row in rows]


def teacher_logprob(
    teacher_model: Any,
    teacher_tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    responses: list[str],
    *,
    batch_size: int = 8,
    finished: list[bool] | None = None,
) -> list[float]:
    """The teacher's mean per-token log-likelihood of each response given its prompt.

    Text level: each response is re-tokenised with the TEACHER's tokenizer and chat template, so
    responses from any student (any vocabulary) can be scored. The mean runs over the teacher's
    response tokens, end-of-turn token included (never empty, so always defined).
    """
    return [
        float(lp.mean())
        for lp in _response_logprobs(
            teacher_model, teacher_tokenizer, prompts, responses, batch_size, finished
        )
    ]


def sequence_logprob(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    responses: list[str],
    *,
    batch_size: int = 8,
) -> list[float]:
    """Total log-probability log p(y|x) (sum over response tokens, end-of-turn included) of each
    response under `model`, with `tokenizer`'s own chat template."""
    return [
        float(lp.sum(dtype=torch.float64))
        for lp in _response_logprobs(model, tokenizer, prompts, responses, batch_size)
    ]


def reverse_kl_estimate(
    student_model: Any,
    student_tokenizer: Any,
    teacher_model: Any,
    teacher_tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    student_responses: list[str],
    *,
    batch_size: int = 8,
    finished: list[bool] | None = None,
) -> dict[str, float | int]:
    """Monte-Carlo estimate of sequence-level KL(student || teacher) from student samples.

    KL = E_{y ~ student(.|x)}[log p_s(y|x) - log p_t(y|x)], estimated by the mean over the given
    (prompt, response) pairs, each side scoring the text with its own tokenizer and template.

    Caveat: this is unbiased only if `student_responses` were sampled from the student at
    temperature 1 (and top_p 1, no length cut): samples from any other distribution estimate
    something else, and a single sample's difference can be negative. Re-tokenising the text
    (see the module docstring) adds a further small mismatch when the sampled ids are not the
    tokenizer's canonical encoding of their text.

    Returns:
        `mean` (nats per sequence), `stderr` (sample std with ddof=1 over sqrt(n); NaN when
        n < 2), `n`, `per_token` (Σ differences / Σ student response tokens, end-of-turn
        included: nats per student token) and `per_char` (Σ differences / Σ response
        characters, tokenizer-independent; NaN when all responses are empty).
    """
    if not student_responses:
        raise ValueError("reverse_kl_estimate needs at least one response")
    logp_s = _response_logprobs(
        student_model, student_tokenizer, prompts, student_responses, batch_size, finished
    )
    logp_t = _response_logprobs(
        teacher_model, teacher_tokenizer, prompts, student_responses, batch_size, finished
    )
    diffs = np.array(
        [
            float(s.sum(dtype=torch.float64) - t.sum(dtype=torch.float64))
            for s, t in zip(logp_s, logp_t, strict=True)
        ]
    )
    n = len(diffs)
    tokens = sum(len(s) for s in logp_s)
    chars = sum(len(r) for r in student_responses)
    return {
        "mean": float(diffs.mean()),
        "stderr": float(diffs.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "n": n,
        "per_token": float(diffs.sum() / tokens),
        "per_char": float(diffs.sum() / chars) if chars else math.nan,
    }
