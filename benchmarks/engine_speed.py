"""Decoded tokens/s of gad's transformers loop against vLLM on the same bundled prompts, each run
in a fresh process, the engines alternated round by round (vLLM binds and limits the process's
threads, so the two never share one). Run it in the vLLM environment (`make setup-vllm`):

    HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/engine_speed.py --rounds 2 \
        --shapes 4x4x64 8x4x128 --out docs/results/vllm.json

A shape is prompts x samples x max new tokens; sampling at temperature 0.8, seeded per prompt
(with vLLM's chunked prefill off, as `engine: vllm` runs). Prints one JSON line per run and a
Markdown table of the mean tokens/s per engine and shape, with vLLM's start-up time.
`--engines vllm vllm-compiled` compares vLLM eager with vLLM compiled (`vllm_compile`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("transformers", "vllm", "vllm-compiled")
"""vllm-compiled: the vLLM engine with `vllm_compile` (torch.compile instead of eager)."""


def one_run(engine: str, model: str, dtype: str, shapes: list[str]) -> dict:
    """In this process: start `engine`, then time each shape once (after a short warm-up)."""
    import importlib.resources

    import torch

    from gad.data import chats
    from gad.models import store
    from gad.train import vllm_rollout
    from gad.train.rollout import Sampling, TransformersRollout

    source = Path(str(importlib.resources.files("gad") / "assets" / "prompts.jsonl"))
    records = chats.read_records(source).records
    started = time.perf_counter()
    if engine.startswith("vllm"):
        from gad.config.parts import Engine

        tokenizer = store.load_tokenizer(model)
        settings = Engine(vllm_compile=engine == "vllm-compiled")
        rollout = vllm_rollout.VLLMRollout(
            store.resolve(model), tokenizer, settings=settings, dtype=dtype, seed=0
        )
    else:
        loaded, tokenizer = store.load(model)
        autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if autocast is not None:  # as accelerate's `prepare` runs a training forward
            forward = loaded.forward

            def autocast_forward(*a, **k):
                with torch.autocast("cpu", dtype=autocast):
                    return forward(*a, **k)

            loaded.forward = autocast_forward
        rollout = TransformersRollout(loaded, tokenizer, batch_size=64, autocast_dtype=autocast)
    startup = time.perf_counter() - started
    prompts = [chats.encode_prompt(tokenizer, r.prompt) for r in records]
    rollout.generate(prompts[:2], 1, Sampling(0.8, 1.0, 8), seeds=[0, 1])  # warm-up
    out: dict = {"engine": engine, "startup_s": round(startup, 2), "shapes": {}}
    for shape in shapes:
        p, n, t = (int(x) for x in shape.split("x"))
        chosen = (prompts * (p // len(prompts) + 1))[:p]
        t0 = time.perf_counter()
        groups = rollout.generate(chosen, n, Sampling(0.8, 1.0, t), seeds=list(range(p)))
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for g in groups for c in g)
        out["shapes"][shape] = {"tokens": tokens, "seconds": round(seconds, 3),
                                "tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip
    rollout.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=["4x4x64", "8x4x128"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--engines", nargs="+", default=["transformers", "vllm"], choices=ENGINES,
        help="compared in this order, reversed every other round; ratios are to the first",
    )  # fmt: skip
    parser.add_argument("--one", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.model, args.dtype, args.shapes)))
        return
    runs = []
    for round_ in range(args.rounds):
        order = args.engines if round_ % 2 == 0 else args.engines[::-1]
        for engine in order:
            cmd = [sys.executable, __file__, "--one", engine, "--model", args.model]
            cmd += ["--dtype", args.dtype, "--shapes", *args.shapes]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1]) | {"round": round_}
            print(json.dumps(run), flush=True)
            runs.append(run)
    first, others = args.engines[0], args.engines[1:]
    print(f"\n| shape | {' | '.join(f'{e} tok/s' for e in args.engines)} | "
          f"{' | '.join(f'{e} / {first}' for e in others)} |")  # fmt: skip
    print("|---|" + "---:|" * (2 * len(args.engines) - 1))
    summary = {}
    for shape in args.shapes:
        mean = {
            e: statistics.mean(r["shapes"][shape]["tokens_per_s"] for r in runs if r["engine"] == e)
            for e in args.engines
        }
        ratios = {e: round(mean[e] / mean[first], 2) for e in others}
        summary[shape] = mean | ({"ratio": ratios[others[0]]} if len(others) == 1 else ratios)
        print(f"| {shape} | {' | '.join(f'{mean[e]:.1f}' for e in args.engines)} | "
              f"{' | '.join(f'{ratios[e]:.2f}x' for e in others)} |")  # fmt: skip
    startup = {
        e: round(statistics.mean(r["startup_s"] for r in runs if r["engine"] == e), 2)
        for e in args.engines
        if e.startswith("vllm")
    }
    print(f"\nstart-up (engine created, model loaded), s: {startup}")
    if args.out:
        result = {"model": args.model, "dtype": args.dtype, "runs": runs, "summary": summary,
                  "startup_s": startup}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
