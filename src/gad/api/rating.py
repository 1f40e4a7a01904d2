"""The judge's rating protocol, shared by `gad judge` and `gad label --task open`.

A reference answer is one chat completion of the question's messages, unchanged. A verdict
rates two answers to a question in ONE prompt (`RATING_TEMPLATE`: "Assistant 1" and
"Assistant 2", as in MiniLLM), replying with two 1-10 scores on the first line and a short
explanation after. `Judge.references` and `Judge.verdicts` settle a batch of either.

Parsing (`parse_scores`): see its docstring. An unparsable verdict is asked again (a fresh,
identical request) up to `attempts` times in all; if every answer is unparsable the item is
recorded as `failed` with every raw text, and never scored.

Requests go through the chat client shared with `gad collect` (`gad.chat`: an OpenAI-compatible
API, bounded concurrency and the client's retries, or a local model).

Cache: `<cache_dir>/judge_cache.jsonl`, one JSON line per finished request, a journal like
collect's output (`gad.journal`: appended with write + flush + fsync, a torn last line is cut on
start, locked while a run uses it):

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

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gad.api import api_errors, chat
from gad.api.chat import Messages
from gad.config import load as cfg
from gad.config.load import JudgeConfig
from gad.core.progress import Bar
from gad.data import journal


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


# ---------------------------------------------------------------- chat client and cache


def identity(config: JudgeConfig) -> dict[str, str]:
    """Who judges, as cache keys and results name it: backend, model, prompt template."""
    return {"backend": config.backend, "model": config.model, "template": TEMPLATE_VERSION}


def make_backend(config: JudgeConfig) -> chat.Client:
    """The judge's chat client (`gad.chat`, configured like the teacher's); locally, asking
    again is a fresh sample, so a retried unparsable verdict is not the same text again."""
    return chat.connect(config, error=JudgeError, seeding="per_batch")


def cache_key(identity: dict[str, str], kind: str, question: Messages, answers: list[str]) -> str:
    """sha256 of the judge identity, the request kind, the question and the answers in order."""
    blob = json.dumps(
        {"judge": identity, "kind": kind, "question": question, "answers": answers},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class Cache:
    """The judge's journal of finished requests (`gad.journal`); the last entry of a key wins."""

    FILE = "judge_cache.jsonl"

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / self.FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        busy = "another `gad judge` is using this cache"
        self._journal = journal.Journal(self.path, busy=busy, error=JudgeError)
        try:
            self.entries: dict[str, dict[str, Any]] = self._journal.load()
        except BaseException:
            self._journal.close()
            raise

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, entry: dict[str, Any]) -> None:
        self._journal.append(entry)
        self.entries[entry["id"]] = entry

    def close(self) -> None:
        self._journal.close()


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

    def __init__(self, backend: chat.Client, cache: Cache, config: JudgeConfig) -> None:
        self.backend = backend
        self.cache = cache
        self.config = config
        self.identity = identity(config)
        self.cache_hits = 0
        self.progress: Bar | None = None
        """The progress bar that `judge` sets (None: no bar)."""

    def _ask(self, conversations: list[Messages], budget: str, on_reply: chat.OnReply) -> None:
        """Send `conversations` with the answer budget of the setting named `budget`."""
        sampling = chat.Sampling(
            temperature=self.config.temperature,
            max_response_tokens=getattr(self.config, budget),
        )
        try:
            self.backend.complete(conversations, sampling, self._counted(on_reply))
        except chat.Refused as err:
            change = api_errors.what_to_change(err, self.config.api_key_env, budget)
            raise JudgeError(
                f"the judge API stopped the run: HTTP {err.status}: {err.message} (every "
                f"request would get this); change {change} and rerun. Finished judgements are "
                "cached.",
                exit_code=cfg.EXIT_NOTHING_PRODUCED,
            ) from None

    def _counted(self, on_reply: chat.OnReply) -> chat.OnReply:
        """`on_reply` that also moves the progress bar (one per request, not a log line)."""

        def counted(i: int, reply: chat.Reply) -> None:
            on_reply(i, reply)
            if self.progress is not None:
                self.progress.advance()

        return counted

    def references(self, questions: list[Messages]) -> list[dict[str, Any]]:
        """The judge's reference answer for each question (`status` ok, or error)."""
        keys = [cache_key(self.identity, "reference", q, []) for q in questions]
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

        def done(i: int, reply: chat.Reply) -> None:
            key = todo[i][0]
            if reply.text is None:
                out[key] = {"status": "error", "error": reply.error}
                return
            entry = self._entry(key, "reference", "ok", reply.text, None, [reply.text])
            self.cache.put(entry)
            out[key] = entry

        self._ask([q for _, q in todo], "max_response_tokens", done)
        return [out[key] for key in keys]

    def verdicts(self, items: list[tuple[Messages, str, str]]) -> list[dict[str, Any]]:
        """Settle every (question, answer_1, answer_2): cached, parsed, failed or error."""
        verdicts = [
            _Verdict(q, a1, a2, cache_key(self.identity, "verdict", q, [a1, a2]))
            for q, a1, a2 in items
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

            def done(i: int, reply: chat.Reply, batch: list[_Verdict] = batch, last: bool = last):
                v, text = batch[i], reply.text
                if text is None:
                    v.result = {"status": "error", "error": reply.error}
                    return
                texts = raw.setdefault(v.key, [])
                texts.append(text)
                scores = parse_scores(text)
                if scores is not None:
                    v.result = self._entry(v.key, "verdict", "ok", text, list(scores), texts)
                    self.cache.put(v.result)
                elif last:
                    v.result = self._entry(v.key, "verdict", "failed", text, None, texts)
                    self.cache.put(v.result)

            messages = [rating_messages(v.question, v.answer_1, v.answer_2) for v in batch]
            self._ask(messages, "verdict_max_tokens", done)
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
            "judge": self.identity,
            "status": status,
            "text": text,
            "scores": scores,
            "raw": list(texts),
        }
