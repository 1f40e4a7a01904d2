"""Throughput of `gad collect` (openai backend) against the local fake OpenAI server.

The server (tests/fake_openai.py) runs in its own process so that it does not compete with the
client for the GIL, answers every request after a fixed latency (an API's think time), and
injects no faults. For each latency and concurrency a fresh output is collected and the run's
own summary gives requests/s and records/s (wall time includes loading the prompt file, opening
the client and every fsync of the journal).

    python benchmarks/collect_throughput.py --prompts 200 --concurrency 1 8 32 --latency 0.05 0

Prints a Markdown table of the median of `--repeats` runs per cell.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

from gad.api import teacher
from gad.config import load as cfg

TESTS = Path(__file__).resolve().parents[1] / "tests"
KEY_ENV = "GAD_BENCH_KEY"


def serve(latency: float, conn: mp.connection.Connection) -> None:
    """Child process: run the fake server until the parent sends anything."""
    sys.path.insert(0, str(TESTS))
    from fake_openai import FakeOpenAI

    with FakeOpenAI(latency=latency, lifetime=3600) as server:
        conn.send(server.url)
        conn.recv()


def write_prompts(path: Path, count: int) -> None:
    with open(path, "w") as f:
        for i in range(count):
            content = f"Question {i}: explain step {i} of the method in two sentences."
            record = {"id": f"q{i}", "messages": [{"role": "user", "content": content}]}
            f.write(json.dumps(record) + "\n")


def run_one(output: Path, url: str, prompts: Path, concurrency: int) -> teacher.CollectSummary:
    config = cfg.build(
        cfg.CollectConfig,
        dict(
            prompts=str(prompts),
            output=str(output),
            backend="openai",
            model="fake-teacher",
            base_url=url,
            api_key_env=KEY_ENV,
            concurrency=concurrency,
            max_retries=0,
            request_timeout=30,
        ),
        "benchmark",
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the per-run summary table
        return teacher.collect(config, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--latency", type=float, nargs="+", default=[0.05, 0.0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is shown")
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "sk-benchmark-not-a-key")

    # The client is CPU-bound past concurrency 8: the machine decides the ceiling.
    from gad.models import precision

    machine = precision.machine()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, flags {machine['cpu_flags']}\n")
    print("| server latency | concurrency | prompts | seconds (median) | requests/s | records/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    ctx = mp.get_context("spawn")
    for latency in args.latency:
        parent, child = ctx.Pipe()
        server = ctx.Process(target=serve, args=(latency, child), daemon=True)
        server.start()
        url = parent.recv()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                write_prompts(folder / "prompts.jsonl", args.prompts)
                # Not timed: the first run pays for importing the openai package.
                run_one(folder / "warmup" / "teacher.jsonl", url, folder / "prompts.jsonl", 8)
                for concurrency in args.concurrency:
                    runs = []
                    for repeat in range(args.repeats):
                        output = folder / f"c{concurrency}-{repeat}" / "teacher.jsonl"
                        s = run_one(output, url, folder / "prompts.jsonl", concurrency)
                        if s.failed:
                            first = teacher.failures_path(s.output).read_text().splitlines()[0]
                            raise SystemExit(f"{s.failed} requests failed, e.g. {first}")
                        runs.append(s)
                    s = sorted(runs, key=lambda run: run.seconds)[len(runs) // 2]
                    print(
                        f"| {latency * 1000:.0f} ms | {concurrency} | {args.prompts} "
                        f"| {s.seconds:.2f} | {s.requests_per_s:.1f} | {s.records_per_s:.1f} |",
                        flush=True,
                    )
        finally:
            parent.send("stop")
            server.join(timeout=10)


if __name__ == "__main__":
    main()
