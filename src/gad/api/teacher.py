"""Teacher answers for a prompt file, collected exactly once and resumably.

`collect(config)` sends every prompt to the teacher, an OpenAI-compatible chat-completions API
(`backend="openai"`) or a local model (`backend="local"`), both through `gad.chat`, and appends
each answer to `config.output` as a chat record the moment it arrives:

    {"id", "messages": prompt + [assistant answer],
     "meta": {...the prompt's meta, "prompt_id", "sample", "finish_reason",
              "completion_tokens", "teacher"}}

The id is the prompt's id when `n == 1`, else `f"{prompt_id}#{k}"` for sample k.

The output is the journal (`gad.journal`). Every line is written with write + flush + fsync
before the next is started, so a run killed at any moment leaves complete records plus at most
one torn last line. On start that torn line is cut off (and logged), the ids already present are
skipped, and the rest is collected: killing and rerunning the same command loses and duplicates
nothing.

Failures file `<output>.failures.jsonl` (see `failures_path`): one line per output id that could
not be collected, `{"id", "prompt_id", "sample", "error"}`. It is a journal too: a failure is
appended as it happens, and the file is rewritten atomically at start (after reconciling) and at
the end of a run. Reconciling means: an id present in the output is never a failure, and for an
id listed twice the last entry wins. So after any complete run (or any start) it lists exactly
the ids still failing; if a run is killed it may hold superseded entries until the next start.
With `retry_failed=True` (default) earlier failures are retried; with False they are kept as
they are, not retried, and still counted as failed. The file is removed when nothing fails.

Retries (openai backend) are the official client's own, with its backoff and `Retry-After`, and
an unusable 200 body is retried like a dropped connection: see `gad.chat`. What this module adds:
it counts attempts for the summary, records a request that still fails in the failures file and
goes on, and stops the run on errors that no prompt can fix (bad key, no permission, unknown
model, the same 400 for every first request: `gad.api_errors`), naming the setting to change.
A `Retry-After` above 120 s makes the client give up at once; such a prompt lands in the
failures file and is retried by the next run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gad.api import api_errors, chat
from gad.config import load as cfg
from gad.config.load import CollectConfig
from gad.core.progress import Bar
from gad.data import chats, evalsets, journal

log = logging.getLogger(__name__)


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
    record: chats.Record
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


def make_jobs(records: Iterable[chats.Record], n: int) -> list[Job]:
    """Every (prompt, sample) pair, in file order; output ids must not collide."""
    jobs, seen = [], set()
    for record in records:
        for k in range(n):
            job = Job(output_id(record.id, k, n), record, k)
            if job.id in seen:
                raise chats.DataError(
                    f"output id '{job.id}' is produced twice (a prompt id containing '#k' "
                    f"collides with sample k of another prompt); rename one of the prompts"
                )
            seen.add(job.id)
            jobs.append(job)
    return jobs


# ---------------------------------------------------------------- the run's writer


class _Recorder:
    """The single writer of the output and failures journals, and the run's counters.

    Every write happens synchronously in the one thread that drives the run (the chat client
    calls back from its event loop, with no await between a line's write and its fsync), so
    lines from concurrent requests never interleave.
    """

    def __init__(
        self,
        config: CollectConfig,
        out: journal.Journal,
        fail: journal.Journal,
        summary: CollectSummary,
        failures: dict[str, dict],
        bar: Bar,
    ) -> None:
        self.config = config
        self.out = out
        self.fail = fail
        self.summary = summary
        self.failures = failures
        self.bar = bar

    def reply(self, job: Job, reply: chat.Reply) -> None:
        if reply.text is None:
            self.summary.prompt_too_long += int(reply.prompt_too_long)
            self.failed(job, reply.error or "no answer")
        else:
            self.done(job, reply)

    def done(self, job: Job, reply: chat.Reply) -> None:
        meta = {
            **job.record.meta,
            "prompt_id": job.record.id,
            "sample": job.sample,
            "finish_reason": reply.finish_reason,
            "completion_tokens": reply.completion_tokens,
            "teacher": self.config.model,
        }
        messages = job.record.prompt + [{"role": "assistant", "content": reply.text}]
        self.out.append({"id": job.id, "messages": messages, "meta": meta})
        # Written to the output, so no longer failing even if an earlier run said so; the file
        # itself is reconciled at the end (or at the next start).
        self.failures.pop(job.id, None)
        self.summary.done += 1
        self.summary.prompt_tokens += reply.prompt_tokens or 0
        self.summary.completion_tokens += reply.completion_tokens or 0
        self.bar.advance()

    def failed(self, job: Job, error: str) -> None:
        entry = {"id": job.id, "prompt_id": job.record.id, "sample": job.sample, "error": error}
        self.fail.append(entry)
        self.failures[job.id] = entry
        self.bar.advance(note=f"failed={len(self.failures)}")


def _save_failures(fail: journal.Journal, failures: dict[str, dict]) -> None:
    if failures:
        fail.rewrite(failures.values())
    else:
        fail.close()
        fail.path.unlink(missing_ok=True)


def _ask(config: CollectConfig, jobs: list[Job], recorder: _Recorder) -> None:
    """Every job's answer from the teacher, each recorded the moment it arrives."""
    client = chat.connect(config, error=TeacherError)
    sampling = chat.Sampling(
        temperature=config.temperature,
        top_p=config.top_p,
        max_response_tokens=config.max_response_tokens,
    )
    try:
        client.complete(
            [job.record.prompt for job in jobs],
            sampling,
            lambda i, reply: recorder.reply(jobs[i], reply),
        )
    except chat.Refused as err:
        done = recorder.summary.done
        change = api_errors.what_to_change(err, config.api_key_env, "max_response_tokens")
        raise TeacherError(
            f"the teacher API stopped the run: HTTP {err.status}: {err.message} (every request "
            f"would get this); change {change} and rerun. {done} records written by this run "
            f"are kept; the failed ones are in {failures_path(config.output)}",
            exit_code=cfg.EXIT_SOME_FAILED if done else cfg.EXIT_NOTHING_PRODUCED,
        ) from None
    finally:
        recorder.summary.requests += client.requests
        recorder.summary.retried += client.retried


# ---------------------------------------------------------------- entry point


def collect(config: CollectConfig, *, progress: bool = True) -> CollectSummary:
    """Collect the teacher's answers to `config.prompts` into `config.output`; see the module doc.

    Returns (and prints, and writes as `<output stem>.summary.json`) what was done. Raises
    `chats.DataError` for a malformed prompt file and `TeacherError` when the run cannot go on.
    """
    started = time.monotonic()
    if config.backend == "openai":
        chat.api_key(config.api_key_env, TeacherError)
    if config.n < 1:
        raise cfg.ConfigError(f"'n' must be at least 1, got {config.n}")
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    loaded = evalsets.records_of(config.prompts, "prompts", skip_invalid=config.skip_invalid)
    for reason in loaded.skipped:
        log.warning("skipped invalid prompt record: %s", reason)
    records = loaded.records if config.limit is None else loaded.records[: config.limit]
    evalsets.refuse_overlap(records, config.exclude, config.prompts)
    jobs = make_jobs(records, config.n)

    summary = CollectSummary(output=str(output), skipped_invalid=len(loaded.skipped))
    # The output's lock is held from before the journals are read until the run ends; it
    # covers the failures file too.
    busy = "another `gad collect` is writing this output"
    with journal.Journal(output, busy=busy, error=TeacherError) as out:
        cfg.save(config, _beside(output, ".config.yaml"))
        fail = journal.Journal(failures_path(output), error=TeacherError)
        todo, failures = _resume(jobs, out, fail, summary, config.retry_failed)
        bar = Bar(f"collect ({config.backend})", len(todo), "rec", progress)
        try:
            if todo:  # else do not load a model or open a client for nothing
                _ask(config, todo, _Recorder(config, out, fail, summary, failures, bar))
        finally:
            bar.close()
            _save_failures(fail, failures)

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
    common = commonest_error(str(e.get("error")) for e in failures.values())
    _print_summary(summary, failures_path(output), common)
    return summary


def _resume(
    jobs: list[Job],
    out: journal.Journal,
    fail: journal.Journal,
    summary: CollectSummary,
    retry_failed: bool,
) -> tuple[list[Job], dict[str, dict]]:
    """The jobs still to do and the reconciled failures, from what earlier runs left."""
    done_ids = out.load(lambda obj: None).keys()
    if out.lines != len(done_ids):
        log.warning("%s: holds %d duplicate ids", out.path, out.lines - len(done_ids))
    earlier = fail.load()
    summary.repaired_bytes = out.repaired + fail.repaired
    # Reconcile: the last entry of an id wins, and an id in the output is not failing.
    failures = {key: e for key, e in earlier.items() if key not in done_ids}
    _save_failures(fail, failures)
    todo = [
        job for job in jobs if job.id not in done_ids and (retry_failed or job.id not in failures)
    ]
    summary.already_done = sum(job.id in done_ids for job in jobs)
    retrying = {job.id for job in todo} & failures.keys()
    if retrying:
        log.info("retrying %d ids that failed in an earlier run", len(retrying))
    return todo, failures


def commonest_error(errors: Iterable[str]) -> tuple[str, int] | None:
    """The error text most failures share, and how many: the server's reason, on the terminal
    and not only inside the failures file."""
    counts = Counter(errors)
    return counts.most_common(1)[0] if counts else None


def _print_summary(
    summary: CollectSummary, fail_path: Path, common: tuple[str, int] | None
) -> None:
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
        if common:
            text, count = common
            console.print(f"[yellow]most common error ({count} of {summary.failed}): {text}")
