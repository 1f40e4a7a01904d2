"""Errors every request would repeat stop a run (with the server's words and the setting to
change); one prompt's error stays that prompt's; exit codes tell all / some / nothing; the key
is redacted as a whole token; the terminal gets no log line per request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Fault

from gad.api import api_errors, teacher
from gad.config import load as cfg

KEY_ENV = "GAD_TEST_SERVER_KEY"
VLLM_MESSAGE = (
    "max_tokens=1536 cannot be greater than max_model_len=1024. Please request fewer output tokens."
)
# vLLM's exact error body for a request setting it refuses (HTTP 400).
VLLM_400 = {
    "object": "error",
    "message": VLLM_MESSAGE,
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}


def prompts(path: Path, count: int) -> Path:
    rows = [
        {"id": f"q{i}", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gad(*args: str, key: str = "x", timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, KEY_ENV: key, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "gad", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def collect_args(tmp_path: Path, server: FakeOpenAI, count: int, *extra: str) -> list[str]:
    return [
        "collect",
        str(prompts(tmp_path / "p.jsonl", count)),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--backend",
        "openai",
        "--model",
        "smol",
        "--base-url",
        server.url,
        "--api-key-env",
        KEY_ENV,
        "--max-retries",
        "0",
        *extra,
    ]


def every_request(fault: Fault, count: int) -> dict[str, list[Fault]]:
    return {f"q{i}": [fault] * 5 for i in range(count)}


def test_the_same_400_for_every_request_stops_collect_naming_the_setting(tmp_path):
    faults = every_request(Fault(400, body=VLLM_400), 20)
    with FakeOpenAI(faults=faults) as server:
        done = gad(*collect_args(tmp_path, server, 20, "--concurrency", "2"))
    sent = len(server.completions())
    assert done.returncode == cfg.EXIT_NOTHING_PRODUCED, done.stderr
    assert 3 <= sent <= 4  # the third identical 400 stops it; one more may be in flight
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert VLLM_MESSAGE in errors[0] and "max_response_tokens" in errors[0]
    assert "rerun the same command to retry" not in done.stdout
    # The requests that were in flight finished and are journaled, the key `x` redacted as a
    # whole token only.
    failed = [json.loads(line) for line in (tmp_path / "out.jsonl.failures.jsonl").open()]
    assert len(failed) == sent
    assert all("max_tokens=1536" in f["error"] and "max_model_len" in f["error"] for f in failed)


def test_the_same_400_stops_the_judge_before_a_table_of_nothing(tmp_path):
    answers = tmp_path / "a.jsonl"
    rows = [
        {
            "id": f"q{i}",
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "a"},
            ],
        }
        for i in range(8)
    ]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    faults = every_request(Fault(400, body=VLLM_400), 8)
    with FakeOpenAI(faults=faults) as server:
        done = gad(
            "judge",
            str(answers),
            "--backend",
            "openai",
            "--model",
            "smol",
            "--base-url",
            server.url,
            "--api-key-env",
            KEY_ENV,
            "--max-retries",
            "0",
            "--output",
            str(tmp_path / "judge.json"),
            "--cache-dir",
            str(tmp_path / "cache"),
        )
    assert done.returncode == cfg.EXIT_NOTHING_PRODUCED, done.stderr
    assert VLLM_MESSAGE in done.stderr and "max_response_tokens" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "judge.json").exists()


def test_a_400_for_one_prompt_stays_that_prompts_failure(tmp_path):
    too_long = {
        **VLLM_400,
        "message": "This model's maximum context length is 1024 tokens. However, you requested "
        "2100 tokens (1800 in the messages, 300 in the completion).",
    }
    # Concurrency 1: the failing prompt is the very first answer, and still not a stop.
    faults = {"q0": [Fault(400, body=too_long)] * 5}
    with FakeOpenAI(faults=faults) as server:
        done = gad(*collect_args(tmp_path, server, 4, "--concurrency", "1"))
    assert done.returncode == cfg.EXIT_SOME_FAILED, done.stderr
    assert len(server.completions()) == 4
    assert "maximum context length is 1024" in done.stdout  # the reason on the terminal
    failed = [json.loads(line) for line in (tmp_path / "out.jsonl.failures.jsonl").open()]
    assert [f["id"] for f in failed] == ["q0"]


def test_different_400s_at_the_start_are_each_prompts_own(tmp_path):
    faults = {
        f"q{i}": [Fault(400, body={**VLLM_400, "message": f"prompt {i} is bad"})] * 5
        for i in range(3)
    }
    with FakeOpenAI(faults=faults) as server:
        config = cfg.build(
            cfg.CollectConfig,
            {
                "prompts": str(prompts(tmp_path / "p.jsonl", 5)),
                "output": str(tmp_path / "out.jsonl"),
                "backend": "openai",
                "base_url": server.url,
                "api_key_env": KEY_ENV,
                "max_retries": 0,
                "concurrency": 1,
            },
            "test",
        )
        os.environ[KEY_ENV] = "x"
        try:
            summary = teacher.collect(config, progress=False)
        finally:
            del os.environ[KEY_ENV]
    assert (summary.done, summary.failed) == (2, 3)


@pytest.mark.parametrize(
    ("status", "names"), [(401, KEY_ENV), (403, KEY_ENV), (404, "`model` or `base_url`")]
)
def test_401_403_404_stop_at_the_first_answer(tmp_path, status, names):
    with FakeOpenAI(faults=every_request(Fault(status), 6)) as server:
        done = gad(*collect_args(tmp_path, server, 6, "--concurrency", "1"))
    assert done.returncode == cfg.EXIT_NOTHING_PRODUCED, done.stderr
    assert len(server.completions()) == 1
    assert f"HTTP {status}" in done.stderr and names in done.stderr
    assert "Traceback" not in done.stderr


def test_no_log_line_per_request_unless_verbose(tmp_path):
    with FakeOpenAI() as server:
        quiet = gad(*collect_args(tmp_path, server, 3))
        (tmp_path / "out.jsonl").unlink()
        loud = gad(*collect_args(tmp_path, server, 3, "--verbose"))
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "HTTP Request" not in quiet.stderr + quiet.stdout
    assert "HTTP Request: POST" in loud.stderr


def test_the_key_is_redacted_as_a_whole_token_only():
    text = "max_tokens=1536 > max_model_len; sent Authorization: Bearer x, key 'x'"
    assert api_errors.redact(text, "x") == (
        "max_tokens=1536 > max_model_len; sent Authorization: Bearer ***, key '***'"
    )
    assert api_errors.redact("EMPTY key EMPTY_KEY NONEMPTY", "EMPTY") == (
        "*** key EMPTY_KEY NONEMPTY"
    )
    long_key = "sk-proj-A1b2C3d4E5f6G7h8"
    echoed = f"Bearer {long_key} and, URL-encoded, Bearer%20{long_key}"
    assert long_key not in api_errors.redact(echoed, long_key)
    assert api_errors.redact(echoed, long_key).count("***") == 2


def test_a_long_key_echoed_by_the_server_never_reaches_a_file_or_the_terminal(tmp_path):
    long_key = "sk-proj-A1b2C3d4E5f6G7h8i9J0"
    with FakeOpenAI(faults={"q1": [Fault(400, echo_auth=True)] * 5}) as server:
        done = gad(*collect_args(tmp_path, server, 3), key=long_key)
    assert done.returncode == cfg.EXIT_SOME_FAILED, done.stderr
    assert long_key not in done.stdout + done.stderr
    for path in tmp_path.iterdir():
        assert long_key not in path.read_text(), path
    failed = (tmp_path / "out.jsonl.failures.jsonl").read_text()
    assert "Bearer ***" in failed
