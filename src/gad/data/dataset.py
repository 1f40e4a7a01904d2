"""Chat records as training data: tokenised examples, what was set aside and why.

Every trainer (SFT, the GAD stages) reads its data through `prepare`, which refuses an
overlap with a held-out evaluation set, and prints the same summary (`print_summary`),
including a warning when many answers are cut off: few finished answers teach a student to
stop mid-sentence, and "cut or not" is a cue a discriminator learns instead of the content.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from gad.data import chats, evalsets

console = Console(stderr=True)


@dataclass
class Prepared:
    """Tokenised training data and what was set aside, for the run summary."""

    examples: list[chats.Example]
    skipped_invalid: list[str]
    prompt_too_long: list[str]
    truncated: list[str]
    """Responses cut here at `max_response_tokens`."""
    unfinished: list[str] = dataclasses.field(default_factory=list)
    """Responses their writer already cut (`meta.finish_reason == "length"`)."""
    records: dict[str, chats.Record] = dataclasses.field(default_factory=dict)
    """The records behind `examples`, by id (the discriminator re-encodes their text)."""


def prepare(path: str, tokenizer: Any, stage: Any) -> Prepared:
    """The records of `path` tokenised for training, with the stage's token limits and input
    rules (`stage`: a stage config; it has the `TokenLimits` and `Inputs` parts); a file with
    no usable record stops."""
    loaded = chats.read_records(path, skip_invalid=stage.skip_invalid)
    evalsets.refuse_overlap(loaded.records, stage.exclude, path)
    encoded = chats.encode_sft(
        tokenizer,
        loaded.records,
        max_prompt_tokens=stage.max_prompt_tokens,
        max_response_tokens=stage.max_response_tokens,
    )
    if not encoded.examples:
        raise chats.DataError(f"{path}: no usable training record")
    used = {e.id for e in encoded.examples}
    return Prepared(
        encoded.examples,
        loaded.skipped,
        encoded.prompt_too_long,
        encoded.truncated,
        encoded.unfinished,
        {r.id: r for r in loaded.records if r.id in used},
    )


# Above this share of cut-off answers the setup warns: few finished answers teach the student
# to stop mid-sentence, and "cut or not" becomes a length cue for the discriminator.
UNFINISHED_WARN_SHARE = 0.1


def print_summary(prepared: Prepared, steps: int, global_batch: int) -> None:
    """What the run trains on and what was set aside or cut, on the console."""
    console.print(
        f"data: {len(prepared.examples)} examples, {steps} optimizer steps of {global_batch}"
    )
    if prepared.skipped_invalid:
        console.print(f"[yellow]skipped {len(prepared.skipped_invalid)} invalid record(s):[/]")
        for reason in prepared.skipped_invalid[:5]:
            console.print(f"  {reason}")
    if prepared.prompt_too_long:
        console.print(
            f"[yellow]left out {len(prepared.prompt_too_long)} record(s) whose prompt exceeds "
            f"max_prompt_tokens: {', '.join(prepared.prompt_too_long[:5])}[/]"
        )
    if prepared.truncated:
        console.print(
            f"[yellow]{len(prepared.truncated)} response(s) cut at max_response_tokens[/]"
        )
    cut = len(set(prepared.truncated) | set(prepared.unfinished))
    if cut > UNFINISHED_WARN_SHARE * len(prepared.examples):
        console.print(
            f"[yellow]warning: {cut} of {len(prepared.examples)} answers "
            f"({cut / len(prepared.examples):.0%}) are cut off ({len(prepared.unfinished)} by "
            f"their writer, {len(prepared.truncated)} at max_response_tokens): they are learnt and "
            "shown to a discriminator without an end-of-turn token. Raise max_response_tokens, "
            "or the teacher's max_response_tokens in `gad collect`, so that most answers finish.[/]"
        )
