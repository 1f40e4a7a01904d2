"""`gad label`: answer extractors, majority vote, labels from a scripted teacher server, judge
labels, ground-truth accuracy (`gad eval --metric accuracy`) and `gad tasks reasoning-gym`."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, last_user_content

from gad.api import label as L
from gad.api import rating
from gad.config import load as cfg
from gad.data import answers as A
from gad.data import chats, tasks
from gad.eval import run as eval_run

KEY_ENV = "GAD_TEST_LABEL_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-label")


# ---------------------------------------------------------------- extractors


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", "42"),
        ("42", "42"),
        # Distractor numbers in the reasoning: the stated answer wins.
        ("First 12 + 5 = 17, then 17 * 2 = 34. The answer is 34. (2 steps, 3 checks)", "34"),
        ("We add 3 apples and 4 pears: 3 + 4 = 7", "7"),
        ("The answer is: 3 + 4 = 7.", "7"),
        ("The answer is 42, which is 2 more than 40.", "42"),
        ("Answer:\n\n**42**\n\nI checked it 3 times.", "42"),
        ("Natalia sold 48 clips in April and half as many in May.\n#### 72", "72"),
        ("Step 1: 2 * 3 = 6\n#### 1,234", "1234"),
        ("So 3 - 15 = \\boxed{-12}, verified in 2 ways.", "-12"),
        ("Total cost: $1,200.50", "1200.5"),
        ("The final answer is 10.0", "10"),
        ("7-3=4", "4"),  # "-3" after a digit is an operator, not a negative number
        ("x = -5", "-5"),
        ("2 - -1 = 3", "3"),
        ("Calculate ( -9 / 9 ) = -1", "-1"),
        ("The result is 007", "7"),
        ("-0.0", "0"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert A.extract_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is (B).", "B"),
        ("B", "B"),
        ("C) Paris", "C"),
        ("(D)", "D"),
        ("Answer: **E**", "E"),
        ("I think option C is right.", "C"),
        ("Between (A) and (B), the better one is (B).", "B"),
        ("\\boxed{J}", "J"),
        ("A cat sat on the mat.", None),  # an article, not a choice
        ("the answer is a cat", None),
        ("I have no idea.", None),
    ],
)
def test_extract_choice(text, expected):
    assert A.extract_choice(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{ 1,000 }", "1000"),
        ("first \\boxed{3} then \\boxed{x^{2} + 1}", "x^{2}+1"),
        ("$\\boxed{\\left( 1, 2 \\right)}$", "(1,2)"),
        ("no box: 42", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_boxed(text, expected):
    assert A.extract_boxed(text) == expected


def test_truth_keys_use_the_extractor_form():
    assert A.truth_key(A.extract_number, "1,000") == "1000"
    assert A.truth_key(A.extract_choice, "B") == "B"
    assert A.truth_key(A.extract_boxed, "x^{2} + 1") == "x^{2}+1"


# ---------------------------------------------------------------- majority vote


def test_vote_majority_and_share_counts_abstentions():
    vote = A.majority_vote(["42", "42", "41", None], min_share=0.5)
    assert vote.status == "ok" and vote.label == "42"
    assert vote.share == 0.5 and vote.votes == {"42": 2, "41": 1}
    assert vote.samples == 4 and vote.abstained == 1
    # One answer out of four samples: share 0.25 because abstentions count against it.
    assert A.majority_vote(["3", None, None, None], 0.25).label == "3"
    assert A.majority_vote(["3", None, None, None], 0.3).status == "low_share"
    assert A.majority_vote(["7"], 0.9).share == 1.0


def test_vote_ties_are_set_aside_whatever_the_share():
    vote = A.majority_vote(["1", "2", "1", "2"], min_share=0.0)
    assert vote.status == "tie" and vote.label is None and vote.share == 0.5
    # Equal counts keep the order they were first seen in; the outcome never depends on it.
    assert list(vote.votes) == ["1", "2"]
    assert list(A.majority_vote(["2", "1", "2", "1"], 0.0).votes) == ["2", "1"]
    assert A.majority_vote(["5", "6", "7"], 0.0).status == "tie"
    # A tie below the leader does not matter.
    assert A.majority_vote(["5", "5", "6", "7"], 0.5).label == "5"


def test_vote_without_answers_and_threshold():
    vote = A.majority_vote([None, None], min_share=0.5)
    assert vote.status == "no_answer" and vote.share == 0.0 and vote.abstained == 2
    assert A.majority_vote([], 0.5).status == "no_answer"
    vote = A.majority_vote(["3", "3", "4", "5"], min_share=0.6)
    assert vote.status == "low_share" and vote.share == 0.5 and vote.label is None
    assert A.majority_vote(["3", "3", "4", "5"], min_share=0.5).status == "ok"


# ---------------------------------------------------------------- labels from a teacher server

SCRIPT = {
    # k = 4 teacher samples per prompt, served in sample order (concurrency 1).
    "q0": ["The answer is 42.", "42", "I think it is 41.", "So 40 + 2 = 42"],
    "q1": ["Answer: 7", "7-3=4 so 4", "The answer is 4.", "It is 4, I counted 3 times: 4"],
    "q2": ["1", "2", "1", "2"],  # tie
    "q3": ["no idea", "hmm", "?", "I cannot say"],  # no answer
    "q4": ["5", "5", "6", "7"],  # share 0.5 < 0.6
}
TRUTH = {"q0": "42", "q1": "5", "q2": "1", "q3": "9", "q4": "5"}


def scripted(script: dict[str, list[str]]):
    served: dict[str, int] = {}
    lock = threading.Lock()

    def respond(request: dict) -> str:
        key = last_user_content(request).split()[-1]
        with lock:
            k = served.get(key, 0)
            served[key] = k + 1
        return script[key][k % len(script[key])]

    return respond


def write_prompts(path: Path, ids: list[str]) -> Path:
    with open(path, "w") as f:
        for pid in ids:
            messages = [{"role": "user", "content": f"Please solve task {pid}"}]
            f.write(json.dumps({"id": pid, "messages": messages}) + "\n")
    return path


def label_config(tmp_path: Path, server: FakeOpenAI, **overrides) -> cfg.LabelConfig:
    values = dict(
        prompts=str(tmp_path / "prompts.jsonl"),
        output_dir=str(tmp_path / "label"),
        backend="openai",
        teacher="fake-teacher",
        base_url=server.url,
        api_key_env=KEY_ENV,
        concurrency=1,
        max_retries=0,
        k=4,
        min_vote_share=0.6,
        student=None,
    )
    values.update(overrides)
    return cfg.build(cfg.LabelConfig, values, "test")


def read_labels(tmp_path: Path) -> list[chats.Record]:
    return chats.read_records(tmp_path / "label" / "labels.jsonl").records


def test_labels_from_scripted_teacher(tmp_path, tiny_dir):
    write_prompts(tmp_path / "prompts.jsonl", list(SCRIPT))
    with FakeOpenAI(responder=scripted(SCRIPT)) as server:
        summary = L.run(
            label_config(
                tmp_path, server, student=str(tiny_dir), student_k=2, max_response_tokens=8
            )
        )
        requests = len(server.completions())
    assert requests == 20
    records = read_labels(tmp_path)
    teacher = {r.id: r for r in records if r.meta["source"] == "teacher"}
    expected = {
        "q0#t0": (1.0, "42"),
        "q0#t1": (1.0, "42"),
        "q0#t2": (0.0, "41"),
        "q0#t3": (1.0, "42"),
        "q1#t0": (0.0, "7"),
        "q1#t1": (1.0, "4"),
        "q1#t2": (1.0, "4"),
        "q1#t3": (1.0, "4"),
    }
    assert {k: (r.meta["label"], r.meta["extracted"]) for k, r in teacher.items()} == expected
    assert all(r.meta["good"] == (r.meta["label"] == 1.0) for r in records)
    q0 = teacher["q0#t0"].meta
    assert q0["pseudo_label"] == "42" and q0["vote_share"] == 0.75
    assert q0["votes"] == {"42": 3, "41": 1} and q0["abstained"] == 0
    assert teacher["q1#t2"].meta["vote_share"] == 0.75
    assert teacher["q1#t2"].messages[-1] == {"role": "assistant", "content": "The answer is 4."}
    assert teacher["q1#t2"].prompt == [{"role": "user", "content": "Please solve task q1"}]

    # Student samples (a tiny local model): two per kept prompt, labelled by the same rule.
    students = [r for r in records if r.meta["source"] == "student"]
    assert sorted(r.id for r in students) == ["q0#s0", "q0#s1", "q1#s0", "q1#s1"]
    for r in students:
        right = A.extract_number(r.response or "") == r.meta["pseudo_label"]
        assert r.meta["label"] == float(right) and r.meta["model"] == str(tiny_dir)

    assert summary.prompts == 5 and summary.labelled_prompts == 2
    assert summary.set_aside_prompts == 3
    assert (summary.set_aside_tie, summary.set_aside_no_answer, summary.set_aside_low_share) == (
        1,
        1,
        1,
    )
    assert summary.teacher_responses == 8 and summary.good_teacher == 6
    assert summary.student_responses == 4 and summary.missing_responses == 0
    aside = [json.loads(x) for x in (tmp_path / "label/set_aside.jsonl").read_text().splitlines()]
    assert {(e["id"], e["reason"], e["vote_share"]) for e in aside} == {
        ("q2", "tie", 0.5),
        ("q3", "no_answer", 0.0),
        ("q4", "low_share", 0.5),
    }
    saved = json.loads((tmp_path / "label/summary.json").read_text())
    assert saved["set_aside_prompts"] == 3 and saved["labelled_prompts"] == 2


def test_ground_truth_is_only_reported_and_rerun_asks_nothing(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", list(SCRIPT))
    truth = tmp_path / "truth.jsonl"
    truth.write_text("".join(json.dumps({"id": k, "answer": v}) + "\n" for k, v in TRUTH.items()))
    with FakeOpenAI(responder=scripted(SCRIPT)) as server:
        L.run(label_config(tmp_path, server))
        before = (tmp_path / "label/labels.jsonl").read_text()
        summary = L.run(label_config(tmp_path, server, ground_truth=str(truth)))
        assert len(server.completions()) == 20  # the second run collected nothing again
    assert (tmp_path / "label/labels.jsonl").read_text() == before  # truth changes no label
    assert summary.pseudo_label_accuracy == 0.5  # q0 right (42), q1 wrong (4 vs 5)
    # Teacher samples right against the truth: q0 3/4, q1 0/4, q2 2/4, q3 0/4, q4 2/4.
    assert summary.teacher_truth_accuracy == pytest.approx(7 / 20)
    # Labels agreeing with the truth: q0 all 4; q1 only sample 0 (labelled wrong, is wrong).
    assert summary.label_accuracy == pytest.approx(5 / 8)
    assert summary.truth_missing == 0


def test_bad_truth_file_fails_before_collection(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", ["q0"])
    (tmp_path / "truth.jsonl").write_text('{"id": "q0"}\n')
    with FakeOpenAI(responder=scripted(SCRIPT)) as server:
        with pytest.raises(chats.DataError, match=r"truth.jsonl:1: field 'answer'"):
            L.run(label_config(tmp_path, server, ground_truth=str(tmp_path / "truth.jsonl")))
        assert server.completions() == []


def test_open_ended_labels_from_the_judge(tmp_path):
    queue = iter(["a good answer", "a bad answer", "a garbage answer"])  # teacher samples

    def respond(request: dict) -> str:
        if request["messages"][0].get("content") == rating.RATING_SYSTEM:
            candidate = request["messages"][1]["content"].split("[Assistant 2's answer]\n")[1]
            if "good" in candidate:
                return "8 9\nThe second is better."
            if "bad" in candidate:
                return "8 2\nThe second is wrong."
            return "I refuse to give numbers."
        if request["temperature"] == 0:
            return "the judge's own reference"
        return next(queue)

    write_prompts(tmp_path / "prompts.jsonl", ["q0"])
    with FakeOpenAI(responder=respond) as server:
        summary = L.run(label_config(tmp_path, server, task="open", k=3, good_score=7))
    by_id = {r.id: r.meta for r in read_labels(tmp_path)}
    assert set(by_id) == {"q0#t0", "q0#t1"}
    assert (by_id["q0#t0"]["label"], by_id["q0#t0"]["good"]) == (9.0, True)
    assert (by_id["q0#t1"]["label"], by_id["q0#t1"]["good"]) == (2.0, False)
    assert by_id["q0#t0"]["judge"]["reference_score"] == 8
    assert by_id["q0#t0"]["label_kind"] == "judge"
    assert summary.judge_failed == 1 and summary.set_aside_prompts == 0
    aside = json.loads((tmp_path / "label/set_aside.jsonl").read_text())
    assert aside["id"] == "q0#2" and aside["reason"] == "judge_failed"


# ---------------------------------------------------------------- accuracy and tasks


def test_eval_accuracy_against_ground_truth(tmp_path):
    rows = [("p1", "The answer is 12."), ("p1", "13"), ("p2", "It is 1,000"), ("p3", "no idea")]
    with open(tmp_path / "answers.jsonl", "w") as f:
        for i, (pid, text) in enumerate(rows):
            messages = [{"role": "user", "content": pid}, {"role": "assistant", "content": text}]
            meta = {"prompt_id": pid, "completion_tokens": 3}
            f.write(json.dumps({"id": f"a{i}", "messages": messages, "meta": meta}) + "\n")
    truth = tmp_path / "truth.jsonl"
    truth.write_text(
        "".join(
            json.dumps({"id": k, "answer": v}) + "\n" for k, v in {"p1": "12", "p2": "1000"}.items()
        )
    )
    config = cfg.EvalConfig(
        answers=str(tmp_path / "answers.jsonl"),
        metric="accuracy",
        ground_truth=str(truth),
        bootstrap_reps=200,
    )
    result = eval_run.run_eval(config)
    assert result["metrics"]["accuracy"]["mean"] == pytest.approx(2 / 3)
    assert result["metrics"]["accuracy"]["n"] == 3
    assert result["metrics"]["answered_share"] == 0.75
    assert result["no_truth"] == 1
    with pytest.raises(cfg.ConfigError, match="ground_truth"):
        eval_run.run_eval(cfg.EvalConfig(answers=config.answers, metric="accuracy"))


def test_reasoning_gym_tasks_keep_the_truth_aside(tmp_path):
    import reasoning_gym

    config = cfg.TasksConfig(
        dataset="basic_arithmetic",
        size=6,
        seed=3,
        options="{min_terms: 2, max_terms: 3, max_digits: 2}",
        instruction=" End with: The answer is N.",
        output=str(tmp_path / "tasks.jsonl"),
    )
    prompts, truth = tasks.run(config)
    records = chats.read_records(prompts).records
    truths = [json.loads(line) for line in truth.read_text().splitlines()]
    expected = reasoning_gym.create_dataset(
        "basic_arithmetic", seed=3, size=6, min_terms=2, max_terms=3, max_digits=2
    )
    assert [r.id for r in records] == [t["id"] for t in truths]
    for i, (record, entry) in enumerate(zip(records, truths, strict=True)):
        assert record.prompt[0]["content"] == expected[i]["question"] + config.instruction
        assert entry["answer"] == expected[i]["answer"]
        assert "answer" not in json.dumps(record.meta)  # nothing of the truth in the prompts
    assert L.read_truth(truth)[records[0].id] == expected[0]["answer"]
    again = tasks.run(config)
    assert again[0].read_text() == prompts.read_text()  # same seed, same prompts
    with pytest.raises(cfg.ConfigError, match="takes min_terms"):
        tasks.run(cfg.TasksConfig(options="{bogus: 1}", output=str(tmp_path / "x.jsonl")))
    with pytest.raises(cfg.ConfigError, match="no dataset"):
        tasks.run(cfg.TasksConfig(dataset="nope", output=str(tmp_path / "x.jsonl")))


def test_cli_tasks_then_eval_accuracy(tmp_path):
    from typer.testing import CliRunner

    from gad.cli import app

    runner = CliRunner()
    out = tmp_path / "tasks.jsonl"
    result = runner.invoke(
        app,
        ["tasks", "reasoning-gym", "--dataset", "chain_sum", "--size", "3", "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    truth = tasks.truth_path(out)
    answers = tmp_path / "answers.jsonl"
    rows = []
    for record, entry in zip(
        chats.read_records(out).records, L.read_truth(truth).items(), strict=True
    ):
        text = f"The answer is {entry[1]}." if record.id.endswith("0") else "No idea."
        rows.append(
            chats.Record(record.id, record.prompt + [{"role": "assistant", "content": text}])
        )
    chats.write_records(answers, rows)
    result = runner.invoke(
        app, ["eval", str(answers), "--metric", "accuracy", "--ground-truth", str(truth)]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(answers.with_suffix(".eval.json").read_text())
    assert saved["metrics"]["accuracy"]["mean"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- API faults and a kill

LABEL_SCRIPT = """\
import json, sys
from gad.config import load as cfg
from gad.api import label
label.run(cfg.build(cfg.LabelConfig, json.loads(sys.argv[1]), "test"))
"""


def test_api_faults_and_sigkill_restart_label_each_sample_once(tmp_path):
    """Faulty 200s and drops on the teacher's samples, a SIGKILL in the middle of collecting,
    a restart: every sample ends once in the teacher output or its failures file, nothing
    finished is asked again, and the labels hold each collected sample once."""
    import signal
    import subprocess
    import sys
    import time

    from fake_openai import BODY_FAULTS, Fault

    ids = [f"q{i}" for i in range(10)]
    write_prompts(tmp_path / "prompts.jsonl", ids)
    kinds = [*BODY_FAULTS, "drop"]
    faults = {f"Please solve task q{i}": [Fault(kind=kinds[i % len(kinds)])] for i in range(9)}
    faults["Please solve task q9"] = [Fault(kind="truncated")] * 100  # never recovers
    script = tmp_path / "label_run.py"
    script.write_text(LABEL_SCRIPT)
    with FakeOpenAI(responder=lambda r: "The answer is 4.", faults=faults, latency=0.1) as server:
        values = cfg.to_dict(label_config(tmp_path, server, concurrency=4, max_retries=2))
        command = [sys.executable, str(script), json.dumps(values)]
        out = tmp_path / "label" / "teacher.jsonl"
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not out.exists() or out.read_bytes().count(b"\n") < 10:
                assert proc.poll() is None, "the labelling ended before it could be killed"
                assert time.monotonic() < deadline, "the labelling made no progress"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        lines = out.read_bytes().split(b"\n")[:-1]
        done_before = {json.loads(line)["id"] for line in lines}
        assert len(done_before) < 40, "killed too late to test anything"
        time.sleep(0.5)
        mark = len(server.requests)
        rerun = subprocess.run(command, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        ok_after = sum(r.outcome == "ok" for r in server.requests[mark:])

    def ids_in(path: Path) -> list[str]:
        return [json.loads(line)["id"] for line in path.read_text().splitlines()]

    done = ids_in(out)
    failed = ids_in(tmp_path / "label" / "teacher.jsonl.failures.jsonl")
    assert len(done) == len(set(done)) and len(failed) == len(set(failed)), "duplicated"
    assert sorted(done + failed) == sorted(f"{p}#{k}" for p in ids for k in range(4)), "lost"
    assert sorted(failed) == [f"q9#{k}" for k in range(4)]
    assert ok_after == len(done) - len(done_before), "a finished sample was asked again"
    labels = read_labels(tmp_path)
    assert sorted(r.id for r in labels) == sorted(f"{p}#t{k}" for p in ids[:9] for k in range(4))
    summary = json.loads((tmp_path / "label" / "summary.json").read_text())
    assert summary["missing_responses"] == 4 and summary["labelled_prompts"] == 9
