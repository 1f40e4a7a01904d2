"""Run a training stage in fresh processes: one plain process, or several under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """\
import json, sys
from gad import config as cfg, gad, sft
kind, values = sys.argv[1], json.loads(sys.argv[2])
if kind == "sft":
    sft.train(cfg.build(cfg.SFTConfig, values, "test"))
else:
    gad.train(cfg.build(cfg.GADConfig, values, "test"))
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
