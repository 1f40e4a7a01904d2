"""How many of the lab teacher's answers finish within each token budget, per mode.

One sampling of the train split's teacher answers at the largest budget (the lab's own seed and
batches); an answer counts as finished within a smaller budget when it ended (end-of-turn) by
then. Issue 21's rule: every mode finishes ≥ 90% of its answers within the lab's budget.

    python benchmarks/lab_finish.py --budgets 64 72 80 88 96 [lab.py's flags: --teacher ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab  # noqa: E402

from gad.models import store


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 72, 80, 88, 96])
    own, rest = parser.parse_known_args(argv)
    args = lab.parse(["--out", "unused", *rest, "--max-tokens", str(max(own.budgets))])
    contexts = lab.check_inputs(args)
    prompts = lab.split_prompts(args)["train"]
    started = time.perf_counter()
    answers = lab.sample(
        store.load(args.teacher), prompts, args.answers_per_prompt, 1234, args, contexts
    )
    out: dict[str, dict[str, float]] = {"_run": {"sample_s": time.perf_counter() - started}}
    for budget in own.budgets:
        out[str(budget)] = {}
        for k in range(len(contexts)):
            mine = [a for a in answers if a.mode == k]
            done = sum(a.finished and len(a.ids) <= budget for a in mine)
            out[str(budget)][f"mode {k}"] = done / max(1, len(mine))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
