"""Seconds per training step on this machine: SFT (SeqKD) and the GAD step by phase.

SFT: SmolLM2-135M-Instruct, batch 4 x 512 tokens (256 prompt + 256 response), fp32 weights with
autocast as `--precision` (default auto: bf16 where the CPU computes it natively), AdamW.
GAD: the same student and discriminator (both SmolLM2-135M), P prompts x N samples, rollouts of
up to R new tokens, one discriminator and one policy update per step.

    python benchmarks/train_step.py sft --steps 4
    python benchmarks/train_step.py gad --prompts 4 --n 4 --response 64 --steps 3
    python benchmarks/train_step.py gad --prompts 8 --n 8 --response 256 --steps 1 --engine vllm
    python benchmarks/train_step.py sft --steps 4 --idle-engine   # vLLM idle in the process

The first step of each run is a warm-up and is not counted. Prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.methods import stage as gad_stage
from gad.models import precision, store
from gad.train import sft

WORDS = "the model answers every question with care and a short clear example".split()


def synthetic_records(path: Path, n: int, prompt_words: int, answer_words: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
            answer = " ".join(rng.choice(WORDS) for _ in range(answer_words))
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"id": f"r{i}", "messages": messages}) + "\n")


def bench_sft(args: argparse.Namespace, tmp: Path) -> dict:
    # ~256 prompt tokens and 256 response tokens per example with SmolLM2's tokenizer.
    synthetic_records(tmp / "data.jsonl", 4 * (args.steps + 1), 230, 250)
    config = cfg.SFTConfig(
        data=str(tmp / "data.jsonl"),
        model=args.model,
        output_dir=str(tmp / "sft"),
        epochs=1,
        micro_batch_size=4,
        mixed_precision=args.precision,
        save_every=0,
        max_response_tokens=256,
        max_prompt_tokens=512,
    )
    engine = None
    if args.idle_engine:
        # A vLLM engine started in this process and left idle: does hosting it slow training?
        from gad.train.vllm_rollout import VLLMRollout

        folder = store.resolve(args.model)
        engine = VLLMRollout(folder, store.load_tokenizer(args.model), dtype="bfloat16")
    sft.train(config)
    if engine is not None:
        engine.close()
    rows = read_metrics(tmp / "sft")[1:]
    return {
        "bench": "sft",
        "model": args.model,
        "batch": "4 x ~512 tokens",
        "precision": args.precision,
        "idle_engine": args.idle_engine,
        "machine": precision.machine(),
        "s_per_step": statistics.mean(r["seconds"] for r in rows),
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rows),
        "steps_timed": len(rows),
        "torch_threads": torch.get_num_threads(),
    }


def bench_gad(args: argparse.Namespace, tmp: Path) -> dict:
    synthetic_records(tmp / "data.jsonl", args.prompts * (args.steps + 1), 40, 60)
    config = cfg.GADConfig(
        data=str(tmp / "data.jsonl"),
        model=args.model,
        output_dir=str(tmp / "gad"),
        stage="gad",
        batch_prompts=args.prompts,
        n_samples=args.n,
        micro_batch_size=args.micro,
        generation_batch_size=args.prompts * args.n,
        max_response_tokens=args.response,
        epochs=1.0,
        mixed_precision=args.precision,
        save_every=0,
        engine=args.engine,
    )
    started = time.perf_counter()
    gad_stage.train(config)
    rows = read_metrics(tmp / "gad" / "gad")[1:]
    phases = sorted({k for r in rows for k in r if k.startswith("time/")})
    return {
        "bench": "gad",
        "engine": args.engine,
        "model": args.model,
        "batch": f"{args.prompts} prompts x {args.n} samples x <= {args.response} new tokens",
        "precision": args.precision,
        "machine": precision.machine(),
        "s_per_step": statistics.mean(r["time/step"] for r in rows),
        "phases_s": {p[5:]: round(statistics.mean(r[p] for r in rows), 2) for p in phases},
        "response_len_mean": statistics.mean(r["response/length_mean"] for r in rows),
        "rollout_tokens_per_s": statistics.mean(r["tokens/rollout_per_s"] for r in rows),
        # vLLM only: the trainer's log-probs of the sampled tokens against the engine's.
        "logp_gap": [r.get("rollout/logp_gap") for r in rows],
        "logp_gap_max": [r.get("rollout/logp_gap_max") for r in rows],
        "steps_timed": len(rows),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench", choices=["sft", "gad"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (one more is run)")
    parser.add_argument("--precision", default="auto", choices=["auto", "no", "bf16"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument(
        "--engine", default="transformers", choices=["transformers", "vllm"], help="gad only"
    )
    parser.add_argument(
        "--idle-engine", action="store_true", help="sft only: a vLLM engine idle in the process"
    )
    args = parser.parse_args()
    store.resolve(args.model)  # convert once, outside the timing
    # Resolved once here so the JSON says what ran, not "auto".
    args.precision = precision.resolve(args.precision).mixed_precision
    with tempfile.TemporaryDirectory() as tmp:
        result = (bench_sft if args.bench == "sft" else bench_gad)(args, Path(tmp))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
