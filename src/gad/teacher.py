"""Teacher answers for a prompt file, collected exactly once and resumably.

`collect(config)` sends every prompt to the teacher, an OpenAI-compatible chat-completions API
(`backend="openai"`) or a local model (`backend="local"`), and appends each answer to
`config.output` as a chat record the moment it arrives:

    {"id", "messages": prompt + [assistant answer],
     "meta": {...the prompt's meta, "prompt_id", "sample", "finish_reason",
              "completion_tokens", "teacher"}}

The id is the prompt's id when `n == 1`, else `f"{prompt_id}#{k}"` for sample k.

The output is the journal. Every line is written with write + flush + fsync before the next is
started, so a run killed at any moment leaves complete records plus at most one torn last line.
On start that torn line is cut off (and logged), the ids already present are skipped, and the
rest is collected: killing and rerunning the same command loses and duplicates nothing.

Failures file `<output>.failures.jsonl` (see `failures_path`): one line per output id that could
not be collected, `{"id", "prompt_id", "sample", "error"}`. It is a journal too: a failure is
appended as it happens, and the file is rewritten atomically at start (after reconciling) and at
the end of a run. Reconciling means: an id present in the output is never a failure, and for an
id listed twice the last entry wins. So after any complete run (or any start) it lists exactly
the ids still failing; if a run is killed it may hold superseded entries until the next start.
With `retry_failed=True` (default) earlier failures are retried; with False they are kept as
they are, not retried, and still counted as failed. The file is removed when nothing fails.

Retries (openai backend) are the official client's own: `max_retries` attempts more on
408/409/429/5xx, timeouts and dropped connections, and on a 200 that is not a usable chat
completion (a body that is not JSON or is cut off, an HTML page, no choices, no content: see
`completion_problem`; such a response is turned into a transport error, so the client retries it
exactly like a dropped connection), waiting `retry-after-ms` / `Retry-After`
(seconds or HTTP date) when the server gives one of at most 120 s, else exponential backoff
0.5 s * 2^k capped at 8 s with up to 25% jitter. What this module adds: it counts attempts (an
httpx request hook) for the summary, records a request that still fails in the failures file
and goes on, and stops the run on errors that no prompt can fix (bad key, no permission,
unknown model). A `Retry-After` above 120 s makes the client give up at once; such a prompt
lands in the failures file and is retried by the next run.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

from gad import config as cfg
from gad import data, evalsets
from gad.config import CollectConfig

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 1000
"""Error texts in the failures file are cut to this length (an HTML error page can be huge)."""


class TeacherError(cfg.UserError, RuntimeError):
    """Collection cannot go on: missing key, rejected credentials, unknown model, bad journal."""


@dataclass
class CollectSummary:
    """What a `collect` run did; also written as `<output stem>.summary.json`."""

    output: str
    """The output file (chat records)."""
    done: int = 0
    """Records written by this run."""
    already_done: int = 0
    """Records of this run's prompts already in the output when it started (not redone)."""
    failed: int = 0
    """Ids still failing at the end: the lines of the failures file."""
    failed_not_retried: int = 0
    """Of `failed`, earlier failures not retried (`retry_failed=False` or not in these prompts)."""
    prompt_too_long: int = 0
    """Local backend: records not run because the templated prompt exceeds `max_prompt_tokens`."""
    retried: int = 0
    """Request attempts that were retries (openai backend)."""
    requests: int = 0
    """HTTP requests sent, retries included (openai) or sequences generated (local)."""
    skipped_invalid: int = 0
    """Malformed prompt records skipped (`skip_invalid=True`)."""
    repaired_bytes: int = 0
    """Bytes of a torn last line cut from the output (and failures file) at start."""
    prompt_tokens: int = 0
    """Prompt tokens of the records written by this run (as the teacher counted them)."""
    completion_tokens: int = 0
    """Completion tokens of the records written by this run."""
    seconds: float = 0.0
    """Wall time of the collection (loading the prompts included)."""
    requests_per_s: float = 0.0
    """`requests / seconds`."""
    records_per_s: float = 0.0
    """`done / seconds`."""


@dataclass(frozen=True)
class Job:
    """One output record to produce: sample `sample` of prompt record `record`."""

    id: str
    record: data.Record
    sample: int


def failures_path(output: str | Path) -> Path:
    """`<output>.failures.jsonl`: the ids that could not be collected, and why."""
    output = Path(output)
    return output.with_name(output.name + ".failures.jsonl")


def _beside(output: Path, suffix: str) -> Path:
    """`<output stem><suffix>` next to the output (config and summary files)."""
    return output.with_name(output.stem + suffix)


def output_id(prompt_id: str, sample: int, n: int) -> str:
    """The output record id of sample `sample` of a prompt, given `n` samples per prompt."""
    return prompt_id if n == 1 else f"{prompt_id}#{sample}"


def make_jobs(records: Iterable[data.Record], n: int) -> list[Job]:
    """Every (prompt, sample) pair, in file order; output ids must not collide."""
    jobs, seen = [], set()
    for record in records:
        for k in range(n):
            job = Job(output_id(record.id, k, n), record, k)
            if job.id in seen:
                raise data.DataError(
                    f"output id '{job.id}' is produced twice (a prompt id containing '#k' "
                    f"collides with sample k of another prompt); rename one of the prompts"
                )
            seen.add(job.id)
            jobs.append(job)
    return jobs


# ---------------------------------------------------------------- journals


def read_journal(path: Path, pick: Callable[[dict[str, Any]], Any]) -> tuple[list[Any], int]:
    """`pick(obj)` of every line of a JSONL journal, and how many torn-tail bytes were cut.

    Only the end of the file may be damaged (a write cut short by a kill or a crash): a last
    line without a newline, or trailing lines that are not JSON objects with an id. Those are
    truncated away in place. Damage followed by good lines is not a torn write, so it stops the
    run instead of silently losing records.
    """
    if not path.exists():
        return [], 0
    picked: list[Any] = []
    good_end = pos = 0
    first_bad: int | None = None
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            pos += len(line)
            obj = None
            if line.endswith(b"\n"):
                if not line.strip():
                    if first_bad is None:
                        good_end = pos
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    pass
            if isinstance(obj, dict) and "id" in obj:
                if first_bad is not None:
                    raise TeacherError(
                        f"{path}:{first_bad}: not a valid JSON record, but complete records "
                        f"follow it; fix or remove that line by hand (only a torn last line "
                        f"is repaired automatically)"
                    )
                picked.append(pick(obj))
                good_end = pos
            elif first_bad is None:
                first_bad = line_no
    cut = pos - good_end
    if cut:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
        log.warning(
            "%s: cut a half-written last line (%d bytes) left by an interrupted run", path, cut
        )
    return picked, cut


def _write_atomically(path: Path, lines: Iterable[dict[str, Any]]) -> None:
    """Replace `path` by `lines` so that a kill leaves either the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for obj in lines:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Journal:
    """The single writer of the output and failures files, and the run's counters.

    Every write happens synchronously in the one thread that drives the run (the event loop for
    the openai backend), with no await between a line's write and its fsync, so lines from
    concurrent requests never interleave.
    """

    def __init__(
        self,
        config: CollectConfig,
        out: IO[str],
        summary: CollectSummary,
        failures: dict[str, dict],
        bar: Any,
    ) -> None:
        self.config = config
        self.summary = summary
        self.failures = failures
        self.bar = bar
        self.secret = os.environ.get(config.api_key_env) if config.backend == "openai" else None
        self._out = out
        self._failures_file: IO[str] | None = None

    def done(
        self,
        job: Job,
        text: str,
        finish_reason: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        meta = {
            **job.record.meta,
            "prompt_id": job.record.id,
            "sample": job.sample,
            "finish_reason": finish_reason,
            "completion_tokens": completion_tokens,
            "teacher": self.config.model,
        }
        if self.secret and self.secret in text:
            # Only a server that echoes credentials gets here; the key must not reach a file.
            text = text.replace(self.secret, "***")
        messages = job.record.prompt + [{"role": "assistant", "content": text}]
        data.append_jsonl(self._out, {"id": job.id, "messages": messages, "meta": meta})
        # Written to the output, so no longer failing even if an earlier run said so; the file
        # itself is reconciled at the end (or at the next start).
        self.failures.pop(job.id, None)
        self.summary.done += 1
        self.summary.prompt_tokens += prompt_tokens or 0
        self.summary.completion_tokens += completion_tokens or 0
        self.bar.update(1)

    def failed(self, job: Job, error: str) -> None:
        if self.secret:
            error = error.replace(self.secret, "***")
        entry = {"id": job.id, "prompt_id": job.record.id, "sample": job.sample, "error": error}
        if self._failures_file is None:
            self._failures_file = open(failures_path(self.config.output), "a", encoding="utf-8")
        data.append_jsonl(self._failures_file, entry)
        self.failures[job.id] = entry
        self.bar.update(1)
        self.bar.set_postfix(failed=len(self.failures), refresh=False)

    def close(self) -> None:
        if self._failures_file is not None:
            self._failures_file.close()


def _lock(f: IO[str], path: Path) -> None:
    """Hold an exclusive lock on the output: two runs appending to it would duplicate records."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, run one collection per output
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        raise TeacherError(f"{path}: another `gad collect` is writing this output") from err


def _save_failures(path: Path, failures: dict[str, dict]) -> None:
    if failures:
        _write_atomically(path, failures.values())
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- openai backend

# Attempts of the request the current task is making; the httpx hook runs in the same task.
_attempts: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "gad_teacher_attempts", default=None
)


def _describe(err: BaseException) -> str:
    """`Type: message`, with the low-level cause of a connection error (else it says little)."""
    cause = err.__cause__
    if cause is not None and type(cause).__name__ == "MalformedResponse":
        return f"MalformedResponse: {cause}"[:MAX_ERROR_CHARS]
    text = f"{type(err).__name__}: {err}"
    if cause is not None and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text[:MAX_ERROR_CHARS]


def api_key(env_name: str, error: type[Exception]) -> str:
    """The API key from the environment variable `env_name`; `error` when it is missing."""
    key = os.environ.get(env_name, "")
    if not key:
        raise error(
            f"no API key: the environment variable {env_name} is not set or empty "
            f"(set it, or point `api_key_env` at the variable that holds the key)"
        )
    return key


def completion_problem(body: bytes) -> str | None:
    """What makes a 200 body unusable as a chat completion, or None when it is one: not JSON
    (cut off, an HTML page, garbage), not an object, no choices, or no text in the first."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        head = body[:200].decode("utf-8", "replace").strip()
        preview = " ".join(head.split())[:80]
        if head.startswith("<"):
            return f"an HTML page, not JSON ({preview!r})"
        if head.startswith("{"):
            return f"a body that is not valid JSON, cut off or garbled ({len(body)} bytes)"
        return f"a body that is not JSON ({len(body)} bytes: {preview!r})"
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not a completion object"
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        error = obj.get("error")
        if isinstance(error, dict) and error.get("message"):
            return f"an error object ({str(error['message'])[:200]})"
        return "no choices"
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        return f"no content in the first choice (finish_reason={reason})"
    if not isinstance(obj.get("usage"), dict | None):
        return "a malformed usage field"
    return None


@cache
def _malformed_type(http_error: type[Exception]) -> type[Exception]:
    """A subclass of the HTTP library's decoding error, which the SDK retries as it retries a
    dropped connection (same backoff) and finally raises as APIConnectionError from it."""
    return type("MalformedResponse", (http_error,), {"__module__": __name__})


def _http_library(client_type: type) -> Any:
    """The httpx-like module the SDK's HTTP client comes from (httpx, or httpx2 in newer SDKs)."""
    for base in client_type.__mro__:
        root = base.__module__.split(".")[0]
        if root.startswith("httpx"):
            return sys.modules[root]
    import httpx

    return httpx


def api_client(config: Any, key: str, on_request: Callable[[Any], Any]) -> Any:
    """AsyncOpenAI from a config with `base_url`, `max_retries` and `request_timeout`: the
    client's own retries and backoff, plus a hook called on every attempt (for counting) and
    one that makes an unusable 200 a retryable fault (see `completion_problem`)."""
    import openai

    http = _http_library(openai.DefaultAsyncHttpxClient)
    malformed = _malformed_type(http.DecodingError)

    async def check_completion(response: Any) -> None:
        path = response.request.url.path
        if response.status_code != 200 or not path.endswith("/chat/completions"):
            return
        # A body cut short of its Content-Length raises the library's own protocol error here,
        # which the SDK retries too.
        problem = completion_problem(await response.aread())
        if problem is not None:
            raise malformed(f"HTTP 200 with {problem}", request=response.request)

    hooks = {"request": [on_request], "response": [check_completion]}
    return openai.AsyncOpenAI(
        api_key=key,
        base_url=config.base_url,
        max_retries=config.max_retries,
        timeout=config.request_timeout,
        # The SDK's default client (its connection limits, redirects) plus the two hooks.
        http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks),
    )


def refusals() -> tuple[type[BaseException], ...]:
    """API errors that every other request would hit too (bad key, no access, unknown model):
    they stop a run instead of filling its failures with a configuration problem."""
    import openai

    return (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


async def run_pool(
    client: Any,
    items: Iterable[Any],
    ask: Callable[[Any], Any],
    concurrency: int,
    fatal: list[BaseException],
) -> None:
    """`await ask(item)` for every item with `concurrency` workers; once `fatal` holds an error,
    no further item is started."""
    pending = iter(items)  # shared by the workers; next() never awaits, so no item runs twice

    async def worker() -> None:
        for item in pending:
            if fatal:
                return
            await ask(item)

    async with client:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))


def _count(value: Any) -> int | None:
    """A token count as the server gave it, if it is one (servers are not all careful)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def _collect_openai(config: CollectConfig, jobs: list[Job], journal: _Journal) -> None:
    import openai

    key = api_key(config.api_key_env, TeacherError)
    summary = journal.summary

    async def count_attempt(request: Any) -> None:
        summary.requests += 1
        box = _attempts.get()
        if box is not None:
            box[0] += 1

    client = api_client(config, key, count_attempt)
    fatal: list[BaseException] = []

    async def ask(job: Job) -> None:
        box = [0]
        token = _attempts.set(box)
        try:
            # One request per sample (no `n`): every output id maps to its own request, which
            # keeps exactly-once bookkeeping trivial and works with servers that ignore `n`.
            response = await client.chat.completions.create(
                model=config.model,
                messages=job.record.prompt,  # type: ignore[arg-type]
                temperature=config.temperature,
                top_p=config.top_p,
                max_tokens=config.max_tokens,
            )
        except refusals() as err:
            fatal.append(err)
            return
        except openai.APIError as err:
            journal.failed(job, _describe(err))
            return
        finally:
            summary.retried += max(0, box[0] - 1)
            _attempts.reset(token)
        choice = response.choices[0] if response.choices else None
        text = choice.message.content if choice is not None else None
        if text is None:
            reason = choice.finish_reason if choice is not None else "no choices"
            journal.failed(job, f"EmptyAnswer: the response has no text (finish_reason={reason})")
            return
        usage = response.usage
        journal.done(
            job,
            text,
            choice.finish_reason or "stop",  # type: ignore[union-attr]
            _count(getattr(usage, "prompt_tokens", None)),
            _count(getattr(usage, "completion_tokens", None)),
        )

    await run_pool(client, jobs, ask, config.concurrency, fatal)
    if fatal:
        detail = _describe(fatal[0]).replace(key, "***") if key else _describe(fatal[0])
        raise TeacherError(
            f"the teacher API refused the run ({detail}); check base_url, model and the key "
            f"in ${config.api_key_env}. Finished records are kept; rerun to continue."
        )


# ---------------------------------------------------------------- local backend


def _collect_local(config: CollectConfig, jobs: list[Job], journal: _Journal) -> None:
    import torch

    from gad import models
    from gad.rollout import Sampling, TransformersRollout

    model, tokenizer = models.load(config.model, dtype=getattr(torch, config.dtype))
    rollout = TransformersRollout(model, tokenizer, batch_size=config.batch_size)
    sampling = Sampling(
        temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_tokens
    )
    encoded: dict[str, list[int]] = {}
    runnable: list[tuple[Job, list[int]]] = []
    for job in jobs:
        if job.record.id not in encoded:
            encoded[job.record.id] = data.encode_prompt(tokenizer, job.record.prompt)
        ids = encoded[job.record.id]
        if len(ids) > config.max_prompt_tokens:
            journal.summary.prompt_too_long += 1
            journal.failed(job, f"prompt too long: {len(ids)} tokens > {config.max_prompt_tokens}")
        else:
            runnable.append((job, ids))
    # Similar lengths in one batch waste less compute on padding.
    runnable.sort(key=lambda pair: len(pair[1]))
    torch.manual_seed(config.seed)
    for start in range(0, len(runnable), config.batch_size):
        batch = runnable[start : start + config.batch_size]
        completions = rollout.generate([ids for _, ids in batch], 1, sampling)
        journal.summary.requests += len(batch)
        for (job, ids), (completion,) in zip(batch, completions, strict=True):
            journal.done(
                job, completion.text, completion.finish_reason, len(ids), len(completion.token_ids)
            )


# ---------------------------------------------------------------- entry point


def _progress_bar(total: int, enabled: bool, initial_note: str) -> Any:
    from tqdm import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI).
    return tqdm(
        total=total,
        desc=initial_note,
        unit="rec",
        dynamic_ncols=True,
        disable=None if enabled else True,
    )


def collect(config: CollectConfig, *, progress: bool = True) -> CollectSummary:
    """Collect the teacher's answers to `config.prompts` into `config.output`; see the module doc.

    Returns (and prints, and writes as `<output stem>.summary.json`) what was done. Raises
    `data.DataError` for a malformed prompt file and `TeacherError` when the run cannot go on.
    """
    started = time.monotonic()
    if config.backend == "openai":
        api_key(config.api_key_env, TeacherError)
    if config.n < 1:
        raise cfg.ConfigError(f"'n' must be at least 1, got {config.n}")
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    loaded = data.read_records(config.prompts, skip_invalid=config.skip_invalid)
    for reason in loaded.skipped:
        log.warning("skipped invalid prompt record: %s", reason)
    records = loaded.records if config.limit is None else loaded.records[: config.limit]
    evalsets.refuse_overlap(records, config.exclude, config.prompts)
    jobs = make_jobs(records, config.n)

    summary = CollectSummary(output=str(output), skipped_invalid=len(loaded.skipped))
    # The lock is held (by this handle) from before the journal is read until the run ends.
    with open(output, "a", encoding="utf-8") as out:
        _lock(out, output)
        cfg.save(config, _beside(output, ".config.yaml"))
        done_list, cut = read_journal(output, lambda obj: str(obj["id"]))
        done_ids = set(done_list)
        if len(done_ids) != len(done_list):
            log.warning("%s: holds %d duplicate ids", output, len(done_list) - len(done_ids))
        fail_path = failures_path(output)
        earlier, fail_cut = read_journal(fail_path, lambda obj: obj)
        summary.repaired_bytes = cut + fail_cut
        # Reconcile: the last entry of an id wins, and an id in the output is not failing.
        failures = {str(e["id"]): e for e in earlier if str(e["id"]) not in done_ids}
        _save_failures(fail_path, failures)

        todo = [
            job
            for job in jobs
            if job.id not in done_ids and (config.retry_failed or job.id not in failures)
        ]
        summary.already_done = sum(job.id in done_ids for job in jobs)
        retrying = {job.id for job in todo} & failures.keys()
        if retrying:
            log.info("retrying %d ids that failed in an earlier run", len(retrying))

        bar = _progress_bar(len(todo), progress, f"collect ({config.backend})")
        journal = _Journal(config, out, summary, failures, bar)
        try:
            if not todo:
                pass  # nothing left: do not load a model or open a client for nothing
            elif config.backend == "openai":
                asyncio.run(_collect_openai(config, todo, journal))
            else:
                _collect_local(config, todo, journal)
        finally:
            journal.close()
            bar.close()
            _save_failures(fail_path, failures)

    todo_ids = {job.id for job in todo}
    summary.failed = len(failures)
    summary.failed_not_retried = sum(1 for i in failures if i not in todo_ids)
    summary.seconds = round(time.monotonic() - started, 3)
    if summary.seconds > 0:
        summary.requests_per_s = round(summary.requests / summary.seconds, 2)
        summary.records_per_s = round(summary.done / summary.seconds, 2)
    _beside(output, ".summary.json").write_text(
        json.dumps(dataclasses.asdict(summary), indent=2) + "\n"
    )
    _print_summary(summary, fail_path)
    return summary


def _print_summary(summary: CollectSummary, fail_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"collect -> {summary.output}", show_header=False)
    rows = [
        ("done this run", summary.done),
        ("already done", summary.already_done),
        ("failed (still failing)", summary.failed),
        ("  of which not retried", summary.failed_not_retried),
        ("  of which prompt too long", summary.prompt_too_long),
        ("retried attempts", summary.retried),
        ("skipped invalid prompts", summary.skipped_invalid),
        ("repaired torn bytes", summary.repaired_bytes),
        ("prompt tokens", summary.prompt_tokens),
        ("completion tokens", summary.completion_tokens),
        ("seconds", f"{summary.seconds:.1f}"),
        ("requests/s", f"{summary.requests_per_s:.2f}"),
        ("records/s", f"{summary.records_per_s:.2f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console = Console()
    console.print(table)
    if summary.failed:
        console.print(f"[yellow]failures listed in {fail_path}; rerun the same command to retry")
