import json

import pytest
from typer.testing import CliRunner

from gad.cli import app


def record(pid, answer, tokens, reason="stop"):
    return {
        "id": pid,
        "messages": [
            {"role": "user", "content": f"q {pid}"},
            {"role": "assistant", "content": answer},
        ],
        "meta": {"prompt_id": pid, "completion_tokens": tokens, "finish_reason": reason},
    }


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_writes_metrics_with_intervals_and_report_reads_them(tmp_path, tiny_dir):
    answers = write(
        tmp_path / "student.jsonl",
        [
            record("a", "the cat sat", 3),
            record("b", "a dog ran far", 4, "length"),
            record("c", "no teacher for this", 5),
        ],
    )
    reference = write(
        tmp_path / "teacher.jsonl",
        [
            record("a", "the cat sat", 3),
            record("b", "a cat ran", 3),
        ],
    )
    out = tmp_path / "student.eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(answers),
            "--reference",
            str(reference),
            "--teacher-model",
            str(tiny_dir),
            "--name",
            "student",
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    metrics = saved["metrics"]
    # Lengths in the teacher's tokens (the only tokenizer given), not the records' own counts.
    from gad.models.store import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    lengths = [
        len(tok(t, add_special_tokens=False)["input_ids"])
        for t in ("the cat sat", "a dog ran far", "no teacher for this")
    ]
    assert metrics["length_mean"]["mean"] == pytest.approx(sum(lengths) / 3)
    assert metrics["length_mean"]["n"] == 3 and saved["length_unit"].startswith("tokens (teacher")
    assert metrics["truncated_share"] == {"mean": 1 / 3, "n": 3}
    # ROUGE-L over the 2 matched answers: 1.0 (identical) and LCS "a ... ran" = 2 of 4 vs 3.
    expected_b = 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)
    assert abs(metrics["rouge_l"]["mean"] - (1.0 + expected_b) / 2) < 1e-9
    assert metrics["rouge_l"]["low"] <= metrics["rouge_l"]["mean"] <= metrics["rouge_l"]["high"]
    assert metrics["ngram_f1_1"]["n"] == 2
    assert metrics["teacher_logprob"]["mean"] < 0 and metrics["teacher_logprob"]["n"] == 3
    assert (saved["matched"], saved["unmatched_answers"], saved["unmatched_references"]) == (
        2,
        1,
        0,
    )
    assert "answers without a reference: 1" in result.output and "(n=2)" in result.output

    report = CliRunner().invoke(
        app, ["report", "--results", str(out), "--output-dir", str(tmp_path / "rep")]
    )
    assert report.exit_code == 0, report.output
    assert "| student |" in (tmp_path / "rep" / "report.md").read_text()


def test_generate_judge_eval_report_chain_with_a_local_judge(tmp_path, tiny_dir):
    """The evaluation path a user takes, offline: generate -> judge (local) -> eval -> report."""
    prompts = write(
        tmp_path / "set.jsonl",
        [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Say {i}."}]} for i in range(2)],
    )
    runner = CliRunner()
    gen = runner.invoke(
        app,
        [
            "generate",
            str(tiny_dir),
            "--prompts",
            str(prompts),
            "--output",
            str(tmp_path / "ans.jsonl"),
            "--max-response-tokens",
            "8",
        ],
    )
    assert gen.exit_code == 0, gen.output
    judged = runner.invoke(
        app,
        [
            "judge",
            str(tmp_path / "ans.jsonl"),
            "--backend",
            "local",
            "--model",
            str(tiny_dir),
            "--max-response-tokens",
            "8",
            "--verdict-max-tokens",
            "8",
            "--attempts",
            "1",
            "--output",
            str(tmp_path / "judge.json"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    # A random model writes no parsable verdict: nothing scored, so not exit 0 (README: 4),
    # and the results still list every question with its status.
    assert judged.exit_code == 4, judged.output
    summary = json.loads((tmp_path / "judge.json").read_text())["summary"]
    assert summary["failed"] == 2 and summary["scored"] == 0
    ev = runner.invoke(app, ["eval", str(tmp_path / "ans.jsonl")])
    assert ev.exit_code == 0, ev.output
    rep = runner.invoke(
        app,
        [
            "report",
            "--results",
            f"{tmp_path / 'ans.eval.json'},{tmp_path / 'judge.json'}",
            "--output-dir",
            str(tmp_path / "rep"),
        ],
    )
    assert rep.exit_code == 0, rep.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| ans |" in text and "judge_score" in text and "n/a" in text


def test_no_answer_matching_a_reference_is_a_named_error(tmp_path):
    answers = write(tmp_path / "a.jsonl", [record("a", "the cat sat", 3)])
    reference = write(tmp_path / "t.jsonl", [record("x", "the cat sat", 3)])
    result = CliRunner().invoke(app, ["eval", str(answers), "--reference", str(reference)])
    assert result.exit_code == 2
    assert "no answer in" in result.output and str(reference) in result.output
    assert "'a'" in result.output and "'x'" in result.output
    assert not (tmp_path / "a.eval.json").exists()  # no results file as if all were well


def test_answers_without_token_counts_are_measured_in_words_and_short_ngrams_are_na(tmp_path):
    rows = [
        {"id": i, "messages": [{"role": "user", "content": i}, {"role": "assistant", "content": t}]}
        for i, t in (("p1", "the cat sat"), ("p2", "a dog ran"))
    ]
    answers = write(tmp_path / "a.jsonl", rows)
    result = CliRunner().invoke(app, ["eval", str(answers), "--reference", str(answers)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "a.eval.json").read_text())
    metrics = saved["metrics"]
    assert saved["length_unit"] == "words" and "lengths in words" in result.output
    assert metrics["length_mean"]["mean"] == 3.0  # never 0 for an answer with text
    assert metrics["ngram_f1_3"]["mean"] == 1.0
    assert metrics["ngram_f1_4"] == {"mean": None, "low": None, "high": None, "n": 0}
    # No record says how it ended: the share of cut answers is not known.
    assert metrics["truncated_share"] == {"mean": None, "n": 0}


def test_an_empty_answers_file_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "a.jsonl")])
    assert result.exit_code == 2 and "holds no chat records" in result.output
