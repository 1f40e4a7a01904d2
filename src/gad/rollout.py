"""Generation behind one small interface: prompt ids in, sampled completions (ids + text) out.

The training loop computes log-probs on exactly the ids returned here, never on re-encoded text.
`TransformersRollout` is the implementation for now; a vLLM one needs only the same `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from gad import data, precision


@dataclass(frozen=True)
class Sampling:
    """How to sample; the paper uses temperature 0.8 and up to 1536 new tokens."""

    temperature: float = 0.8
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_response_tokens: int = 1536
    """Longest completion; a completion cut here has finish reason `length`."""


@dataclass
class Completion:
    """One sampled response to one prompt."""

    token_ids: list[int]
    """Generated ids, ending with the end-of-turn id when `finish_reason == "stop"`."""
    text: str
    """Decoded text without special tokens."""
    finish_reason: Literal["stop", "length"]


class Rollout(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        sampling: Sampling,
        seeds: list[int] | None = None,
    ) -> list[list[Completion]]:
        """`n` completions for each prompt (token ids), in prompt order. With `seeds`, prompt i's
        samples depend only on `seeds[i]`, not on batching or on which process runs it."""
        ...


class TransformersRollout:
    """Batched `model.generate` with KV cache; prompts sorted by length to cut padding."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        eos_id: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # The model runs under this autocast: its weights are cast once per `generate`, not at
        # every decoded token (`precision.cast_weights_once`: the same numbers, bit for bit).
        self.autocast_dtype = autocast_dtype
        # Generation stops where the chat template ends a turn, so a finished sample ends with
        # exactly the token a templated teacher answer ends with.
        self.eos_id = data.end_of_turn_id(tokenizer) if eos_id is None else eos_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        sampling: Sampling,
        seeds: list[int] | None = None,
    ) -> list[list[Completion]]:
        jobs = [(i, k) for i in range(len(prompts)) for k in range(n)]
        if seeds is None:
            # Ordered by length so that a batch holds similar lengths (less padding).
            jobs.sort(key=lambda job: len(prompts[job[0]]))
            batches = [jobs[s : s + self.batch_size] for s in range(0, len(jobs), self.batch_size)]
        else:
            batches = [jobs[i * n : (i + 1) * n] for i in range(len(prompts))]
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        with precision.cast_weights_once(self.model, self.autocast_dtype):
            for batch in batches:
                self._generate_batch(prompts, batch, sampling, seeds, results, device)
        self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _generate_batch(
        self,
        prompts: list[list[int]],
        batch: list[tuple[int, int]],
        sampling: Sampling,
        seeds: list[int] | None,
        results: list[list[Completion | None]],
        device: Any,
    ) -> None:
        """Generate one batch of (prompt, sample) jobs into `results`."""
        if seeds is not None:
            torch.manual_seed(seeds[batch[0][0]])
        width = max(len(prompts[i]) for i, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (i, _) in enumerate(batch):
            ids = prompts[i]
            # Left padding: generation appends on the right of every row.
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        greedy = sampling.temperature <= 0
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            max_new_tokens=sampling.max_response_tokens,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        for row, (i, k) in enumerate(batch):
            results[i][k] = self._completion(out[row, width:].tolist())

    def _completion(self, generated: list[int]) -> Completion:
        if self.eos_id in generated:
            ids, reason = generated[: generated.index(self.eos_id) + 1], "stop"
        else:
            ids, reason = generated, "length"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(token_ids=ids, text=text, finish_reason=reason)  # type: ignore[arg-type]
