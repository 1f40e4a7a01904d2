"""A checkpoint written by gad 0.1.0 before the package was split into layers (commit 8364320)
still resumes, and the resumed run ends where the uninterrupted 0.1.0 run ended.

`tests/data/gad-0.1.0-checkpoint/` was written by that commit's code with `make.py` beside it:
a tiny model, its warmup, and a GAD stage stopped after 2 of 4 steps; `expected.json` holds
what the uninterrupted 4-step run logged and the digests of its final weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from test_gad import gad_values

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.methods import stage as gad_stage

FIXTURE = Path(__file__).parent / "data" / "gad-0.1.0-checkpoint"


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def comparable(row: dict) -> dict:
    # Times differ between runs; NaN (an accuracy over no cut sample) compares as text.
    return {k: repr(v) for k, v in row.items() if not k.startswith(("time/", "tokens/"))}


def test_a_gad_run_saved_by_0_1_0_resumes_to_the_same_end(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "gad", run)
    # The 0.1.0 run's settings are test_gad's, on the fixture's own model and data.
    values = gad_values(FIXTURE / "model", FIXTURE / "teacher.jsonl", run, resume=True)
    saved = (run / "gad/metrics.jsonl").read_text().splitlines()
    gad_stage.train(cfg.build(cfg.GADConfig, values, "test"))

    # Resumed, not rerun: steps 1-2 are the 0.1.0 run's own lines, timings included.
    assert (run / "gad/metrics.jsonl").read_text().splitlines()[:2] == saved

    expected = json.loads((FIXTURE / "expected.json").read_text())["gad"]
    rows = read_metrics(run / "gad")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [comparable(r) for r in rows] == [comparable(json.loads(m)) for m in expected["metrics"]]
    assert digest(run / "gad/final") == expected["generator"]
    assert digest(run / "gad/final/discriminator") == expected["discriminator"]
