import json

from gad.eval import report


def test_report_has_table_curves_and_warning_marks(tmp_path):
    run = tmp_path / "run"
    for stage in ("warmup", "gad"):
        (run / stage).mkdir(parents=True)
        rows = [
            {
                "step": s,
                "d/loss": 0.7 - 0.01 * s,
                "d/accuracy": 0.6,
                "reward/mean": 0.1 * s,
                "g/kl": 0.001 * s,
                "response/length_mean": 50 + s,
                "warnings": ["accuracy high"] if s == 3 else [],
            }
            for s in range(1, 6)
        ]
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = []
    for name, value in (("before", 0.20), ("seqkd", 0.31), ("gad", 0.29)):
        path = tmp_path / f"{name}.json"
        path.write_text(
            json.dumps(
                {
                    "name": name,
                    "metrics": {
                        "rouge_l": {"mean": value, "low": value - 0.02, "high": value + 0.02},
                        "length_mean": {"mean": 100.0},
                    },
                }
            )
        )
        results.append(path)
    out = report.write_report([run], results, tmp_path / "report")
    text = out.read_text()
    assert "| system | rouge_l | length_mean |" in text
    assert "| seqkd | 0.31 [0.29, 0.33] | 100 |" in text
    for stage in ("warmup", "gad"):
        png = tmp_path / "report" / f"curves-run-{stage}.png"
        assert png.exists() and png.stat().st_size > 10_000
        assert f"![run/{stage}]({png.name})" in text
    assert "1 step(s) with warnings, e.g. step 3: accuracy high" in text


def test_report_refuses_what_holds_nothing_to_report(tmp_path):
    from typer.testing import CliRunner

    from gad.cli import app

    (tmp_path / "empty-run").mkdir()
    (tmp_path / "folder.json").mkdir()
    out = tmp_path / "rep"
    cases = [
        (["--runs", str(tmp_path / "does-not-exist")], "does-not-exist: no such folder"),
        (["--runs", str(tmp_path / "empty-run")], "empty-run: holds no metrics.jsonl"),
        (["--results", str(tmp_path / "missing.json")], "missing.json: no such file"),
        (["--results", str(tmp_path / "folder.json")], "folder.json: is a folder"),
        ([], "nothing to report"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["report", *args, "--output-dir", str(out)])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), result.output
        assert not (out / "report.md").exists()  # no report of nothing


def test_readers_of_earlier_outputs_refuse_a_file_with_no_records(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gad.cli import app

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "q"}]}) + "\n")
    cases = [
        (["judge", str(empty), "--backend", "local", "--model", "tiny"], "answers"),
        (["collect", str(empty), "--output", str(tmp_path / "o.jsonl")], "prompts"),
        (["collect", str(good), "--exclude", str(empty)], "exclude"),
        (["split", str(empty), "--output-dir", str(tmp_path / "s")], "prompts"),
        (["reward-model", str(empty), "--output-dir", str(tmp_path / "rm")], "data"),
    ]
    from gad.models import store

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(store, "load", refuse)
    for args, setting in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        text = " ".join(result.output.split())
        assert f"{setting}: {tmp_path}" in text and "holds no" in text, text
