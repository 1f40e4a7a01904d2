"""The student's samples as the two models see them.

The policy keeps its exact sampled ids (its log-probs must be of what it sampled:
`student_examples`). The discriminator sees text: teacher answers and student samples both go
through `chats.discriminator_input` (the response text re-encoded with the discriminator's
tokenizer, end-of-turn iff the answer finished), so how a sequence was built is never a cue
that separates the two sides. `noncanonical_share` measures what feeding it the sampled ids
would have exposed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from gad.data import chats
from gad.train import losses
from gad.train.rollout import Completion


def student_examples(
    prompts: list[chats.Example], groups: list[list[Completion]]
) -> list[chats.Example]:
    """Prompt + sampled ids as examples (prompt-major: prompt p's N samples are adjacent)."""
    out = []
    for prompt, group in zip(prompts, groups, strict=True):
        prompt_ids = prompt.input_ids[: prompt.prompt_len]
        for k, completion in enumerate(group):
            out.append(
                chats.Example(
                    f"{prompt.id}#{k}",
                    prompt_ids + completion.token_ids,
                    prompt.prompt_len,
                    completion.finish_reason == "length",
                )
            )
    return out


def engine_logprobs(groups: list[list[Completion]]) -> list[torch.Tensor] | None:
    """The engine's log-probs of each sample's tokens, [L_i] per sample (prompt-major, as
    `student_examples`), or None when the engine gives none (the transformers loop)."""
    flat = [c for group in groups for c in group]
    if not flat or any(c.logprobs is None for c in flat):
        return None
    return [torch.tensor(c.logprobs, dtype=torch.float32) for c in flat]


@dataclass
class GapTotals:
    """How far the trainer's log-probs of sampled tokens are from the engine's that sampled
    them, summed over micro-batches: mean and max absolute difference per response token."""

    total: float = 0.0
    tokens: float = 0.0
    max: float = 0.0

    def add(self, logp_bt: torch.Tensor, engine_bt: torch.Tensor, mask_bt: torch.Tensor) -> None:
        """logp_bt, engine_bt: [B, T] log-probs of the same tokens; mask_bt: [B, T] response."""
        diff_bt = (losses.upcast(logp_bt.detach()) - losses.upcast(engine_bt)).abs()
        diff_bt = diff_bt * (mask_bt != 0)
        self.total += float(diff_bt.sum())
        self.tokens += float((mask_bt != 0).sum())
        self.max = max(self.max, float(diff_bt.max()))

    def mean(self) -> float:
        return self.total / max(self.tokens, 1.0)


def discriminator_inputs(
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    groups: list[list[Completion]],
    max_response_tokens: int,
) -> list[chats.Example]:
    """The student samples as the discriminator sees them (prompt-major): their decoded text,
    re-encoded by `chats.discriminator_input` exactly as a teacher answer of the same text and
    finish would be."""
    return [
        chats.discriminator_input(
            tokenizer,
            prompt,
            completion.text,
            finished=completion.finish_reason == "stop",
            max_response_tokens=max_response_tokens,
            id=f"s{p}#{k}",
        )
        for p, (prompt, group) in enumerate(zip(prompts, groups, strict=True))
        for k, completion in enumerate(group)
    ]


def teacher_discriminator_inputs(
    tokenizer: Any, records: list[chats.Record], max_response_tokens: int
) -> list[chats.Example]:
    """The teacher answers as the discriminator sees them, by the same rule as the samples
    (`discriminator_inputs`); finished unless the record says its writer cut it."""
    return [
        chats.discriminator_input(
            tokenizer,
            r.prompt,
            r.response or "",
            finished=chats.record_finished(r),
            max_response_tokens=max_response_tokens,
            id=r.id,
        )
        for r in records
    ]


def noncanonical_share(
    tokenizer: Any, prompts: list[list[dict[str, str]]], groups: list[list[Completion]]
) -> float:
    """Share of samples whose sampled ids are not the canonical encoding of their own text
    (what a discriminator fed the sampled ids could tell from teacher text)."""
    flags = [
        chats.encode_response(tokenizer, prompt, c.text, finished=c.finish_reason == "stop")
        != c.token_ids
        for prompt, group in zip(prompts, groups, strict=True)
        for c in group
    ]
    return sum(flags) / max(1, len(flags))


def length_stats(students: list[chats.Example]) -> dict[str, float]:
    """Mean and max response length of a step's samples and the share cut at the limit."""
    lengths = [len(e.input_ids) - e.prompt_len for e in students]
    return {
        "response/length_mean": sum(lengths) / len(lengths),
        "response/length_max": float(max(lengths)),
        "response/truncated_share": sum(e.truncated for e in students) / len(students),
    }


def replay_push(pool: list[Any], new: list[Any], capacity: int) -> list[Any]:
    """The replay pool after adding `new`: first in, first out, at most `capacity` entries."""
    return (pool + new)[-capacity:] if capacity > 0 else []


def replay_draw(pool: list[Any], k: int, seed: int, step: int) -> list[Any]:
    """`k` entries of the pool (all of it when smaller), drawn without replacement by a
    generator seeded from (seed, step), so a resumed run draws the same."""
    return random.Random(seed * 1_000_003 + step).sample(pool, min(k, len(pool)))


def replay_example(entry: dict[str, Any]) -> chats.Example:
    """A replay-pool entry (a saved `Example` and its teacher index) as an `Example`."""
    return chats.Example(entry["id"], entry["input_ids"], entry["prompt_len"], entry["truncated"])
