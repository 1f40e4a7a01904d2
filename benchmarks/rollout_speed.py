"""Decode speed of the rollout, one change at a time, in one alternating run.

Variants, each generating P prompts x N samples x <= T new tokens with the same model under
bf16 autocast (as accelerate runs it: the forward wrapped in autocast, float32 weights):

* `generate`   transformers' `model.generate` (sampling by `torch.multinomial`): the rollout
               before issue 15.
* `decode`     our decode loop (`rollout.decode`): the same forward calls, no generate
               machinery, inverse-CDF sampling (one uniform per row, not one exponential per
               vocabulary entry).
* `cast_once`  `decode` with the weights cast to bf16 once per generate call
               (`precision.cast_weights_once`), not at every token: `TransformersRollout` now.

Rounds rotate the order. Measured: sampled tokens (end-of-turn included) per second of
generation. Sampled lengths differ between variants (different random draws), so compare
tokens/s, not seconds.

    python benchmarks/rollout_speed.py --rounds 3 --out docs/results/rollout.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from gad.data import chats
from gad.models import precision, store
from gad.train.rollout import Sampling, TransformersRollout

VARIANTS = ("generate", "decode", "cast_once")


def autocast_forward(model: Any, dtype: torch.dtype | None) -> Any:
    """Wrap `model.forward` in autocast, as accelerate's `prepare` does."""
    if dtype is None:
        return model
    forward = model.forward

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = wrapped
    return model


def left_padded(prompts: list[list[int]], n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [p for p in prompts for _ in range(n)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, p in enumerate(rows):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    return ids, mask


def run(variant: str, model: Any, tokenizer: Any, prompts: list[list[int]], args: Any) -> dict:
    sampling = Sampling(args.temperature, 1.0, args.max_new_tokens)
    eos = chats.end_of_turn_id(tokenizer)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if variant == "generate":
        ids, mask = left_padded(prompts, args.n, tokenizer.pad_token_id)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=args.temperature,
                top_p=1.0,
                top_k=None,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )[:, ids.size(1) :]
        tokens = 0
        for row in out.tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
    else:
        dtype = precision.autocast_dtype(args.dtype) if variant == "cast_once" else None
        rollout = TransformersRollout(
            model, tokenizer, batch_size=len(prompts) * args.n, autocast_dtype=dtype
        )
        groups = rollout.generate(prompts, args.n, sampling)
        tokens = sum(len(c.token_ids) for g in groups for c in g)
    seconds = time.perf_counter() - started
    return {"variant": variant, "seconds": seconds, "tokens": tokens, "tok_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--dtype", choices=("bf16", "no"), default="bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer = store.load(args.model)
    model = autocast_forward(model, precision.autocast_dtype(args.dtype))
    texts = [f"Write a short story about a robot called Unit {i}." for i in range(args.prompts)]
    prompts = [chats.encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    run("decode", model, tokenizer, prompts[:1], args)  # warm-up
    rows = []
    for r in range(args.rounds):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for variant in order:
            row = run(variant, model, tokenizer, prompts, args) | {"round": r}
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {}
    for v in VARIANTS:
        speeds = [x["tok_per_s"] for x in rows if x["variant"] == v]
        summary[v] = {
            "tok_per_s_mean": statistics.mean(speeds),
            "tok_per_s_std": statistics.stdev(speeds) if len(speeds) > 1 else None,
        }
    ratios = {
        f"{v}_over_generate": statistics.mean(
            a["tok_per_s"] / b["tok_per_s"]
            for a in rows
            if a["variant"] == v
            for b in rows
            if b["variant"] == "generate" and b["round"] == a["round"]
        )
        for v in VARIANTS[1:]
    }
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": precision.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "runs": rows,
        "summary": summary,
        "ratios": ratios,
    }
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
