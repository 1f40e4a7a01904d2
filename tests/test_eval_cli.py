import json

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
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["length_mean"]["mean"] == 4.0 and metrics["length_mean"]["n"] == 3
    assert metrics["truncated_share"] == 1 / 3
    # ROUGE-L over the 2 matched answers: 1.0 (identical) and LCS "a ... ran" = 2 of 4 vs 3.
    expected_b = 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)
    assert abs(metrics["rouge_l"]["mean"] - (1.0 + expected_b) / 2) < 1e-9
    assert metrics["rouge_l"]["low"] <= metrics["rouge_l"]["mean"] <= metrics["rouge_l"]["high"]
    assert metrics["ngram_f1_1"]["n"] == 2
    assert metrics["teacher_logprob"]["mean"] < 0 and metrics["teacher_logprob"]["n"] == 3
    assert json.loads(out.read_text())["unmatched"] == 1

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
            "--max-tokens",
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
            "--max-tokens",
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
    assert judged.exit_code == 0, judged.output
    summary = json.loads((tmp_path / "judge.json").read_text())["summary"]
    assert summary["failed"] == 2  # a random model writes no parsable verdict: never scored
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
