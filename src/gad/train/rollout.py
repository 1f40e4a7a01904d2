"""Generation behind one small interface: prompt ids in, sampled completions (ids + text) out.

The training loop computes log-probs on exactly the ids returned here, never on re-encoded text.
`TransformersRollout` is gad's own loop; `vllm_rollout.VLLMRollout` the same interface on vLLM.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from gad.data import chats
from gad.models import padding, precision

Ids = list[list[int]]
"""Token ids of each prompt (chat template applied, generation prompt included)."""
Seeds = list[int] | None
"""One seed per prompt: its samples then depend on nothing else (not batching, not process)."""


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
    logprobs: list[float] | None = None
    """The engine's log-prob of each token after temperature (vLLM), else None: the trainer
    compares them with its own (`rollout/logp_gap`)."""


Groups = list[list[Completion]]
"""Completions per prompt, in prompt order: `groups[i][k]` is prompt i's k-th sample."""


class Rollout(Protocol):
    """What a generation engine gives the trainer (the transformers loop below; vLLM)."""

    def generate(self, prompts: Ids, n: int, sampling: Sampling, seeds: Seeds = None) -> Groups:
        """`n` completions for each prompt (token ids), in prompt order. With `seeds`, prompt i's
        samples depend only on `seeds[i]`, not on batching or on which process runs it."""
        ...

    def close(self) -> None:
        """Release what the engine holds (a stage's end); generating afterwards is an error."""
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
        self.eos_id = chats.end_of_turn_id(tokenizer) if eos_id is None else eos_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    def close(self) -> None:
        """Nothing to release: the loop generates with the trainer's own model."""

    @torch.no_grad()
    def generate(self, prompts: Ids, n: int, sampling: Sampling, seeds: Seeds = None) -> Groups:
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
        # A LoRA view merges its adapter for the rollout; a plain model casts its weights once.
        fast = getattr(self.model, "rollout_weights", None)
        weights = fast or (lambda dtype: precision.cast_weights_once(self.model, dtype))
        with weights(self.autocast_dtype):
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
        ids, mask = input_ids.to(device), attention.to(device)
        out = decode(self.model, ids, mask, sampling, self.eos_id, self.pad_id)
        for row, (i, k) in enumerate(batch):
            results[i][k] = self._completion(out[row].tolist())

    def _completion(self, generated: list[int]) -> Completion:
        if self.eos_id in generated:
            ids, reason = generated[: generated.index(self.eos_id) + 1], "stop"
        else:
            ids, reason = generated, "length"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(token_ids=ids, text=text, finish_reason=reason)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- decoding


def sample_next(logits_bv: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """One token per row from next-token logits: greedy at temperature 0, else softmax at the
    temperature, cut to the nucleus `top_p` (the smallest set of top tokens holding that much
    mass, as transformers' TopPLogitsWarper), drawn by inverting the CDF with one uniform per
    row. [B, V] -> [B] long.

    The inverse CDF is why this is not `torch.multinomial`: on a CPU that draws an exponential
    variate for every vocabulary entry (49k per row per token for SmolLM2), which took a fifth
    of a rollout's time.
    """
    if sampling.temperature <= 0:
        return logits_bv.argmax(dim=-1)
    probs_bv = torch.softmax(logits_bv.float() / sampling.temperature, dim=-1)
    order_bv = None
    if sampling.top_p < 1.0:
        probs_bv, order_bv = probs_bv.sort(dim=-1, descending=True)
        mass_before_bv = probs_bv.cumsum(dim=-1) - probs_bv
        probs_bv = probs_bv * (mass_before_bv < sampling.top_p)
    cdf_bv = probs_bv.cumsum(dim=-1)
    u_b1 = torch.rand(cdf_bv.size(0), 1, device=cdf_bv.device) * cdf_bv[:, -1:]
    index_b1 = torch.searchsorted(cdf_bv, u_b1, right=True).clamp(max=cdf_bv.size(1) - 1)
    if order_bv is not None:
        index_b1 = order_bv.gather(1, index_b1)
    return index_b1.squeeze(1)


@torch.no_grad()
def decode(
    model: Any,
    input_ids_bt: torch.Tensor,
    attention_bt: torch.Tensor,
    sampling: Sampling,
    eos_id: int,
    pad_id: int,
) -> torch.Tensor:
    """Sample up to `max_response_tokens` new tokens for left-padded prompts with a KV cache:
    one prefill, then one forward call per token, only the last position through the LM head.
    Rows stop at `eos_id` (later positions hold `pad_id`). Returns the new ids, [B, T_new].

    A plain loop rather than `model.generate`: the same forward calls without generate's
    per-token machinery (logits processors, stopping criteria, cache bookkeeping), and the
    sampler above.
    """
    batch = input_ids_bt.size(0)
    cache_kwarg = _cache_kwarg(model)
    positions_bt = padding.position_ids(attention_bt)
    out = model(
        input_ids=input_ids_bt,
        attention_mask=attention_bt,
        position_ids=positions_bt,
        use_cache=True,
        logits_to_keep=1,
    )
    next_position_b1 = positions_bt[:, -1:] + 1  # left padding: the last column is real
    done_b = torch.zeros(batch, dtype=torch.bool, device=input_ids_bt.device)
    one_b1 = torch.ones((batch, 1), dtype=attention_bt.dtype, device=attention_bt.device)
    new: list[torch.Tensor] = []
    while True:
        token_b = sample_next(out.logits[:, -1], sampling).masked_fill(done_b, pad_id)
        new.append(token_b)
        done_b |= token_b == eos_id
        if len(new) >= sampling.max_response_tokens or bool(done_b.all()):
            break
        attention_bt = torch.cat([attention_bt, one_b1], dim=1)
        out = model(
            input_ids=token_b[:, None],
            attention_mask=attention_bt,
            position_ids=next_position_b1,
            use_cache=True,
            **{cache_kwarg: _cache_of(out)},
        )
        next_position_b1 = next_position_b1 + 1
    return torch.stack(new, dim=1)


def _cache_kwarg(model: Any) -> str:
    """transformers 5.24 renamed the forward's `past_key_values` to `cache`."""
    adapters = getattr(model, "adapters", None)  # a LoRA view runs its shared base
    target = adapters.peft.get_base_model() if adapters is not None else model
    params = inspect.signature(type(target).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")
