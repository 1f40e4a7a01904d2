"""Forward + backward of one attention call in bf16 against float32 on this machine, by length.

Why `precision.use_training_attention` exists: on a CPU, torch's flash-attention backward in
bf16 is slow for short sequences. This times `scaled_dot_product_attention` (causal) on
SmolLM2-135M's attention shapes (8 sequences × 9 heads × head size 64 by default) with its inputs
in bf16 and in float32, forward only and forward + backward, best of `--repeats`, alternated.

    python benchmarks/attention_backward.py --out docs/results/attention.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gad.models import precision


def seconds(keys: int, dtype: torch.dtype, backward: bool, args: argparse.Namespace) -> float:
    shape = (args.batch, args.heads, keys, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))

    def once() -> None:
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True)
        if backward:
            out.to(torch.bfloat16).sum().backward()

    once()
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[64, 128, 192, 256, 320, 384, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print("| keys | fwd+bwd bf16 ms | fwd+bwd float32 ms | fwd bf16 ms | fwd float32 ms |")
    print("|---:|---:|---:|---:|---:|")
    for keys in args.keys:
        row = {"keys": keys}
        for backward in (True, False):
            for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "float32")):
                label = f"{'fwd_bwd' if backward else 'fwd'}_{name}_ms"
                row[label] = 1000 * seconds(keys, dtype, backward, args)
        rows.append(row)
        print(
            f"| {keys} | {row['fwd_bwd_bf16_ms']:.1f} | {row['fwd_bwd_float32_ms']:.1f} "
            f"| {row['fwd_bf16_ms']:.1f} | {row['fwd_float32_ms']:.1f} |"
        )
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        result = {
            "settings": settings,
            "machine": precision.machine(),
            "date": time.strftime("%a %b %d %H:%M UTC %Y", time.gmtime()),
            "float32_attention_max_keys": precision.FLOAT32_ATTENTION_MAX_KEYS,
            "rows": rows,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
