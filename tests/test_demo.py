import json
import re

from typer.testing import CliRunner

from gad.cli import app
from gad.models import precision


def test_demo_tiny_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--tiny", "--output-dir", str(out), "--num-train", "8", "--num-held-out", "4"]
    args += [
        "--max-response-tokens",
        "12",
        "--gad-steps",
        "2",
        "--n-samples",
        "2",
        "--batch-prompts",
        "4",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    teacher = [json.loads(line) for line in (out / "teacher.jsonl").read_text().splitlines()]
    assert len(teacher) == 12 and all(r["messages"][-1]["role"] == "assistant" for r in teacher)
    assert len((out / "teacher_train.jsonl").read_text().splitlines()) == 8
    assert (out / "seqkd" / "final" / "model.safetensors").exists()
    assert json.loads((out / "seqkd" / "summary.json").read_text())["examples"] == 8
    warmup_rows = (out / "gad" / "warmup" / "metrics.jsonl").read_text().splitlines()
    gad_rows = [
        json.loads(x) for x in (out / "gad" / "gad" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(warmup_rows) == 2 and [r["step"] for r in gad_rows] == [1, 2]
    assert (out / "gad" / "gad" / "final" / "discriminator" / "model.safetensors").exists()
    for system in ("student", "seqkd", "gad"):
        answers = (out / "answers" / f"{system}.jsonl").read_text().splitlines()
        assert len(answers) == 4
        metrics = json.loads((out / "answers" / f"{system}.eval.json").read_text())["metrics"]
        assert {"rouge_l", "teacher_logprob", "reverse_kl", "length_mean"} <= set(metrics)

    report = (out / "report" / "report.md").read_text()
    assert "smoke test of the pipeline, not a result" in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert {"student", "seqkd", "gad"} <= {row.split("|")[1].strip() for row in table}
    for stage in ("models", "teacher", "seqkd", "gad", "generate", "eval"):
        assert re.search(rf"^\| {stage} \| \d+ \|$", report, re.M), stage
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"curves-seqkd.png", "curves-gad-warmup.png", "curves-gad-gad.png"} <= set(images)
    assert all((out / "report" / name).stat().st_size > 1000 for name in images)

    # The demo's precision (auto by default) reaches every training stage, resolved.
    chosen = precision.resolve("auto").mixed_precision
    for stage_config in ("seqkd/config.yaml", "gad/config.warmup.yaml", "gad/config.gad.yaml"):
        text = (out / stage_config).read_text()
        assert re.search(rf"^mixed_precision: '?{chosen}'?$", text, re.M), stage_config
        assert "# resolved: auto:" in text, stage_config

    summary = json.loads((out / "summary.json").read_text())
    assert summary["report"] == str(out / "report" / "report.md")
    assert "held-out comparison" in result.output and "report:" in result.output
