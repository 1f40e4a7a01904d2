import json

from typer.testing import CliRunner

from gad.cli import app


def test_demo_tiny_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--tiny", "--output-dir", str(out), "--num-prompts", "6", "--max-tokens", "16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "teacher.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["messages"][-1]["role"] == "assistant" for r in records)
    assert (out / "seqkd" / "final" / "model.safetensors").exists()
    assert json.loads((out / "seqkd" / "summary.json").read_text())["examples"] == 6
    assert "smoke test" in result.output
