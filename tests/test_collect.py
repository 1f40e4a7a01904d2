"""`gad collect`: faults and retries, kill-and-resume exactly once, key secrecy, local backend."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import BODY_FAULTS, FakeOpenAI, Fault

from gad.api import teacher
from gad.config import load as cfg
from gad.data import chats

KEY = "sk-test-SECRET-123"
KEY_ENV = "GAD_TEST_TEACHER_KEY"


def question(i: int) -> str:
    return f"question {i}"


def write_prompts(path: Path, count: int) -> Path:
    with open(path, "w") as f:
        for i in range(count):
            messages = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": question(i)},
            ]
            if i == 0:
                # A full chat record: its old answer is not part of the prompt.
                messages.append({"role": "assistant", "content": "an old answer"})
            f.write(json.dumps({"id": f"q{i}", "messages": messages, "meta": {"src": i}}) + "\n")
    return path


def make_config(tmp_path: Path, server: FakeOpenAI | None, **overrides) -> cfg.CollectConfig:
    values = dict(
        prompts=str(tmp_path / "prompts.jsonl"),
        output=str(tmp_path / "out" / "teacher.jsonl"),
        backend="openai",
        model="fake-teacher",
        base_url=server.url if server else None,
        api_key_env=KEY_ENV,
        concurrency=4,
        max_retries=3,
        # Generous: a spurious timeout on a loaded machine would add a retry to the counts.
        request_timeout=2.0,
    )
    values.update(overrides)
    return cfg.build(cfg.CollectConfig, values, "test")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def ids_of(path: Path) -> list[str]:
    return [r["id"] for r in read_lines(path)] if Path(path).exists() else []


def check_record(record: dict, i: int) -> None:
    """A record holds exactly prompt i (without any old answer) plus the server's answer."""
    assert record["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": question(i)},
        {"role": "assistant", "content": f"Answer to: {question(i)}"},
    ]
    meta = record["meta"]
    assert meta["src"] == i and meta["prompt_id"] == f"q{i}" and meta["teacher"] == "fake-teacher"
    assert meta["finish_reason"] == "stop" and meta["completion_tokens"] == 4


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


# ---------------------------------------------------------------- faults and retries


def test_faults_retries_and_failures_file(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 10)
    always = [Fault(500, retry_after_ms=20)] * 100
    faults = {
        question(1): [Fault(429, retry_after=0.9)],  # longer than any first backoff (<=0.5)
        question(2): [Fault(500), Fault(503)],  # no Retry-After: the client's own backoff
        question(3): [Fault(kind="hang", hang_s=4.0)],  # longer than request_timeout
        question(4): [Fault(kind="drop")],
        question(5): always,
        question(6): [Fault(429, retry_after_ms=700)],
        question(7): [Fault(400)],  # not retryable: fails at once
    }
    attempts = {1: 2, 2: 3, 3: 2, 4: 2, 5: 4, 6: 2, 7: 1}
    with FakeOpenAI(faults=faults) as server:
        config = make_config(tmp_path, server, request_timeout=1.0)
        summary = teacher.collect(config, progress=False)

        out, fail_file = Path(config.output), teacher.failures_path(config.output)
        done = ids_of(out)
        failed = ids_of(fail_file)
        assert sorted(done) == sorted(f"q{i}" for i in range(10) if i not in (5, 7))
        assert sorted(failed) == ["q5", "q7"]
        for record in read_lines(out):
            check_record(record, int(record["id"][1:]))
        errors = {f["id"]: f["error"] for f in read_lines(fail_file)}
        assert errors["q5"].startswith("InternalServerError: ")
        assert errors["q7"].startswith("BadRequestError: ")
        assert {f["prompt_id"] for f in read_lines(fail_file)} == {"q5", "q7"}

        for i in range(10):
            assert len(server.requests_for(question(i))) == attempts.get(i, 1), i
        assert summary.retried == sum(a - 1 for a in attempts.values()) == 9
        assert summary.requests == sum(attempts.get(i, 1) for i in range(10))
        assert (summary.done, summary.failed, summary.already_done) == (8, 2, 0)
        for i, wait in ((1, 0.9), (6, 0.7)):
            first, second = server.requests_for(question(i))
            assert first.outcome == "status 429"
            assert second.received - first.finished >= wait, "Retry-After not honoured"

        saved = json.loads(out.with_name("teacher.summary.json").read_text())
        assert saved["failed"] == 2 and saved["retried"] == 9
        assert cfg.load(cfg.CollectConfig, out.with_name("teacher.config.yaml")) == config

        # Rerun without retrying failures: nothing is sent, the failures stay.
        before = len(server.requests)
        summary = teacher.collect(dataclasses.replace(config, retry_failed=False), progress=False)
        assert len(server.requests) == before
        assert (summary.done, summary.already_done, summary.failed) == (0, 8, 2)
        assert summary.failed_not_retried == 2
        assert sorted(ids_of(fail_file)) == ["q5", "q7"]

        # Default rerun: only the two failures are retried; once the server recovers they are
        # written, and the failures file goes away.
        server.faults = {}
        summary = teacher.collect(config, progress=False)
        assert [r.key for r in server.requests[before:]] in (
            [question(5), question(7)],
            [question(7), question(5)],
        )
        assert (summary.done, summary.already_done, summary.failed) == (2, 8, 0)
        assert sorted(ids_of(out)) == sorted(f"q{i}" for i in range(10))
        assert not fail_file.exists()


def test_unusable_200_bodies_are_retried_like_a_5xx(tmp_path):
    """A 200 that is no usable completion is a transient fault: retried with the client's
    backoff, then recorded with its reason, and the run goes on."""
    kinds = list(BODY_FAULTS)
    write_prompts(tmp_path / "prompts.jsonl", len(kinds) + 3)
    faults = {question(i): [Fault(kind=kind)] for i, kind in enumerate(kinds)}
    faults[question(len(kinds))] = [Fault(500)]  # the yardstick: a plain 5xx, once
    faults[question(len(kinds) + 1)] = [Fault(kind="html")] * 10  # never recovers
    with FakeOpenAI(faults=faults) as server:
        config = make_config(tmp_path, server, max_retries=2)
        summary = teacher.collect(config, progress=False)
    out, fail_file = Path(config.output), teacher.failures_path(config.output)
    always = f"q{len(kinds) + 1}"
    assert sorted(ids_of(out)) == sorted(
        f"q{i}" for i in range(len(kinds) + 3) if i != i_of(always)
    )
    for record in read_lines(out):
        check_record(record, int(record["id"][1:]))
    (failure,) = read_lines(fail_file)
    assert failure["id"] == always
    assert failure["error"].startswith("MalformedResponse: HTTP 200 with an HTML page")
    for i, kind in enumerate([*kinds, "status 500"]):
        first, second = server.requests_for(question(i))
        assert first.outcome == kind and second.outcome == "ok"
        # The SDK's first backoff: 0.5 s less up to 25% jitter, as for the 5xx.
        assert second.received - first.finished >= 0.35, kind
    assert [r.outcome for r in server.requests_for(question(len(kinds) + 1))] == ["html"] * 3
    assert summary.retried == len(kinds) + 1 + 2
    assert (summary.done, summary.failed) == (len(kinds) + 2, 1)


def i_of(record_id: str) -> int:
    return int(record_id[1:])


def test_failures_journal_reconciled_on_start(tmp_path):
    """Superseded or torn failure entries (a killed run) are cleaned up at the next start."""
    write_prompts(tmp_path / "prompts.jsonl", 3)
    config = make_config(tmp_path, None)
    out, fail_file = Path(config.output), teacher.failures_path(config.output)
    out.parent.mkdir(parents=True)
    record = {"id": "q0", "messages": [{"role": "user", "content": "x"}], "meta": {}}
    out.write_text(json.dumps(record) + "\n")
    stale = [
        {"id": "q0", "prompt_id": "q0", "sample": 0, "error": "old"},  # done since
        {"id": "q1", "prompt_id": "q1", "sample": 0, "error": "first"},
        {"id": "q1", "prompt_id": "q1", "sample": 0, "error": "second"},
        {"id": "zz", "prompt_id": "zz", "sample": 0, "error": "not in these prompts"},
    ]
    fail_file.write_text("".join(json.dumps(e) + "\n" for e in stale) + '{"id": "q2", "pro')
    with FakeOpenAI(faults={question(1): [Fault(400)]}) as server:
        summary = teacher.collect(make_config(tmp_path, server), progress=False)
    assert sorted(ids_of(out)) == ["q0", "q2"]
    entries = read_lines(fail_file)
    assert sorted(e["id"] for e in entries) == ["q1", "zz"]
    assert next(e for e in entries if e["id"] == "q1")["error"].startswith("BadRequestError")
    assert (summary.failed, summary.failed_not_retried, summary.done) == (2, 1, 1)


# ---------------------------------------------------------------- kill and resume


def gad_collect_command(config: cfg.CollectConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gad",
        "collect",
        config.prompts,
        "--output",
        config.output,
        "--backend",
        "openai",
        "--model",
        config.model,
        "--base-url",
        str(config.base_url),
        "--api-key-env",
        KEY_ENV,
        "--concurrency",
        str(config.concurrency),
        "--request-timeout",
        "5",
    ]


def complete_ids(path: Path) -> list[str]:
    """Ids of the complete lines (a torn last line is not a record)."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]  # the piece after the last newline is torn
    return [json.loads(line)["id"] for line in lines]


def start_then_kill(command: list[str], env: dict, out: Path, at_least: int) -> set[str]:
    """Run `command`, SIGKILL it once `out` holds `at_least` complete records; the ids that
    were complete when it died."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(complete_ids(out)) < at_least:
            assert proc.poll() is None, "the collection ended before it could be killed"
            assert time.monotonic() < deadline, "the collection made no progress"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return set(complete_ids(out))


def test_sigkill_midway_then_restart_is_exactly_once(tmp_path):
    count = 48
    write_prompts(tmp_path / "prompts.jsonl", count)
    with FakeOpenAI(latency=0.2) as server:
        config = make_config(tmp_path, server, concurrency=4)
        out = Path(config.output)
        env = {**os.environ, KEY_ENV: KEY}
        done_before = start_then_kill(gad_collect_command(config), env, out, at_least=8)
        assert 8 <= len(done_before) < count, "killed too late to test anything"
        # Let the server finish logging what the killed process had sent (some of it cut off
        # mid-request), so that everything after `mark` comes from the restart.
        time.sleep(0.5)
        mark = len(server.requests)

        rerun = subprocess.run(gad_collect_command(config), env=env, capture_output=True)
        assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]

        summary = json.loads(out.with_name("teacher.summary.json").read_text())
        assert summary["already_done"] == len(done_before)
        assert summary["done"] == count - len(done_before)
        records = read_lines(out)
        final_ids = [r["id"] for r in records]
        assert len(final_ids) == len(set(final_ids)) == count, "lost or duplicated records"
        for record in records:
            check_record(record, int(record["id"][1:]))
        # The restart asked only for what was missing, each once.
        asked = [r.key for r in server.requests[mark:]]
        assert len(asked) == len(set(asked))
        assert set(asked) == {question(i) for i in range(count)} - {
            question(int(i[1:])) for i in done_before
        }

        # The same ids as a clean, uninterrupted run.
        clean = teacher.collect(
            make_config(tmp_path, server, output=str(tmp_path / "clean" / "teacher.jsonl")),
            progress=False,
        )
        assert clean.done == count
        assert sorted(ids_of(tmp_path / "clean" / "teacher.jsonl")) == sorted(final_ids)


def test_sigkill_amid_api_faults_then_restart_is_exactly_once(tmp_path):
    """Every kind of API fault, a SIGKILL in the middle, a restart: every prompt ends exactly
    once in the output or the failures file, and nothing finished is asked again."""
    count = 40
    write_prompts(tmp_path / "prompts.jsonl", count)
    kinds = [*BODY_FAULTS, "drop", "status"]
    faults = {
        question(i): [
            Fault(503) if kinds[i % len(kinds)] == "status" else Fault(kind=kinds[i % len(kinds)])
        ]
        for i in range(0, count, 2)
    }
    hopeless = {question(5), question(33)}
    for key in hopeless:
        faults[key] = [Fault(kind="no_content")] * 100
    with FakeOpenAI(latency=0.15, faults=faults) as server:
        config = make_config(tmp_path, server, concurrency=4)
        out, fail_file = Path(config.output), teacher.failures_path(config.output)
        command = gad_collect_command(config) + ["--max-retries", "2"]
        env = {**os.environ, KEY_ENV: KEY}
        done_before = start_then_kill(command, env, out, at_least=10)
        assert 10 <= len(done_before) < count, "killed too late to test anything"
        time.sleep(0.5)
        mark = len(server.requests)

        rerun = subprocess.run(command, env=env, capture_output=True)
        assert rerun.returncode == 3, rerun.stderr.decode()[-2000:]  # 3: some still fail

        done, failed = ids_of(out), ids_of(fail_file)
        assert len(done) == len(set(done)) and len(failed) == len(set(failed)), "duplicated"
        assert sorted(done + failed) == sorted(f"q{i}" for i in range(count)), "lost"
        assert {question(i_of(i)) for i in failed} == hopeless
        assert all("no content in the first choice" in e["error"] for e in read_lines(fail_file))
        for record in read_lines(out):
            check_record(record, i_of(record["id"]))
        redone = {r.key for r in server.requests[mark:]} & {question(i_of(i)) for i in done_before}
        assert not redone, f"finished prompts asked again: {sorted(redone)}"
        injected = sum(1 for r in server.requests if r.outcome not in ("ok", ""))
        assert injected >= count // 2  # the faults were served (some before the kill)


@pytest.mark.parametrize(
    "torn",
    [b'{"id": "q2", "messages": [{"ro', b"\x00\x00\x00\x00", b'{"id": "q2", "mess\n'],
    ids=["no-newline", "zeros", "invalid-json-line"],
)
def test_half_written_last_line_is_repaired(tmp_path, torn, caplog):
    write_prompts(tmp_path / "prompts.jsonl", 4)
    config = make_config(tmp_path, None)
    out = Path(config.output)
    out.parent.mkdir(parents=True)
    # Two finished records with content the server would never give: they must be kept as is.
    kept = [
        {"id": f"q{i}", "messages": [{"role": "user", "content": f"kept {i}"}], "meta": {}}
        for i in range(2)
    ]
    out.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in kept) + torn)
    with FakeOpenAI() as server, caplog.at_level(logging.WARNING, logger="gad.teacher"):
        summary = teacher.collect(make_config(tmp_path, server), progress=False)
    assert "half-written last line" in caplog.text
    assert summary.repaired_bytes == len(torn)
    assert sorted(r.key for r in server.requests) == [question(2), question(3)]
    records = read_lines(out)  # every line parses again
    assert records[:2] == kept
    assert sorted(r["id"] for r in records) == ["q0", "q1", "q2", "q3"]


def test_damage_before_good_records_is_not_silently_dropped(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 2)
    config = make_config(tmp_path, None, base_url="http://127.0.0.1:9/v1")
    out = Path(config.output)
    out.parent.mkdir(parents=True)
    good = json.dumps({"id": "q1", "messages": [{"role": "user", "content": "x"}]})
    out.write_text("not json\n" + good + "\n")
    with pytest.raises(teacher.TeacherError, match=r"teacher\.jsonl:1: not a valid JSON record"):
        teacher.collect(config, progress=False)
    assert out.read_text() == "not json\n" + good + "\n"


def test_second_run_on_the_same_output_is_refused(tmp_path):
    import fcntl

    write_prompts(tmp_path / "prompts.jsonl", 1)
    config = make_config(tmp_path, None)
    Path(config.output).parent.mkdir(parents=True)
    with open(config.output, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a running collection holds it
        with pytest.raises(teacher.TeacherError, match="another `gad collect`"):
            teacher.collect(config, progress=False)


# ---------------------------------------------------------------- the key stays secret


def test_api_key_never_written_or_printed(tmp_path, capfd, caplog):
    write_prompts(tmp_path / "prompts.jsonl", 4)
    # A careless server echoes the Authorization header into an error body.
    faults = {question(1): [Fault(400, echo_auth=True)] * 5, question(2): [Fault(503)]}
    with FakeOpenAI(faults=faults) as server, caplog.at_level(logging.DEBUG):
        config = make_config(tmp_path, server)
        summary = teacher.collect(config, progress=True)
        assert summary.failed == 1
        env = {**os.environ, KEY_ENV: KEY, "OPENAI_LOG": "debug"}
        rerun = subprocess.run(gad_collect_command(config), env=env, capture_output=True)
        assert rerun.returncode == 3  # q1 still fails: the CLI's "some failed" exit code
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests)

    error = read_lines(teacher.failures_path(config.output))[0]["error"]
    assert "you sent Authorization: Bearer ***" in error  # the echo happened, redacted
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {
        "teacher.jsonl",
        "teacher.jsonl.failures.jsonl",
        "teacher.config.yaml",
        "teacher.summary.json",
    }
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, caplog.text, rerun.stdout, rerun.stderr):
        text = text.decode() if isinstance(text, bytes) else text
        assert KEY not in text
    assert "done this run" in captured.out  # the summary was printed


def test_missing_key_names_the_variable(tmp_path, monkeypatch):
    write_prompts(tmp_path / "prompts.jsonl", 1)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(teacher.TeacherError, match=KEY_ENV):
        teacher.collect(make_config(tmp_path, None), progress=False)


# ---------------------------------------------------------------- bad input and limits


def test_malformed_prompt_line(tmp_path):
    path = write_prompts(tmp_path / "prompts.jsonl", 3)
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({"id": "bad", "messages": [{"role": "user", "content": 5}]})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(chats.DataError, match=r"prompts\.jsonl:2: field 'messages\[0\]\.content'"):
        teacher.collect(make_config(tmp_path, None), progress=False)

    with FakeOpenAI() as server:
        config = make_config(tmp_path, server, skip_invalid=True)
        summary = teacher.collect(config, progress=False)
    assert summary.skipped_invalid == 1 and summary.done == 2
    assert sorted(ids_of(Path(config.output))) == ["q0", "q2"]


def test_limit_and_n_samples(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 5)
    with FakeOpenAI() as server:
        config = make_config(tmp_path, server, limit=2, n=3)
        summary = teacher.collect(config, progress=False)
    records = read_lines(Path(config.output))
    assert sorted(r["id"] for r in records) == [f"q{i}#{k}" for i in range(2) for k in range(3)]
    assert all(r["meta"]["sample"] == int(r["id"][-1]) for r in records)
    assert summary.done == 6 and len(server.requests) == 6


# ---------------------------------------------------------------- local backend


def test_local_backend_tiny_model(tmp_path, tiny_dir):
    write_prompts(tmp_path / "prompts.jsonl", 3)
    with open(tmp_path / "prompts.jsonl", "a") as f:
        long = " ".join(["word"] * 400)
        f.write(json.dumps({"id": "long", "messages": [{"role": "user", "content": long}]}) + "\n")
    config = make_config(
        tmp_path,
        None,
        backend="local",
        model=str(tiny_dir),
        n=2,
        max_response_tokens=8,
        generation_batch_size=4,
        max_prompt_tokens=100,
    )
    summary = teacher.collect(config, progress=False)
    records = read_lines(Path(config.output))
    assert sorted(r["id"] for r in records) == [f"q{i}#{k}" for i in range(3) for k in range(2)]
    for record in records:
        meta = record["meta"]
        assert meta["finish_reason"] in ("stop", "length")
        assert 1 <= meta["completion_tokens"] <= 8
        assert meta["teacher"] == str(tiny_dir)
        assert record["messages"][-1]["role"] == "assistant"
        assert record["messages"][:-1] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": question(int(meta["prompt_id"][1:]))},
        ]
    failures = read_lines(teacher.failures_path(config.output))
    assert sorted(f["id"] for f in failures) == ["long#0", "long#1"]
    assert all(
        f["error"].startswith("prompt too long: ") and f["error"].endswith(" tokens > 100")
        for f in failures
    )
    assert (summary.done, summary.prompt_too_long, summary.failed) == (6, 2, 2)
    assert len(chats.read_records(config.output).records) == 6  # SFT-ready chat records

    again = teacher.collect(config, progress=False)
    assert (again.done, again.already_done, again.failed) == (0, 6, 2)
    assert len(read_lines(Path(config.output))) == 6
