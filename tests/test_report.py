import json

from gad import report


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
