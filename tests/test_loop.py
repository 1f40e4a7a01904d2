"""The one run loop (`train.loop`) with a trivial step: which steps run, which are logged, when
it saves, and that a resumed run picks up where the checkpoint left off."""

from __future__ import annotations

import pytest
import torch

from gad.core import checkpoint
from gad.core.tracking import MetricsLog, read_metrics
from gad.models import store
from gad.train import loop


def spec(tmp_path, saves, *, start=0, total=7, **kw) -> loop.Loop:
    accelerator = loop.make_accelerator("no", "none", tmp_path)
    metrics = MetricsLog(tmp_path, accelerator, resume_step=start or None)

    def save(step, final):
        saves.append((step, final))
        return tmp_path / f"step-{step}"

    values = dict(save_every=3, save_final=total > start, step_time="time/step")
    return loop.Loop("t", total, start, metrics, ("x",), False, save, **(values | kw))


def step_fn(step, timer):
    with timer("work"):
        return {"x": float(step)}


def test_steps_logs_and_saves(tmp_path):
    saves = []
    last = loop.run(spec(tmp_path, saves), step_fn)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["x"] for r in rows] == [float(s) for s in range(7)]
    assert {"time/work", "time/step"} <= set(rows[0])
    # Periodic saves before the last step, then the final one.
    assert saves == [(3, False), (6, False), (7, True)]
    assert last["x"] == 6.0


def test_a_resumed_run_continues_at_its_step_and_logs_every_n(tmp_path):
    saves = []
    loop.run(spec(tmp_path, saves, start=4, log_every=2, step_time=None), step_fn)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [6, 7]  # every 2nd step, and the last
    assert "time/step" not in rows[0]
    assert saves == [(6, False), (7, True)]


def test_a_run_with_nothing_left_saves_nothing(tmp_path):
    saves = []
    assert loop.run(spec(tmp_path, saves, start=7), step_fn) == {}
    assert saves == []


def test_the_check_sees_each_row_and_can_stop_the_run(tmp_path):
    saves = []

    def check(done, row):
        row["warnings"] = []
        if done == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        loop.run(spec(tmp_path, saves, check=check), step_fn)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1] and rows[0]["warnings"] == []
    assert saves == []


def test_restore_and_resume_point(tiny_dir, tmp_path):
    assert loop.resume_point(tmp_path, resume=False) is None
    assert loop.resume_point(tmp_path, resume=True) is None  # nothing saved yet
    assert loop.restore(None, "t") == {"step": 0}
    accelerator = loop.make_accelerator("no", "none", tmp_path)
    model, tokenizer = store.load(str(tiny_dir))
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(
        tmp_path, 5, accelerator, model=model, tokenizer=tokenizer, optimizers={"m": opt},
        state={"a": 1},
    )  # fmt: skip
    found = loop.resume_point(tmp_path, resume=True)
    assert found is not None
    state = loop.restore(found, "t", optimizers={"m": opt})
    assert state["step"] == 5 and state["a"] == 1
