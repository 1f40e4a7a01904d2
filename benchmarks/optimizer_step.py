"""AdamW step time over a real model's parameters: torch's default (foreach) against the fused
kernel that `engine.make_optimizer` now picks, alternated over rounds.

    python benchmarks/optimizer_step.py --model smollm2-135m --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gad.models import precision, store


def seconds_per_step(model: torch.nn.Module, fused: bool, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, fused=fused)
    opt.step()  # allocates the moments
    started = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    model, _ = store.load(args.model)
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times: dict[str, list[float]] = {"foreach": [], "fused": []}
    for r in range(args.rounds):
        for kind in ("foreach", "fused") if r % 2 == 0 else ("fused", "foreach"):
            times[kind].append(seconds_per_step(model, kind == "fused", args.steps))
    params = sum(p.numel() for p in model.parameters())
    out = {
        "model": args.model,
        "params": params,
        "s_per_step": {k: statistics.mean(v) for k, v in times.items()},
        "runs": times,
        "fused_speedup": statistics.mean(times["foreach"]) / statistics.mean(times["fused"]),
        "machine": precision.machine(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
