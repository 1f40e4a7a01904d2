"""Before/after of a speed-up, measured in one run: `benchmarks/train_step.py` of an earlier
commit and of the working tree, alternated round by round so both see the same machine state.

    python benchmarks/speedup.py --before d25e5b0 --rounds 2 -- gad --prompts 4 --n 4 \
        --response 64 --steps 3

The earlier commit is checked out once as a git worktree (removed at the end); each run is a
fresh process with PYTHONPATH pointing at that tree's `src/` or at ours. Prints every run's JSON
and the after/before ratio of seconds per step, per phase, as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tree: Path, bench_args: list[str]) -> dict:
    env = os.environ | {"PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1"}
    script = tree / "benchmarks" / "train_step.py"
    out = subprocess.run(
        [sys.executable, str(script), *bench_args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="commit of the 'before' code")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- train_step.py args")
    args = parser.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    results: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp) / "before"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_tree), args.before],
            check=True,
            capture_output=True,
        )
        try:
            for round_ in range(args.rounds):
                # Alternate which goes first, so neither always runs on a warmer machine.
                order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
                for name in order:
                    tree = before_tree if name == "before" else ROOT
                    results[name].append(run(tree, bench_args))
                    print(json.dumps({"code": name, "round": round_, **results[name][-1]}))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)],
                check=False,
            )
    mean = {
        name: {
            "step": statistics.mean(r["s_per_step"] for r in rows),
            **{
                phase: statistics.mean(r["phases_s"].get(phase, 0.0) for r in rows)
                for phase in rows[0].get("phases_s", {})
            },
        }
        for name, rows in results.items()
    }
    print(f"\nafter = working tree, before = {args.before}; seconds, mean of {args.rounds} runs\n")
    print("| phase | before s | after s | speed-up (before/after) |\n|---|---|---|---|")
    for phase in mean["before"]:
        b, a = mean["before"][phase], mean["after"].get(phase, 0.0)
        print(f"| {phase} | {b:.2f} | {a:.2f} | {b / a if a else float('nan'):.2f}x |")


if __name__ == "__main__":
    main()
