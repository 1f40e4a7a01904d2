import json
from pathlib import Path

import pytest
import torch

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.train import sft

ANSWERS = ["The sky is blue.", "Two plus two is four.", "Cats like to sleep.", "Water is wet."]


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(8):
            messages = [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]},
            ]
            f.write(json.dumps({"id": f"q{i}", "messages": messages}) + "\n")
    return path


def run(tiny_dir, records_file, out, **overrides):
    values = dict(
        data=str(records_file),
        model=str(tiny_dir),
        output_dir=str(out),
        epochs=4,
        lr=3e-3,
        micro_batch_size=2,
        grad_accum=2,
        mixed_precision="no",
        save_every=3,
        keep_checkpoints=0,
    )
    values.update(overrides)
    return sft.train(cfg.build(cfg.SFTConfig, values, "test"))


def weights(folder):
    from safetensors.torch import load_file

    return load_file(Path(folder) / "model.safetensors")


def test_loss_decreases_and_checkpoint_loads(tiny_dir, records_file, tmp_path):
    final = run(tiny_dir, records_file, tmp_path / "run", epochs=12, lr=1e-2)
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 24  # 8 examples / global batch 4 = 2 steps per epoch, 12 epochs
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "summary.json").exists()
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    assert AutoModelForCausalLM.from_pretrained(ckpt) is not None
    trained = weights(final)
    for name, p in model.state_dict().items():
        if name in trained:
            assert torch.equal(p, trained[name])


def test_resume_is_bit_exact(tiny_dir, records_file, tmp_path):
    run(tiny_dir, records_file, tmp_path / "straight", max_steps=6)
    run(tiny_dir, records_file, tmp_path / "split", max_steps=3)
    run(tiny_dir, records_file, tmp_path / "split", max_steps=6, resume=True)
    straight, split = weights(tmp_path / "straight/final"), weights(tmp_path / "split/final")
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name
    losses = lambda d: [r["loss"] for r in read_metrics(d)]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


def test_resume_mid_run_after_kill(tiny_dir, records_file, tmp_path):
    """A run killed after a periodic checkpoint resumes from it and ends where a clean run does."""
    run(tiny_dir, records_file, tmp_path / "clean", max_steps=7, save_every=2)
    run(tiny_dir, records_file, tmp_path / "killed", max_steps=5, save_every=2)
    # Simulate the kill between checkpoint 4 and the end: drop the step-5 checkpoint.
    import shutil

    shutil.rmtree(tmp_path / "killed/checkpoints/step-000005")
    run(tiny_dir, records_file, tmp_path / "killed", max_steps=7, save_every=2, resume=True)
    clean, resumed = weights(tmp_path / "clean/final"), weights(tmp_path / "killed/final")
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == list(range(1, 8))


def test_two_processes_match_one(tiny_dir, records_file, tmp_path):
    """torchrun with 2 CPU processes (gloo) gives the losses of 1 process, same global batch."""
    from launch import train_in_processes

    values = dict(
        data=str(records_file),
        model=str(tiny_dir),
        epochs=1,
        lr=3e-3,
        grad_accum=1,
        mixed_precision="no",
        save_every=0,
    )
    one = values | {"output_dir": str(tmp_path / "one"), "micro_batch_size": 4}
    two = values | {"output_dir": str(tmp_path / "two"), "micro_batch_size": 2}
    train_in_processes(tmp_path, "sft", one, 1, 0)
    train_in_processes(tmp_path, "sft", two, 2, 29517)
    l1 = [r["loss"] for r in read_metrics(tmp_path / "one")]
    l2 = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert len(l1) == len(l2) == 2
    assert l1 == pytest.approx(l2, rel=1e-5)
    w1, w2 = weights(tmp_path / "one/final"), weights(tmp_path / "two/final")
    # Adam divides by sqrt(v): float summation-order noise in near-zero gradients becomes
    # ~1e-5 weight noise after lr=3e-3 steps, still 100x below one step's size.
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)


def test_tensorboard_tracker_gets_the_metrics(tiny_dir, records_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_dir, records_file, tmp_path / "tb", epochs=1, report_to="tensorboard")
    events = EventAccumulator(str(tmp_path / "tb" / "gad-sft"))
    events.Reload()
    assert {"loss", "lr", "tokens_per_s"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("loss")) == 2


def logged_steps(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_in_steps_and_checkpoint_writes_then_resume_is_bit_exact(
    tiny_dir, records_file, tmp_path
):
    """`gad sft` SIGKILLed in the middle of a checkpoint write and at random moments, restarted
    with resume each time, ends with the weights of an uninterrupted run, bit for bit."""
    import random

    from launch import kill_after_progress, killable
    from transformers import AutoModelForCausalLM

    from gad.core import checkpoint

    values = dict(
        data=str(records_file),
        model=str(tiny_dir),
        epochs=4,
        lr=3e-3,
        micro_batch_size=2,
        grad_accum=2,
        mixed_precision="no",
        save_every=1,
        keep_checkpoints=2,
        max_steps=8,
    )
    clean = killable(tmp_path, "sft", values | {"output_dir": str(tmp_path / "clean")})
    assert clean.wait(timeout=300) == 0, clean.stderr.read()[-3000:]
    out = tmp_path / "killed"
    again = values | {"output_dir": str(out), "resume": True}

    proc = killable(tmp_path, "sft", again, kill_in_save="step-000003")
    assert proc.wait(timeout=300) == -9, proc.stderr.read()[-3000:]
    # The half-written checkpoint is invisible; the one before it loads.
    assert (out / "checkpoints" / "step-000003.tmp").is_dir()
    assert checkpoint.latest(out) == out / "checkpoints" / "step-000002"
    assert AutoModelForCausalLM.from_pretrained(checkpoint.latest(out)) is not None

    rng, kills = random.Random(13), 1
    for _ in range(3):
        done = logged_steps(out)
        proc = killable(tmp_path, "sft", again)
        progressed = lambda done=done: logged_steps(out) > done  # noqa: E731
        if kill_after_progress(proc, progressed, rng.uniform(0, 0.15)):
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
    proc = killable(tmp_path, "sft", again)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert kills >= 3, "the run ended before it could be killed"

    clean_w, resumed = weights(tmp_path / "clean/final"), weights(out / "final")
    assert clean_w.keys() == resumed.keys()
    assert all(torch.equal(clean_w[k], resumed[k]) for k in clean_w)
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d)]  # noqa: E731
    assert losses(out) == losses(tmp_path / "clean")


def test_unwritable_output_and_full_disk_are_named(tiny_dir, records_file, tmp_path, monkeypatch):
    from gad.core import checkpoint

    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(checkpoint.CheckpointError, match=r"a_file/run: the run folder cannot"):
        run(tiny_dir, records_file, tmp_path / "a_file" / "run")

    # Too little space for one checkpoint: refused before the first step.
    import shutil

    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(checkpoint.CheckpointError, match=r"needs about .* MB and only 0 MB"):
        run(tiny_dir, records_file, tmp_path / "small")
    assert not (tmp_path / "small" / "metrics.jsonl").exists()
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    # The disk fills up in the middle of a checkpoint write: a named error, the last complete
    # checkpoint kept, no half checkpoint left behind.
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step-000006" in str(f):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"No space left.*step-000003, is kept"):
        run(tiny_dir, records_file, tmp_path / "full", max_steps=8)
    names = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert names == ["step-000003"]
