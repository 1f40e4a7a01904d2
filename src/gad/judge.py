"""LLM-as-judge evaluation (the paper's protocol, MiniLLM / MT-Bench style), cached and resumable.

Single mode (`baseline` unset). For every question the judge first writes its own reference
answer (one chat completion: the question's messages, unchanged). It then rates the reference
and the candidate's answer in ONE pairwise prompt (`RATING_TEMPLATE`; the reference is
"Assistant 1", the candidate "Assistant 2", as in MiniLLM), replying with two 1-10 scores on the
first line and a short explanation after. Reported: the mean candidate (and reference) score,
the relative score `100 * sum(candidate) / (sum(candidate) + sum(reference))` (50 = parity with
the judge), and percentile-bootstrap confidence intervals of both (`bootstrap`).

Pairwise mode (`baseline` set). System A (`answers`) and system B (`baseline`) are rated with the
same template, with NO reference answer, in both orders: (A as Assistant 1, B as Assistant 2)
and (B as 1, A as 2). Per question the two scores of each system are summed over both orders;
A wins if its sum is higher, loses if lower, ties if equal (`pairwise_outcome`). A judge that
only follows position therefore produces ties. A question whose verdict failed in either order
is `failed`, never counted as a win, tie or loss.

Parsing (`parse_scores`): see its docstring. An unparsable verdict is asked again (a fresh,
identical request) up to `attempts` times in all; if every answer is unparsable the item is
recorded as `failed` with every raw text, and never scored.

Inputs: chat records (`gad collect` / `gad generate` output); the question is the record's
prompt (messages minus the last assistant turn), the answer its last assistant turn. Records
are matched by prompt id: `meta.prompt_id` if present, else the record id. In single mode each
candidate record is one item (several samples of a prompt share one cached reference answer);
in pairwise mode each prompt id must occur once per side.

Cache: `<cache_dir>/judge_cache.jsonl`, one JSON line per finished request, appended with
write + flush + fsync (like the teacher's journal; a torn last line is cut on start):

    {"id": sha256 key, "kind": "reference" | "verdict", "judge": identity,
     "status": "ok" | "failed", "text": raw text, "scores": [s1, s2] | null, "raw": [texts]}

The key is `sha256(json({"judge": identity, "kind", "question": messages, "answers": [..]}))`
where identity is `{"backend", "model", "template": TEMPLATE_VERSION}` and `answers` is `[]` for
a reference and `[answer_1, answer_2]` (in position order) for a verdict. A cache hit sends no
request. Failed (unparsable) verdicts are cached too, so a rerun costs nothing; with
`retry_failed=True` they are asked again. Transport errors (the API still failing after the
client's own retries) are not cached: such items are `error` in the results and are retried by
the next run.

The API key is read from the environment variable named by `api_key_env` and is never logged,
cached or written (a server that echoes it has it replaced by `***`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from gad import config as cfg
from gad import data
from gad.config import JudgeConfig

log = logging.getLogger(__name__)


class JudgeError(cfg.UserError, RuntimeError):
    """Judging cannot go on: missing key, rejected credentials, unknown model, bad inputs."""


# ---------------------------------------------------------------- prompt text

TEMPLATE_VERSION = "gad-judge-v1"
"""Changes whenever the rating prompt changes, so old cached verdicts are not reused."""

RATING_SYSTEM = "You are a fair and careful judge of the answers AI assistants give to users."

RATING_TEMPLATE = """\
Read the user's request below and the answers two AI assistants gave to it. Rate each answer \
on a scale from 1 (useless or wrong) to 10 (excellent), considering how helpful, correct, \
relevant, complete and clear it is. Judge the content only: the order in which the answers are \
shown and their length must not affect your ratings.

[User request]
{question}

[Assistant 1's answer]
{answer_1}

[Assistant 2's answer]
{answer_2}

Reply in this format. First line: the two scores and nothing else, Assistant 1's score first, \
separated by a space (for example: 7 4). Then, on the following lines, a short explanation \
of your ratings."""


def render_question(messages: list[dict[str, str]]) -> str:
    """The question as the judge reads it: a single user turn as is, else a role transcript."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


def rating_messages(
    question: list[dict[str, str]], answer_1: str, answer_2: str
) -> list[dict[str, str]]:
    """The chat messages of one rating request."""
    user = RATING_TEMPLATE.format(
        question=render_question(question), answer_1=answer_1, answer_2=answer_2
    )
    return [{"role": "system", "content": RATING_SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- parsing

_LABEL = re.compile(
    r"\b(?:assistant|answer|response|model|system)\s*#?\s*(?:[12]|one|two|a|b)\b", re.IGNORECASE
)
_OUT_OF = re.compile(r"(?:\s*/\s*10(?:\.0+)?\b|\s+out\s+of\s+10\b)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.]*\d)")


def _numbers(line: str) -> list[float]:
    line = _OUT_OF.sub(" ", _LABEL.sub(" ", line))
    return [float(x) for x in _NUMBER.findall(line)]


def _is_header(line: str) -> bool:
    """A digit-free line such as "Scores:", "**Rating**" or a code fence."""
    if re.search(r"\d", line) or len(line) > 40:
        return False
    words = re.findall(r"[^\W\d_]+", line)
    return line.rstrip("*_ ").endswith(":") or len(words) <= 1


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores of a verdict, or None when they cannot be read unambiguously.

    Rules, in order: position labels ("Assistant 1", "Answer 2", "Response B"...) and "/10" or
    "out of 10" are removed; up to 3 leading header lines are skipped (digit-free, at most 40
    characters, and ending with ":" or holding at most one word: "Scores:", "**Rating**", a
    code fence). Then either the first
    remaining line holds exactly two numbers ("8 6", "8, 6", "[[8.5, 6]]", "8/10 and 6/10",
    "Assistant 1: 8, Assistant 2: 6"), or it holds exactly one and so does the next non-empty
    line ("Assistant 1: 8" / "Assistant 2: 6"). Numbers may have decimals; each must lie in
    [1, 10]. Anything else (no scores, three numbers, out of range) is unparsable: None.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    skipped = 0
    while lines and skipped < 3 and _is_header(lines[0]):
        lines.pop(0)
        skipped += 1
    if not lines:
        return None
    first = _numbers(lines[0])
    if len(first) == 1 and len(lines) > 1:
        second = _numbers(lines[1])
        scores = first + second if len(second) == 1 else []
    else:
        scores = first
    if len(scores) != 2 or not all(1.0 <= s <= 10.0 for s in scores):
        return None
    return scores[0], scores[1]


# ---------------------------------------------------------------- statistics


def bootstrap(
    candidate: list[float] | np.ndarray,
    reference: list[float] | np.ndarray,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile-bootstrap CIs over questions of the mean candidate score and relative score.

    Draws `idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))` (questions
    with replacement, paired), computes per resample the mean of `candidate[idx]` and
    `100 * sum(candidate[idx]) / (sum(candidate[idx]) + sum(reference[idx]))`, and returns the
    `(1 - confidence) / 2` and `(1 + confidence) / 2` percentiles (numpy's default linear
    interpolation) as `{"mean_ci": [lo, hi], "relative_ci": [lo, hi]}`.
    """
    c = np.asarray(candidate, dtype=float)
    r = np.asarray(reference, dtype=float)
    n = len(c)
    if n == 0:
        return {"mean_ci": [math.nan, math.nan], "relative_ci": [math.nan, math.nan]}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    cs, rs = c[idx].sum(axis=1), r[idx].sum(axis=1)
    q = [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2]
    return {
        "mean_ci": [float(x) for x in np.percentile(cs / n, q)],
        "relative_ci": [float(x) for x in np.percentile(100 * cs / (cs + rs), q)],
    }


def pairwise_outcome(a_first: tuple[float, float], b_first: tuple[float, float]) -> str:
    """`win` / `tie` / `lose` for A from the verdicts of both orders.

    `a_first` = (A's score, B's score) with A shown as Assistant 1; `b_first` = (B's score, A's
    score) with B shown first. A's total is `a_first[0] + b_first[1]`, B's `a_first[1] +
    b_first[0]`; the higher total wins, equal totals (within 1e-9) tie.
    """
    total_a = a_first[0] + b_first[1]
    total_b = a_first[1] + b_first[0]
    if abs(total_a - total_b) <= 1e-9:
        return "tie"
    return "win" if total_a > total_b else "lose"


# ---------------------------------------------------------------- backends


@dataclass
class Failed:
    """A request that got no text (transport error, refused, prompt too long)."""

    error: str


Result = str | Failed
Messages = list[dict[str, str]]


class Backend(Protocol):
    identity: dict[str, str]
    requests: int

    def complete(
        self,
        messages_list: list[Messages],
        *,
        max_tokens: int,
        on_result: Callable[[int, Result], None] | None = None,
    ) -> list[Result]:
        """One completion per conversation, in order; `on_result(i, result)` as each arrives."""
        ...


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible API, configured like `gad.teacher`."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        from gad.teacher import api_key

        self.key = api_key(config.api_key_env, JudgeError)
        self.identity = {"backend": "openai", "model": config.model, "template": TEMPLATE_VERSION}
        self.requests = 0

    def redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def complete(
        self,
        messages_list: list[Messages],
        *,
        max_tokens: int,
        on_result: Callable[[int, Result], None] | None = None,
    ) -> list[Result]:
        if not messages_list:
            return []
        return asyncio.run(self._complete(messages_list, max_tokens, on_result))

    async def _complete(
        self,
        messages_list: list[Messages],
        max_tokens: int,
        on_result: Callable[[int, Result], None] | None,
    ) -> list[Result]:
        import openai

        from gad.teacher import _describe, api_client, refusals, run_pool

        config = self.config

        async def count(request: Any) -> None:
            self.requests += 1

        client = api_client(config, self.key, count)
        results: list[Result | None] = [None] * len(messages_list)
        fatal: list[BaseException] = []

        async def ask(i: int) -> None:
            try:
                response = await client.chat.completions.create(
                    model=config.model,
                    messages=messages_list[i],  # type: ignore[arg-type]
                    temperature=config.temperature,
                    max_tokens=max_tokens,
                )
            except refusals() as err:
                fatal.append(err)
                return
            except openai.APIError as err:
                result: Result = Failed(self.redact(_describe(err)))
            else:
                choice = response.choices[0] if response.choices else None
                text = choice.message.content if choice is not None else None
                if text is None:
                    result = Failed("EmptyAnswer: the response has no text")
                else:
                    result = self.redact(text)
            results[i] = result
            if on_result is not None:
                on_result(i, result)

        await run_pool(client, range(len(messages_list)), ask, config.concurrency, fatal)
        if fatal:
            raise JudgeError(
                f"the judge API refused the run ({self.redact(_describe(fatal[0]))}); check "
                f"base_url, model and the key in ${config.api_key_env}. Finished judgements "
                f"are cached; rerun to continue."
            )
        return results  # type: ignore[return-value]


class LocalBackend:
    """A local model as judge: `gad.models.load` + `TransformersRollout`, greedy by default."""

    def __init__(self, config: JudgeConfig) -> None:
        import torch

        from gad import models
        from gad.rollout import TransformersRollout

        self.config = config
        self.model, self.tokenizer = models.load(config.model, dtype=getattr(torch, config.dtype))
        self.rollout = TransformersRollout(self.model, self.tokenizer, batch_size=config.batch_size)
        self.identity = {"backend": "local", "model": config.model, "template": TEMPLATE_VERSION}
        self.requests = 0
        self._calls = 0

    def complete(
        self,
        messages_list: list[Messages],
        *,
        max_tokens: int,
        on_result: Callable[[int, Result], None] | None = None,
    ) -> list[Result]:
        from gad.rollout import Sampling

        sampling = Sampling(temperature=self.config.temperature, max_new_tokens=max_tokens)
        results: list[Result | None] = [None] * len(messages_list)
        runnable: list[tuple[int, list[int]]] = []
        for i, messages in enumerate(messages_list):
            ids = data.encode_prompt(self.tokenizer, messages)
            if len(ids) > self.config.max_prompt_tokens:
                results[i] = Failed(
                    f"prompt too long: {len(ids)} tokens > {self.config.max_prompt_tokens}"
                )
                if on_result is not None:
                    on_result(i, results[i])  # type: ignore[arg-type]
            else:
                runnable.append((i, ids))
        runnable.sort(key=lambda pair: len(pair[1]))
        size = self.config.batch_size
        for start in range(0, len(runnable), size):
            batch = runnable[start : start + size]
            # Distinct seeds per call: a retried verdict is a fresh sample when temperature > 0.
            self._calls += 1
            seeds = [self.config.seed * 1_000_003 + self._calls * 1009 + i for i, _ in batch]
            completions = self.rollout.generate([ids for _, ids in batch], 1, sampling, seeds)
            self.requests += len(batch)
            for (i, _), (completion,) in zip(batch, completions, strict=True):
                results[i] = completion.text
                if on_result is not None:
                    on_result(i, completion.text)
        return results  # type: ignore[return-value]


def make_backend(config: JudgeConfig) -> Backend:
    if config.backend == "openai":
        return OpenAIBackend(config)
    if config.backend == "local":
        return LocalBackend(config)
    raise cfg.ConfigError(f"'backend' must be 'openai' or 'local', got {config.backend!r}")


# ---------------------------------------------------------------- cache


def cache_key(identity: dict[str, str], kind: str, question: Messages, answers: list[str]) -> str:
    """sha256 of the judge identity, the request kind, the question and the answers in order."""
    blob = json.dumps(
        {"judge": identity, "kind": kind, "question": question, "answers": answers},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class Cache:
    """Append-only JSONL of finished requests; the last entry of a key wins."""

    FILE = "judge_cache.jsonl"

    def __init__(self, folder: str | Path) -> None:
        from gad.teacher import read_journal

        self.path = Path(folder) / self.FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = open(self.path, "a", encoding="utf-8")
        try:
            import fcntl

            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: run one judge per cache folder
            pass
        except BlockingIOError as err:
            self._f.close()
            raise JudgeError(f"{self.path}: another `gad judge` is using this cache") from err
        entries, _ = read_journal(self.path, lambda obj: obj)
        self.entries: dict[str, dict[str, Any]] = {str(e["id"]): e for e in entries}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, entry: dict[str, Any]) -> None:
        data.append_jsonl(self._f, entry)
        self.entries[entry["id"]] = entry

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------- protocol


@dataclass
class _Verdict:
    """One rating request to settle: (question, answer_1, answer_2) in position order."""

    question: Messages
    answer_1: str
    answer_2: str
    key: str
    result: dict[str, Any] | None = None
    """The settled cache entry, or `{"status": "error", "error"}` for a transport failure."""


class Judge:
    """The backend-free protocol: references, verdicts with parse retries, and the cache."""

    def __init__(self, backend: Backend, cache: Cache, config: JudgeConfig) -> None:
        self.backend = backend
        self.cache = cache
        self.config = config
        self.cache_hits = 0

    def references(self, questions: list[Messages]) -> list[dict[str, Any]]:
        """The judge's reference answer for each question (`status` ok, or error)."""
        keys = [cache_key(self.backend.identity, "reference", q, []) for q in questions]
        out: dict[str, dict[str, Any]] = {}
        todo: list[tuple[str, Messages]] = []
        queued: set[str] = set()
        for key, question in zip(keys, questions, strict=True):
            if key in out or key in queued:
                continue
            hit = self.cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                out[key] = hit
            else:
                todo.append((key, question))
                queued.add(key)

        def done(i: int, result: Result) -> None:
            key = todo[i][0]
            if isinstance(result, Failed):
                out[key] = {"status": "error", "error": result.error}
                return
            entry = self._entry(key, "reference", "ok", result, None, [result])
            self.cache.put(entry)
            out[key] = entry

        self.backend.complete(
            [q for _, q in todo], max_tokens=self.config.max_tokens, on_result=done
        )
        return [out[key] for key in keys]

    def verdicts(self, items: list[tuple[Messages, str, str]]) -> list[dict[str, Any]]:
        """Settle every (question, answer_1, answer_2): cached, parsed, failed or error."""
        identity = self.backend.identity
        verdicts = [
            _Verdict(q, a1, a2, cache_key(identity, "verdict", q, [a1, a2])) for q, a1, a2 in items
        ]
        unique: dict[str, _Verdict] = {}
        for v in verdicts:
            unique.setdefault(v.key, v)
        raw: dict[str, list[str]] = {}
        pending: list[_Verdict] = []
        for v in unique.values():
            hit = self.cache.get(v.key)
            if hit is not None and (hit["status"] == "ok" or not self.config.retry_failed):
                self.cache_hits += 1
                v.result = hit
            else:
                pending.append(v)
        for attempt in range(max(1, self.config.attempts)):
            if not pending:
                break
            last = attempt == max(1, self.config.attempts) - 1
            batch = list(pending)

            def done(i: int, result: Result, batch: list[_Verdict] = batch, last: bool = last):
                v = batch[i]
                if isinstance(result, Failed):
                    v.result = {"status": "error", "error": result.error}
                    return
                texts = raw.setdefault(v.key, [])
                texts.append(result)
                scores = parse_scores(result)
                if scores is not None:
                    v.result = self._entry(v.key, "verdict", "ok", result, list(scores), texts)
                    self.cache.put(v.result)
                elif last:
                    v.result = self._entry(v.key, "verdict", "failed", result, None, texts)
                    self.cache.put(v.result)

            messages = [rating_messages(v.question, v.answer_1, v.answer_2) for v in batch]
            self.backend.complete(
                messages, max_tokens=self.config.verdict_max_tokens, on_result=done
            )
            pending = [v for v in batch if v.result is None]
        return [unique[v.key].result or {"status": "error", "error": "not run"} for v in verdicts]

    def _entry(
        self,
        key: str,
        kind: str,
        status: str,
        text: str,
        scores: list[float] | None,
        texts: list[str],
    ) -> dict[str, Any]:
        return {
            "id": key,
            "kind": kind,
            "judge": self.backend.identity,
            "status": status,
            "text": text,
            "scores": scores,
            "raw": list(texts),
        }


# ---------------------------------------------------------------- inputs


def prompt_id(record: data.Record) -> str:
    """Matching key: `meta["prompt_id"]` when present, else the record id."""
    key = record.meta.get("prompt_id") if record.meta else None
    return str(key) if key is not None else record.id


def _answered(path: str) -> list[data.Record]:
    records = data.read_records(path).records
    for record in records:
        if record.response is None:
            raise record.error("messages", "no final assistant answer to judge")
    return records


def _select(records: list[data.Record], config: JudgeConfig) -> tuple[list[data.Record], int]:
    """Records restricted to (and ordered like) `config.questions`; also how many are missing."""
    missing = 0
    if config.questions:
        wanted = data.read_records(config.questions).records
        by_id: dict[str, list[data.Record]] = {}
        for record in records:
            by_id.setdefault(prompt_id(record), []).append(record)
        chosen: list[data.Record] = []
        for q in wanted:
            found = by_id.get(prompt_id(q), [])
            if not found:
                missing += 1
            for record in found:
                if record.prompt != q.prompt:
                    raise data.DataError(
                        f"record '{record.id}' answers a different prompt than question "
                        f"'{prompt_id(q)}' of {config.questions}"
                    )
            chosen.extend(found)
        records = chosen
    if config.limit is not None:
        keep: list[str] = []
        for record in records:
            if prompt_id(record) not in keep:
                keep.append(prompt_id(record))
        allowed = set(keep[: config.limit])
        records = [r for r in records if prompt_id(r) in allowed]
    return records, missing


# ---------------------------------------------------------------- runs


def _round(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def _single(judge: Judge, config: JudgeConfig) -> tuple[list[dict], dict[str, Any]]:
    records, missing = _select(_answered(config.answers), config)
    refs = judge.references([r.prompt for r in records])
    items, where = [], []
    for i, (record, ref) in enumerate(zip(records, refs, strict=True)):
        if ref["status"] == "ok":
            where.append(i)
            items.append((record.prompt, ref["text"], record.response or ""))
    verdicts = dict(zip(where, judge.verdicts(items), strict=True))
    rows: list[dict[str, Any]] = []
    cand, refscores = [], []
    for i, (record, ref) in enumerate(zip(records, refs, strict=True)):
        row: dict[str, Any] = {"id": record.id, "prompt_id": prompt_id(record)}
        if ref["status"] != "ok":
            row.update(status="error", error=ref["error"])
        else:
            v = verdicts[i]
            row["reference"] = ref["text"]
            row["status"] = v["status"]
            if v["status"] == "error":
                row["error"] = v["error"]
            else:
                row["verdict"] = v["text"]
                row["attempts"] = len(v["raw"])
                if v["status"] == "failed":
                    row["raw"] = v["raw"]
                else:
                    row["reference_score"], row["candidate_score"] = v["scores"]
                    refscores.append(v["scores"][0])
                    cand.append(v["scores"][1])
        rows.append(row)
    ci = bootstrap(
        cand, refscores, resamples=config.bootstrap, confidence=config.confidence, seed=config.seed
    )
    total_c, total_r = sum(cand), sum(refscores)
    summary = {
        "mode": "single",
        "questions": len(records),
        "scored": len(cand),
        "failed": sum(r["status"] == "failed" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "missing": missing,
        "mean_candidate": _round(float(np.mean(cand))) if cand else None,
        "mean_candidate_ci": [_round(x) for x in ci["mean_ci"]],
        "mean_reference": _round(float(np.mean(refscores))) if refscores else None,
        "relative": _round(100 * total_c / (total_c + total_r)) if cand else None,
        "relative_ci": [_round(x) for x in ci["relative_ci"]],
        "confidence": config.confidence,
        "bootstrap": config.bootstrap,
    }
    return rows, summary


def _pairwise(judge: Judge, config: JudgeConfig) -> tuple[list[dict], dict[str, Any]]:
    assert config.baseline is not None
    a_records, missing = _select(_answered(config.answers), config)
    b_by_id: dict[str, data.Record] = {}
    for record in _answered(config.baseline):
        key = prompt_id(record)
        if key in b_by_id:
            raise data.DataError(f"{config.baseline}: prompt id '{key}' is answered twice")
        b_by_id[key] = record
    pairs: list[tuple[data.Record, data.Record]] = []
    seen: set[str] = set()
    for a in a_records:
        key = prompt_id(a)
        if key in seen:
            raise data.DataError(f"{config.answers}: prompt id '{key}' is answered twice")
        seen.add(key)
        b = b_by_id.get(key)
        if b is None:
            missing += 1
            continue
        if a.prompt != b.prompt:
            raise data.DataError(f"prompt id '{key}': the two systems answered different prompts")
        pairs.append((a, b))
    items = []
    for a, b in pairs:
        items.append((a.prompt, a.response or "", b.response or ""))
        items.append((a.prompt, b.response or "", a.response or ""))
    verdicts = judge.verdicts(items)
    rows: list[dict[str, Any]] = []
    for k, (a, _) in enumerate(pairs):
        v1, v2 = verdicts[2 * k], verdicts[2 * k + 1]
        row: dict[str, Any] = {"id": a.id, "prompt_id": prompt_id(a)}
        for name, v in (("a_first", v1), ("b_first", v2)):
            row[name] = {k2: v.get(k2) for k2 in ("status", "scores", "text", "raw", "error")}
        if v1["status"] == "ok" and v2["status"] == "ok":
            row["status"] = "ok"
            row["outcome"] = pairwise_outcome(tuple(v1["scores"]), tuple(v2["scores"]))
            row["score_a"] = v1["scores"][0] + v2["scores"][1]
            row["score_b"] = v1["scores"][1] + v2["scores"][0]
            # Same preference in both orders (or a tie in both): the judge did not flip.
            pref1 = np.sign(v1["scores"][0] - v1["scores"][1])
            pref2 = np.sign(v2["scores"][1] - v2["scores"][0])
            row["position_consistent"] = bool(pref1 == pref2)
        else:
            row["status"] = "error" if "error" in (v1["status"], v2["status"]) else "failed"
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    counts = {o: sum(r["outcome"] == o for r in ok) for o in ("win", "tie", "lose")}
    n = len(ok)
    summary = {
        "mode": "pairwise",
        "questions": len(pairs),
        "scored": n,
        "failed": sum(r["status"] == "failed" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "missing": missing,
        **counts,
        **{f"{o}_rate": _round(c / n) if n else None for o, c in counts.items()},
        "position_consistent": sum(r["position_consistent"] for r in ok),
    }
    return rows, summary


def _public_config(config: JudgeConfig) -> dict[str, Any]:
    return asdict(config)  # holds the key's variable name only, never the key


def judge(config: JudgeConfig, *, backend: Backend | None = None, quiet: bool = False) -> dict:
    """Judge `config.answers` (single mode) or `answers` vs `baseline` (pairwise mode).

    Writes `config.output` (atomically) and returns the same dict: `{"config", "summary",
    "questions": [per-question rows]}`. `backend` replaces the one the config names (tests).
    """
    started = time.monotonic()
    if not config.answers:
        raise cfg.ConfigError("'answers' is required: a chat-record file of answers to judge")
    if config.attempts < 1:
        raise cfg.ConfigError(f"'attempts' must be at least 1, got {config.attempts}")
    if backend is None:
        backend = make_backend(config)
    cache = Cache(config.cache_dir)
    try:
        protocol = Judge(backend, cache, config)
        if config.baseline:
            rows, summary = _pairwise(protocol, config)
        else:
            rows, summary = _single(protocol, config)
    finally:
        cache.close()
    summary.update(
        judge=backend.identity,
        requests=backend.requests,
        cache_hits=protocol.cache_hits,
        seconds=round(time.monotonic() - started, 3),
    )
    result = {"config": _public_config(config), "summary": summary, "questions": rows}
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, output)
    if not quiet:
        print_summary(summary, output)
    return result


def print_summary(summary: dict[str, Any], output: Path | str) -> None:
    """A rich table of the summary."""
    from rich.console import Console
    from rich.table import Table

    def ci(pair: list[float | None]) -> str:
        return "n/a" if None in pair else f"[{pair[0]:.2f}, {pair[1]:.2f}]"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    pct = int(round(100 * summary.get("confidence", 0.95)))
    table = Table(title=f"judge ({summary['mode']}) -> {output}", show_header=False)
    rows: list[tuple[str, Any]] = [("judge", summary["judge"]["model"])]
    if summary["mode"] == "single":
        rows += [
            ("mean candidate score (1-10)", num(summary["mean_candidate"])),
            (f"  {pct}% CI", ci(summary["mean_candidate_ci"])),
            ("mean reference score", num(summary["mean_reference"])),
            ("relative score (50 = parity)", num(summary["relative"])),
            (f"  {pct}% CI", ci(summary["relative_ci"])),
        ]
    else:
        n = summary["scored"]
        for o in ("win", "tie", "lose"):
            rate = summary[f"{o}_rate"]
            rows.append((f"A {o}s", f"{summary[o]} ({'n/a' if rate is None else f'{rate:.1%}'})"))
        rows.append(("position-consistent verdicts", f"{summary['position_consistent']}/{n}"))
    rows += [
        ("questions", summary["questions"]),
        ("scored", summary["scored"]),
        ("failed (unparsable verdicts)", summary["failed"]),
        ("errors (no answer from the judge)", summary["errors"]),
        ("missing answers", summary["missing"]),
        ("requests", summary["requests"]),
        ("cache hits", summary["cache_hits"]),
        ("seconds", f"{summary['seconds']:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console = Console()
    console.print(table)
    if summary["failed"] or summary["errors"]:
        console.print(f"[yellow]failed/error questions are listed in {output} (status field)")
