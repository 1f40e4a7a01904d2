"""The teacher's labels as training data: `gad label` output, read and checked, and the two
data files of `gad train --method reward-distill` made from it (`distill_data`)."""

from __future__ import annotations

import math
from pathlib import Path

from gad.data import chats

LABEL_FIELDS = ("prompt_id", "source", "label", "good")
"""`meta` fields every labelled record must carry (`gad label` writes them)."""


def read_labels(path: str) -> list[chats.Record]:
    """Labelled records of `path`; a record without the label fields stops with its id."""
    records = chats.read_records(path).records
    if not records:
        raise chats.DataError(
            f"data: {path} holds no labelled records (the labels.jsonl of `gad label`)"
        )
    for record in records:
        missing = [k for k in LABEL_FIELDS if k not in record.meta]
        if missing:
            raise record.error(
                f"meta.{missing[0]}", "is missing (expected the labels.jsonl of `gad label`)"
            )
        label = record.meta["label"]
        if not isinstance(label, int | float) or isinstance(label, bool) or math.isnan(label):
            raise record.error("meta.label", "not a number")
        if record.response is None:
            raise record.error("messages", "no response")
    return records


def distill_data(labels_path: str, out: Path) -> tuple[Path, Path]:
    """The two data files of `gad train --method reward-distill`, written into `out`:

    `sft.jsonl`      every teacher response labelled good (the SFT warmup's data);
    `prompts.jsonl`  every labelled prompt once, with one teacher response (a good one when
                     there is one): the RL stage's prompts. Its response is only scored by the
                     frozen reward model, as a diagnostic (`d/teacher_score`).
    """
    records = read_labels(labels_path)
    good = [r for r in records if r.meta["source"] == "teacher" and r.meta["good"]]
    if not good:
        raise chats.DataError(
            f"{labels_path}: no teacher response is labelled good: nothing for the SFT warmup"
        )
    chosen: dict[str, chats.Record] = {}
    for record in records:
        pid = str(record.meta["prompt_id"])
        held = chosen.get(pid)
        rank = (record.meta["source"] == "teacher", bool(record.meta["good"]))
        if held is None or rank > (held.meta["source"] == "teacher", bool(held.meta["good"])):
            chosen[pid] = record
    out.mkdir(parents=True, exist_ok=True)
    sft_path, prompts_path = out / "sft.jsonl", out / "prompts.jsonl"
    chats.write_records(sft_path, good)
    chats.write_records(prompts_path, chosen.values())
    return sft_path, prompts_path
