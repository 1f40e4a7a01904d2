"""How this folder was made, with the code of gad 0.1.0 before issue 22 (commit 8364320):

    git worktree add /tmp/old 8364320
    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/old/src python make.py /tmp/oldckpt/out
    # then kept: out/gad minus warmup/checkpoints, gad/final and config.yaml; out/teacher.jsonl;
    # out/expected.json; /tmp/oldckpt/model as model/

A GAD run (warmup + 2 of 4 GAD steps) on a tiny model, and what the uninterrupted 4-step run
logs and ends with. It imports 0.1.0's flat modules: it does not run against today's tree.
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

from gad import config as cfg
from gad import gad_stage
from gad.models import build_tiny

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
data = out / "teacher.jsonl"
with open(data, "w") as f:
    for i in range(16):
        m = [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"{WORDS[i % 8].capitalize()}."},
        ]
        f.write(json.dumps({"id": f"q{i}", "messages": m}) + "\n")
model = build_tiny(Path("/tmp/oldckpt/model"), seed=0, hidden_size=16, num_layers=1, vocab_size=320)


def gad_values(run, steps):
    return dict(
        data=str(data),
        model=str(model),
        output_dir=str(run),
        batch_prompts=4,
        n_samples=4,
        micro_batch_size=8,
        max_response_tokens=10,
        warmup_epochs=0.5,
        warmup_d_only_steps=1,
        epochs=100.0,
        max_steps=steps,
        lr=3e-3,
        d_lr=3e-3,
        max_grad_norm=1.0,
        mixed_precision="no",
        save_every=0,
    )


def sft_values(run, epochs):
    return dict(
        data=str(data),
        model=str(model),
        output_dir=str(run),
        batch_size=4,
        micro_batch_size=4,
        epochs=epochs,
        lr=3e-3,
        mixed_precision="no",
        lora_rank=2,
        lora_alpha=4.0,
        save_every=2,
    )


def digest(folder):
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


tmp = Path("/tmp/oldckpt/runs")
shutil.rmtree(tmp, ignore_errors=True)
gad_stage.train(cfg.build(cfg.GADConfig, gad_values(tmp / "gad-full", 4), "make"))
gad_stage.train(cfg.build(cfg.GADConfig, gad_values(out / "gad", 2), "make"))
expected = {
    "gad": {
        "generator": digest(tmp / "gad-full/gad/final"),
        "discriminator": digest(tmp / "gad-full/gad/final/discriminator"),
        "metrics": (tmp / "gad-full/gad/metrics.jsonl").read_text().splitlines(),
    },
}
print(json.dumps(expected)[:300])
json.dump(expected, open(out / "expected.json", "w"), indent=1)
