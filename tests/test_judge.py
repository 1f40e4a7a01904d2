"""LLM-as-judge: parsing, single-mode scores and CIs, retries, cache, pairwise swapping, local."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from fake_openai import FakeOpenAI, Fault

from gad.api import judge as J
from gad.api import rating as R

KEY = "sk-test-judge-SECRET"


def write_answers(path, answers: dict[str, str], *, with_meta: bool = False) -> str:
    """Chat records `{id: answer}`; the question of id q is `question q`."""
    with open(path, "w") as f:
        for qid, answer in answers.items():
            record = {
                "id": f"{qid}#0" if with_meta else qid,
                "messages": [
                    {"role": "user", "content": f"question {qid}"},
                    {"role": "assistant", "content": answer},
                ],
            }
            if with_meta:
                record["meta"] = {"prompt_id": qid, "sample": 0}
            f.write(json.dumps(record) + "\n")
    return str(path)


def parts(request: dict) -> tuple[str, str, str] | None:
    """(question, answer_1, answer_2) of a rating request, None for a reference request."""
    messages = request["messages"]
    if messages[0]["role"] != "system" or messages[0]["content"] != R.RATING_SYSTEM:
        return None
    text = messages[1]["content"]
    m = re.search(
        r"\[User request\]\n(.*?)\n\n\[Assistant 1's answer\]\n(.*?)\n\n"
        r"\[Assistant 2's answer\]\n(.*?)\n\nReply in this format",
        text,
        re.S,
    )
    assert m is not None, text
    return m.group(1), m.group(2), m.group(3)


def config(tmp_path, answers: str, server: FakeOpenAI, **kw) -> J.JudgeConfig:
    defaults = dict(
        answers=answers,
        output=str(tmp_path / "results.json"),
        cache_dir=str(tmp_path / "cache"),
        backend="openai",
        model="fake-judge",
        base_url=server.url,
        api_key_env="GAD_TEST_JUDGE_KEY",
        max_retries=0,
        concurrency=4,
        bootstrap=500,
        seed=3,
    )
    defaults.update(kw)
    return J.JudgeConfig(**defaults)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("GAD_TEST_JUDGE_KEY", KEY)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8 6\nThe first is better.", (8, 6)),
        ("8, 6", (8, 6)),
        ("  7\t3  \n", (7, 3)),
        ("8.5 6.25\nok", (8.5, 6.25)),
        ("[[9, 2]]", (9, 2)),
        ("**7 4**\nreason", (7, 4)),
        ("8/10 and 6/10", (8, 6)),
        ("Assistant 1: 8, Assistant 2: 6", (8, 6)),
        ("Assistant 1: 8\nAssistant 2: 6\nBecause...", (8, 6)),
        ("Assistant A: 3 out of 10\nAssistant B: 10 out of 10", (3, 10)),
        ("Scores:\n9 5\nexplanation", (9, 5)),
        ("10 1", (10, 1)),
    ],
)
def test_parse_scores_accepts(text, expected):
    assert R.parse_scores(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Both answers are fine.",
        "8",
        "8\nthe second one is weak",
        "8 6 4",
        "0 5",
        "11 3",
        "Assistant 1 is better than Assistant 2.",
        "version 1.2.3 and 4.5.6",
        "I cannot rate this.\n8 6",
    ],
)
def test_parse_scores_rejects(text):
    assert R.parse_scores(text) is None


def test_pairwise_outcome_rule():
    assert J.pairwise_outcome((8, 6), (8, 6)) == "tie"  # pure position bias
    assert J.pairwise_outcome((4, 9), (9, 4)) == "lose"  # B preferred in both orders
    assert J.pairwise_outcome((9, 4), (4, 9)) == "win"
    assert J.pairwise_outcome((7, 6), (8, 8)) == "win"  # A 7+8=15 > B 6+8=14
    assert J.pairwise_outcome((8, 6), (7, 7)) == "win"  # A 8+7=15 > B 6+7=13


# ---------------------------------------------------------------- single mode

VERDICTS = {
    "q1": "9 6\nThe reference is more complete.",
    "q2": "Assistant 1: 8\nAssistant 2: 4\nThe candidate misses the point.",
    "q3": "**7, 7**\nEqually good.",
    "q4": "8.5/10 and 5.5/10\nClose.",
    "q5": "9 10\nThe candidate is better.",
}


def scripted(verdicts: dict[str, str], calls: dict[str, int] | None = None):
    """Reference requests -> `REF(<question>)`; rating requests -> the question's script."""

    def respond(request: dict) -> str:
        got = parts(request)
        if got is None:
            return f"REF({request['messages'][-1]['content']})"
        question, ref, _ = got
        assert ref == f"REF({question})"  # the judge's own reference is Assistant 1
        qid = question.split()[-1]
        if calls is not None:
            calls[qid] = calls.get(qid, 0) + 1
        script = verdicts[qid]
        if isinstance(script, list):  # one text per attempt
            return script[min(calls[qid], len(script)) - 1]
        return script

    return respond


def expected_ci(cand, ref, resamples, seed, confidence=0.95):
    """The documented bootstrap, written out independently."""
    c, r = np.array(cand, float), np.array(ref, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(c), size=(resamples, len(c)))
    means = c[idx].mean(axis=1)
    rel = 100 * c[idx].sum(axis=1) / (c[idx].sum(axis=1) + r[idx].sum(axis=1))
    lo, hi = 2.5, 97.5
    return [np.percentile(means, lo), np.percentile(means, hi)], [
        np.percentile(rel, lo),
        np.percentile(rel, hi),
    ]


def test_single_scores_relative_ci_and_cache(tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", {q: f"candidate {q}" for q in VERDICTS})
    with FakeOpenAI(responder=scripted(VERDICTS)) as server:
        cfg = config(tmp_path, answers, server)
        result = J.judge(cfg, quiet=True)
        first_requests = len(server.completions())
        again = J.judge(cfg, quiet=True)
        assert len(server.completions()) == first_requests  # cache: zero new requests
    assert first_requests == 10  # 5 references + 5 verdicts
    s = result["summary"]
    ref = [9, 8, 7, 8.5, 9]
    cand = [6, 4, 7, 5.5, 10]
    assert s["scored"] == 5 and s["failed"] == 0 and s["errors"] == 0
    assert s["mean_candidate"] == pytest.approx(np.mean(cand), abs=1e-4)
    assert s["mean_reference"] == pytest.approx(np.mean(ref), abs=1e-4)
    assert s["relative"] == pytest.approx(100 * 32.5 / (32.5 + 41.5), abs=1e-4)
    mean_ci, rel_ci = expected_ci(cand, ref, 500, 3)
    assert s["mean_candidate_ci"] == pytest.approx(mean_ci, abs=1e-4)
    assert s["relative_ci"] == pytest.approx(rel_ci, abs=1e-4)
    assert s["mean_candidate_ci"][0] <= s["mean_candidate"] <= s["mean_candidate_ci"][1]
    assert s["relative_ci"][0] <= s["relative"] <= s["relative_ci"][1]
    rows = {r["id"]: r for r in result["questions"]}
    assert rows["q2"]["reference_score"] == 8 and rows["q2"]["candidate_score"] == 4
    assert rows["q2"]["verdict"] == VERDICTS["q2"]
    assert rows["q1"]["reference"] == "REF(question q1)"
    # The second run answers from the cache alone, with identical results.
    assert again["summary"]["requests"] == 0 and again["summary"]["cache_hits"] == 10
    assert again["questions"] == result["questions"]
    assert (
        json.loads((tmp_path / "results.json").read_text())["summary"]["relative"]
        == (again["summary"]["relative"])
    )
    # The key is never written anywhere.
    for path in [tmp_path / "results.json", *(tmp_path / "cache").iterdir()]:
        assert KEY not in path.read_text()


def test_degenerate_ci_equals_the_value(tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", {f"q{i}": "same" for i in range(4)})
    with FakeOpenAI(responder=lambda r: "REF" if parts(r) is None else "8 6\nok") as server:
        s = J.judge(config(tmp_path, answers, server), quiet=True)["summary"]
    assert s["mean_candidate"] == 6 and s["mean_candidate_ci"] == [6, 6]
    assert s["relative"] == pytest.approx(100 * 6 / 14, abs=1e-4)
    assert s["relative_ci"] == [pytest.approx(100 * 6 / 14, abs=1e-4)] * 2


def test_unparsable_verdicts_are_retried_then_recorded_failed(tmp_path):
    verdicts = {
        "q1": "9 6\nfine",
        "q2": ["Both answers are good.", "7 5\nsecond try parses"],
        "q3": ["I refuse.", "Hmm, 8 6 4 points", "No scores, sorry."],
    }
    calls: dict[str, int] = {}
    answers = write_answers(tmp_path / "a.jsonl", {q: f"cand {q}" for q in verdicts})
    with FakeOpenAI(responder=scripted(verdicts, calls)) as server:
        cfg = config(tmp_path, answers, server, attempts=3)
        result = J.judge(cfg, quiet=True)
        n = len(server.completions())
        again = J.judge(cfg, quiet=True)  # failed verdicts are cached: no new request
        assert len(server.completions()) == n
    assert calls == {"q1": 1, "q2": 2, "q3": 3}
    rows = {r["id"]: r for r in result["questions"]}
    assert rows["q2"]["status"] == "ok" and rows["q2"]["attempts"] == 2
    assert rows["q2"]["candidate_score"] == 5
    q3 = rows["q3"]
    assert q3["status"] == "failed" and "candidate_score" not in q3
    assert q3["raw"] == verdicts["q3"]
    s = result["summary"]
    assert s["failed"] == 1 and s["scored"] == 2
    assert s["mean_candidate"] == pytest.approx(5.5)  # (6 + 5) / 2: the failure is not scored
    assert again["summary"]["failed"] == 1 and again["summary"]["requests"] == 0

    # retry_failed asks the cached failure again (and only it).
    verdicts["q3"] = "6 3\nnow it parses"
    with FakeOpenAI(responder=scripted(verdicts, {})) as server:
        cfg = config(tmp_path, answers, server, retry_failed=True)
        third = J.judge(cfg, quiet=True)
        assert len(server.completions()) == 1
    assert third["summary"]["failed"] == 0 and third["summary"]["scored"] == 3


def test_transport_errors_are_not_cached(tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", {q: f"c {q}" for q in ("q1", "q2")})
    faults = {"question q2": [Fault(500)]}  # the reference request of q2 fails once
    with FakeOpenAI(responder=scripted(VERDICTS), faults=faults) as server:
        cfg = config(tmp_path, answers, server)
        first = J.judge(cfg, quiet=True)
        assert first["summary"]["errors"] == 1 and first["summary"]["scored"] == 1
        row = {r["id"]: r for r in first["questions"]}["q2"]
        assert row["status"] == "error" and "500" in row["error"]
        n = len(server.completions())
        second = J.judge(cfg, quiet=True)
        assert len(server.completions()) == n + 2  # q2's reference and verdict only
    assert second["summary"]["errors"] == 0 and second["summary"]["scored"] == 2


def test_questions_file_and_prompt_id_matching(tmp_path):
    answers = write_answers(
        tmp_path / "a.jsonl", {q: f"c {q}" for q in ("q1", "q2", "q3")}, with_meta=True
    )
    questions = write_answers(tmp_path / "q.jsonl", {"q3": "x", "q1": "x", "q9": "x"})
    with FakeOpenAI(responder=scripted(VERDICTS)) as server:
        result = J.judge(config(tmp_path, answers, server, questions=questions), quiet=True)
    assert [r["prompt_id"] for r in result["questions"]] == ["q3", "q1"]
    assert [r["id"] for r in result["questions"]] == ["q3#0", "q1#0"]
    assert result["summary"]["missing"] == 1


def test_rejected_key_stops_the_run_without_leaking_it(tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", {"q1": "c"})
    faults = {"question q1": [Fault(401, echo_auth=True)]}
    with FakeOpenAI(faults=faults) as server, pytest.raises(J.JudgeError) as err:
        J.judge(config(tmp_path, answers, server), quiet=True)
    assert "401" in str(err.value) and KEY not in str(err.value)


def test_summary_tables_print(tmp_path, capsys):
    answers = write_answers(tmp_path / "a.jsonl", {"q1": "c"})
    with FakeOpenAI(responder=lambda r: "R" if parts(r) is None else "8 6") as server:
        J.judge(config(tmp_path, answers, server), quiet=False)
        J.judge(config(tmp_path, answers, server, baseline=answers), quiet=False)
    out = capsys.readouterr().out
    assert "relative score" in out and "42.86" in out and "A ties" in out


def test_missing_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("GAD_TEST_JUDGE_KEY")
    answers = write_answers(tmp_path / "a.jsonl", {"q1": "c"})
    with FakeOpenAI() as server, pytest.raises(J.JudgeError, match="GAD_TEST_JUDGE_KEY"):
        J.judge(config(tmp_path, answers, server), quiet=True)


# ---------------------------------------------------------------- pairwise mode


def pairwise_run(tmp_path, responder, n=3):
    a = write_answers(tmp_path / "a.jsonl", {f"q{i}": f"A-answer {i}" for i in range(n)})
    b = write_answers(tmp_path / "b.jsonl", {f"q{i}": f"B-answer {i}" for i in range(n)})
    with FakeOpenAI(responder=responder) as server:
        result = J.judge(config(tmp_path, a, server, baseline=b), quiet=True)
        bodies = [r.body for r in server.completions()]
    return result, bodies


def test_pairwise_position_bias_gives_ties(tmp_path):
    result, bodies = pairwise_run(tmp_path, lambda r: "8 6\nThe first one is better.")
    s = result["summary"]
    assert (s["win"], s["tie"], s["lose"]) == (0, 3, 0)
    assert s["tie_rate"] == 1.0 and s["position_consistent"] == 0
    # Both orders were asked, and no reference answer was requested.
    orders = {(parts(b)[1][0], parts(b)[2][0]) for b in bodies}
    assert orders == {("A", "B"), ("B", "A")} and len(bodies) == 6


def test_pairwise_judge_preferring_b_gives_b_wins(tmp_path):
    def prefer_b(request):
        _, first, _ = parts(request)
        return "3 9\nsecond is better" if first.startswith("A") else "9 3\nfirst is better"

    result, _ = pairwise_run(tmp_path, prefer_b)
    s = result["summary"]
    assert (s["win"], s["tie"], s["lose"]) == (0, 0, 3)
    assert s["lose_rate"] == 1.0 and s["position_consistent"] == 3
    row = result["questions"][0]
    assert row["outcome"] == "lose" and row["score_a"] == 6 and row["score_b"] == 18


def test_pairwise_failed_order_is_not_counted(tmp_path):
    def respond(request):
        question, first, _ = parts(request)
        if question.endswith("q0") and first.startswith("B"):
            return "no idea"
        return "9 3" if first.startswith("A") else "3 9"  # prefers A in both orders

    result, _ = pairwise_run(tmp_path, respond)
    s = result["summary"]
    assert (s["win"], s["tie"], s["lose"], s["failed"]) == (2, 0, 0, 1)
    row = result["questions"][0]
    assert row["status"] == "failed" and "outcome" not in row
    assert row["b_first"]["raw"] == ["no idea"] * 3


# ---------------------------------------------------------------- local backend


def test_local_backend_records_garbage_as_failures(tmp_path, tiny_dir):
    answers = write_answers(tmp_path / "a.jsonl", {"q1": "c1", "q2": "c2"})
    cfg = J.JudgeConfig(
        answers=answers,
        output=str(tmp_path / "results.json"),
        cache_dir=str(tmp_path / "cache"),
        backend="local",
        model=str(tiny_dir),
        max_response_tokens=6,
        verdict_max_tokens=6,
        attempts=2,
        bootstrap=50,
    )
    result = J.judge(cfg, quiet=True)
    s = result["summary"]
    assert s["questions"] == 2 and s["errors"] == 0
    for row in result["questions"]:
        assert row["status"] in ("ok", "failed")
        if row["status"] == "failed":
            assert len(row["raw"]) == 2 and "candidate_score" not in row
            assert all(R.parse_scores(t) is None for t in row["raw"])
        else:
            assert R.parse_scores(row["verdict"]) is not None
    assert s["failed"] + s["scored"] == 2
    assert s["failed"] == 2  # a random-init model does not write two scores
    again = J.judge(cfg, quiet=True)
    assert again["summary"]["requests"] == 0


# ---------------------------------------------------------------- API faults and a kill


def test_unusable_200s_are_retried_and_sigkill_restart_redoes_nothing(tmp_path):
    """Every kind of API fault on references and verdicts, a SIGKILL in the middle, a restart:
    every question is in the results once (scored, or an error with its reason), and no
    request the killed run had cached is sent again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fake_openai import BODY_FAULTS

    count = 24
    qids = [f"q{i}" for i in range(count)]
    answers = write_answers(tmp_path / "a.jsonl", {q: f"cand {q}" for q in qids})
    kinds = [*BODY_FAULTS, "drop"]

    def key(body: dict) -> str:
        got = parts(body)
        if got is None:
            return "R " + body["messages"][-1]["content"].split()[-1]
        return "V " + got[0].split()[-1]

    faults = {
        f"{side} q{i}": [Fault(kind=kinds[(i + (side == "V")) % len(kinds)])]
        for i in range(0, count, 2)
        for side in ("R", "V")
    }
    faults["R q7"] = [Fault(kind="html")] * 100  # never recovers: an error, with its reason

    def respond(request: dict) -> str:
        got = parts(request)
        return f"REF({request['messages'][-1]['content']})" if got is None else "8 6\nok"

    with FakeOpenAI(responder=respond, faults=faults, key=key, latency=0.1) as server:
        cache = tmp_path / "cache" / R.Cache.FILE
        command = [
            sys.executable,
            "-m",
            "gad",
            "judge",
            answers,
            "--output",
            str(tmp_path / "results.json"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--model",
            "fake-judge",
            "--base-url",
            server.url,
            "--api-key-env",
            "GAD_TEST_JUDGE_KEY",
            "--max-retries",
            "2",
            "--concurrency",
            "4",
            "--bootstrap",
            "50",
        ]
        env = {**os.environ, "GAD_TEST_JUDGE_KEY": KEY}
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 60
            while not cache.exists() or cache.read_bytes().count(b"\n") < 8:
                assert proc.poll() is None, "the judge ended before it could be killed"
                assert time.monotonic() < deadline, "the judge made no progress"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        cached_at_kill = cache.read_bytes().count(b"\n")
        assert cached_at_kill < 2 * (count - 1), "killed too late to test anything"
        time.sleep(0.5)
        mark = len(server.requests)
        rerun = subprocess.run(command, env=env, capture_output=True, text=True)
        # 3: every question but q7 was scored, q7 is listed as an error (README, exit codes).
        assert rerun.returncode == 3, rerun.stderr[-2000:]
        asked_again = [r for r in server.requests[mark:] if r.outcome == "ok"]

    entries = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len({e["id"] for e in entries}) == len(entries) == 2 * (count - 1)  # q7: neither
    assert len(asked_again) == len(entries) - cached_at_kill, "a finished request was redone"
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["questions"]
    assert sorted(r["id"] for r in rows) == sorted(qids)  # every question once
    statuses = {r["id"]: r["status"] for r in rows}
    assert statuses.pop("q7") == "error" and set(statuses.values()) == {"ok"}
    q7 = next(r for r in rows if r["id"] == "q7")
    assert "MalformedResponse: HTTP 200 with an HTML page" in q7["error"]
    assert result["summary"]["scored"] == count - 1 and result["summary"]["errors"] == 1
