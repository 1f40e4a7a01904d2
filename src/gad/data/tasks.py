"""`gad tasks`: verifiable prompt sets generated offline, with their ground truth kept aside.

Source: `reasoning-gym` (an optional extra, `pip install 'gad[reasoning]'`), whose procedural
datasets (basic_arithmetic, chain_sum, gsm_symbolic, ...) are generated locally from a seed;
nothing is downloaded. Item i of a dataset depends only on (seed + i) and the dataset's options.

Two files are written:
  `<output>`                 chat records `{"id", "messages": [user: question + instruction],
                             "meta": {"task", "index"}}`: no answer anywhere in them;
  `<output stem>.truth.jsonl`  `{"id", "answer", "task", "metadata"}` per prompt: read only by
                             `gad eval --metric accuracy` and `gad label --ground-truth`.
Keeping the truth in another file (rather than a field) makes it impossible for the labeller or
a trainer to see it by accident: they never open that file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from gad.config import load as cfg
from gad.data import chats


def truth_path(output: str | Path) -> Path:
    """`<output stem>.truth.jsonl` beside the prompt file."""
    output = Path(output)
    return output.with_name(output.stem + ".truth.jsonl")


def _options(config: cfg.TasksConfig) -> dict[str, Any]:
    try:
        options = yaml.safe_load(config.options) if config.options.strip() else {}
    except yaml.YAMLError as err:
        raise cfg.ConfigError(f"'options' is not valid YAML: {err}") from err
    if not isinstance(options, dict):
        raise cfg.ConfigError(
            f"'options' must be a mapping like \"{{min_terms: 2}}\", got {options!r}"
        )
    return options


def reasoning_gym_items(dataset: str, size: int, seed: int, options: dict[str, Any]) -> list[dict]:
    """`size` items (`question`, `answer`, `metadata`) of a reasoning-gym dataset."""
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as err:
        raise cfg.UserError("reasoning-gym is not installed: pip install 'gad[reasoning]'") from err
    if dataset not in DATASETS:
        raise cfg.ConfigError(
            f"'dataset': reasoning-gym has no dataset '{dataset}' (some: "
            f"{', '.join(sorted(DATASETS)[:12])}, ...)"
        )
    reserved = {"seed", "size"} & set(options)
    if reserved:
        raise cfg.ConfigError(f"'options': set {sorted(reserved)[0]} with its own option")
    try:
        generated = reasoning_gym.create_dataset(dataset, seed=seed, size=size, **options)
    except TypeError as err:
        import dataclasses

        known = [f.name for f in dataclasses.fields(DATASETS[dataset][1])]
        raise cfg.ConfigError(f"'options': {err}; {dataset} takes {', '.join(known)}") from err
    except (AssertionError, ValueError) as err:
        raise cfg.ConfigError(f"'options': rejected by {dataset}: {err}") from err
    return [generated[i] for i in range(size)]


def run(config: cfg.TasksConfig) -> tuple[Path, Path]:
    """Write the prompt file and the truth file; returns their paths."""
    if config.size < 1:
        raise cfg.ConfigError(f"'size' must be at least 1, got {config.size}")
    items = reasoning_gym_items(config.dataset, config.size, config.seed, _options(config))
    task = f"{config.source}/{config.dataset}"
    records, truths = [], []
    for i, item in enumerate(items):
        record_id = f"{config.dataset}-s{config.seed}-{i}"
        question = str(item["question"]) + config.instruction
        records.append(
            chats.Record(
                record_id, [{"role": "user", "content": question}], {"task": task, "index": i}
            )
        )
        truths.append(
            {
                "id": record_id,
                "answer": str(item["answer"]),
                "task": task,
                "metadata": item.get("metadata", {}),
            }
        )
    output = Path(config.output)
    chats.write_records(output, records)
    truth = truth_path(output)
    with open(truth, "w", encoding="utf-8") as f:
        for entry in truths:
            # Metadata may hold tuples or sets: write them as their text rather than fail.
            f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    cfg.save(config, output.with_name(output.stem + ".config.yaml"))
    return output, truth
