"""Run a training stage in fresh processes: one plain process, or several under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """\
import json, sys
from gad.config import load as cfg
from gad.methods import stage as gad_stage
from gad.train import sft
kind, values = sys.argv[1], json.loads(sys.argv[2])
if kind == "sft":
    sft.train(cfg.build(cfg.SFTConfig, values, "test"))
else:
    gad_stage.train(cfg.build(cfg.GADConfig, values, "test"))
"""


def train_in_processes(folder: Path, kind: str, values: dict, nproc: int, port: int) -> None:
    """`kind` is "sft" or "gad"; fails the test with the processes' stderr if they fail."""
    script = folder / "train_stage.py"
    script.write_text(SCRIPT)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        launcher += ["--master_port", str(port)]
    # One thread per process: two processes on two cores must not oversubscribe them.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, str(script), kind, json.dumps(values)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def assert_gad_runs_match(one: Path, two: Path) -> None:
    """Two `gad train` runs of the same work (1 and 2 processes) logged the same losses, and
    the same statistics over the whole batch (the accuracy split by finish, the rewards' std)."""
    import pytest

    from gad.core.tracking import read_metrics

    for stage, keys in (
        ("warmup", ("d/loss", "g/sft_loss", "d/accuracy_finished", "d/accuracy_cut")),
        ("gad", ("d/loss", "reward/mean", "reward/std", "g/loss", "g/kl", "d/accuracy_cut")),
    ):
        r1, r2 = read_metrics(one / stage), read_metrics(two / stage)
        assert len(r1) == len(r2) > 0
        for a, b in zip(r1, r2, strict=True):
            for key in keys:
                if key in a and isinstance(a[key], str):  # "nan": no cut sample that step
                    assert a[key] == b[key], (stage, key)
                elif key in a:
                    # The policy loss is a mean of zero-mean advantages times ratios of 1: zero
                    # up to float noise (~1e-6), whose summation order differs across processes.
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (
                        stage,
                        key,
                    )


KILLABLE = """\
import json, os, signal, sys
import torch
from gad.core import checkpoint
from gad.config import load as cfg
from gad.methods import stage as gad_stage
from gad.train import sft
kind, values = sys.argv[1], json.loads(sys.argv[2])
kill_in_save = os.environ.get("GAD_TEST_KILL_IN_SAVE")
if kill_in_save:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        # The trainer state is on disk, the RNG files are not yet: a checkpoint half written.
        name = str(f)
        if name.endswith(checkpoint.STATE_FILE) and kill_in_save in name:
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save
if kind == "sft":
    sft.train(cfg.build(cfg.SFTConfig, values, "test"))
else:
    gad_stage.train(cfg.build(cfg.GADConfig, values, "test"))
"""


def killable(folder: Path, kind: str, values: dict, kill_in_save: str | None = None):
    """Start a training stage in a fresh process (one thread), as `subprocess.Popen`; with
    `kill_in_save="step-000003"` it SIGKILLs itself in the middle of writing the checkpoint
    whose path contains that text."""
    script = folder / "train_killable.py"
    script.write_text(KILLABLE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if kill_in_save is not None:
        env["GAD_TEST_KILL_IN_SAVE"] = kill_in_save
    return subprocess.Popen(
        [sys.executable, str(script), kind, json.dumps(values)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after_progress(proc, progress, seconds: float, timeout: float = 300) -> bool:
    """SIGKILL `proc` `seconds` after `progress()` first returns true; False if it ended first."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not progress():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    time.sleep(seconds)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True
