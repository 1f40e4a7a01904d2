"""The settings several stages share, each declared once with one docstring and one range:
the stages' dataclasses (`train_configs`, `data_configs`) inherit the parts they use, so every
field stays flat (`config.lr`, `--lr`, `lr:` in YAML) and keeps one meaning everywhere.

A stage that needs another default redeclares the field with its type and new default only;
its docstring and range stay the part's. `values(config, *parts)` hands the parts one stage
shares with another (`gad label` builds its collection and its judge that way).

Pure declarations: importing this must stay cheap (`gad --help`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from gad.config.ranges import (
    AdamBeta,
    Count,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveShare,
    Seed,
    ShareBelow1,
    Temperature,
    TopP,
)
from gad.config.setting_types import LocalModel, Names, ReadFile


def values(config: Any, *parts: type) -> dict[str, Any]:
    """`config`'s values of every field of `parts` (a stage composed of them)."""
    return {f.name: getattr(config, f.name) for part in parts for f in dataclasses.fields(part)}


# ---------------------------------------------------------------- training stages


@dataclass(frozen=True)
class Optimiser:
    """AdamW, for every model a training stage updates."""

    lr: PositiveFloat = 5e-6
    """Learning rate (of the generator in both `gad train` stages; paper: SeqKD 5e-6, GAD 1e-6,
    5e-6 with a Qwen2.5 teacher)."""
    weight_decay: NonNegativeFloat = 0.01
    """AdamW weight decay (none on biases and norms)."""
    adam_betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.999)
    """AdamW betas, of every optimizer of the stage."""
    max_grad_norm: NonNegativeFloat = 1.0
    """Gradient clipping by global norm, of every model the stage trains (GAD's reference
    scripts: 0.2); 0 disables."""


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters instead of full fine-tuning."""

    lora_rank: NonNegativeInt = 0
    """LoRA rank: above 0 the stage trains peft LoRA adapters on a frozen base instead of every
    weight (checkpoints keep the adapters; `final/` is the merged model, the adapter in
    `final/adapter/`). 0 = full fine-tuning."""
    lora_alpha: PositiveFloat = 16.0
    """LoRA scale α (the adapter's update is multiplied by α / rank)."""
    lora_dropout: ShareBelow1 = 0.0
    """Dropout on the LoRA branch's input."""
    lora_target_modules: Names = "all-linear"
    """Modules that get an adapter: `all-linear` (every linear layer but the LM head) or
    comma-separated module names (`q_proj,v_proj`)."""


@dataclass(frozen=True)
class Precision:
    """How the stage computes."""

    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision (weights and optimizer state stay float32). `auto`: bf16 where the
    hardware computes it natively (a GPU from Ampere on; a CPU where a bf16 matmul measures
    faster than float32, probed once per machine), fp16 on older GPUs, else float32 (`no`)."""


@dataclass(frozen=True)
class Checkpoints:
    """What a training run keeps and where its progress goes."""

    save_every: NonNegativeInt = 50
    """Checkpoint every this many optimizer steps, and always at the end of each stage
    (paper: 50)."""
    save_state: bool = True
    """Write the resumable state (optimizer, RNG) at the end of the run, not only the model
    folder; off saves GBs of disk and some seconds where nobody will resume (demo, benchmarks)."""
    keep_checkpoints: NonNegativeInt = 2
    """Most recent checkpoints kept on disk, per stage (0 keeps all)."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Tracker beside the JSONL metrics file."""
    resume: bool = False
    """Continue from the latest checkpoint in `output_dir` (`gad train`: each stage from its
    own)."""


# ---------------------------------------------------------------- inputs and generation


@dataclass(frozen=True)
class Inputs:
    """How a stage treats its input records."""

    skip_invalid: bool = False
    """Skip malformed input records (counted in the summary) instead of stopping."""
    exclude: ReadFile | None = None
    """Held-out chat-record file: refuse to run if any record overlaps it (by prompt or id)."""


@dataclass(frozen=True)
class TokenLimits:
    """How long a prompt and a response may be, in tokens."""

    max_prompt_tokens: Count = 2048
    """Prompts longer than this after the chat template are reported and left out, never cut
    (a judge's rating prompt is an error; paper: 2048)."""
    max_response_tokens: Count = 1536
    """Longest response: answers are generated up to it, training responses are cut to it (the
    cut is counted in the summary; paper: 1536)."""


@dataclass(frozen=True)
class Sampling:
    """How answers are sampled."""

    temperature: Temperature = 0.8
    """Sampling temperature (paper evaluation: 0.8; 0 = greedy for local models)."""
    top_p: TopP = 1.0
    """Nucleus sampling threshold."""


VLLM_INSTALL = (
    'pip install "gad[vllm]" on a GPU machine; on a CPU, `make setup-vllm` (vLLM\'s CPU build '
    "in its own environment, .venv-vllm)"
)
"""How to install vLLM, said wherever `engine: vllm` finds it missing."""


@dataclass(frozen=True)
class Engine:
    """What generates from a local model."""

    engine: Literal["auto", "transformers", "vllm"] = "auto"
    """Local generation engine: `transformers` (gad's own decode loop), `vllm` (paged attention
    and continuous batching; `pip install "gad[vllm]"`, or `make setup-vllm` on a CPU), or
    `auto`: vLLM on a GPU when it is installed, else the transformers loop (on a CPU vLLM's
    start-up outweighs a small run). The run says which it chose and why."""
    vllm_gpu_memory: PositiveShare = 0.3
    """vLLM on a GPU: the share of the GPU's memory the engine takes (weights and KV cache;
    vLLM's `gpu_memory_utilization`). Colocated with training, the trainer needs the rest."""
    vllm_cpu_kv_cache_gib: PositiveFloat = 1.0
    """vLLM on a CPU: GiB of KV cache it reserves up front (`VLLM_CPU_KVCACHE_SPACE`; vLLM's own
    default takes most of the machine's memory)."""
    vllm_compile: bool = False
    """vLLM: run the model compiled (torch.compile; CUDA graphs on a GPU) instead of eagerly:
    faster decoding after a longer start-up (on a 2-core CPU: 1.31x the tokens/s, ~50 s more
    start-up), worth it for a run that generates much more than a minute's worth."""
    vllm_sleep: bool = False
    """vLLM on a GPU: between rollouts the engine sleeps (its KV cache freed, its weights moved
    to CPU memory), so the training phases have the GPU's memory; it wakes before the next
    rollout (then the new weights are pushed)."""
    vllm_tensor_parallel: Count = 1
    """vLLM: GPUs one engine spans (tensor parallelism). Above 1 it needs a multi-process launch
    (torchrun / accelerate launch) whose process count it divides: each group of that many
    processes shares one engine and generates their prompts together."""


@dataclass(frozen=True)
class LocalGeneration(Engine):
    """A local model that generates."""

    generation_batch_size: Count = 16
    """Local models: prompts generated together in one batch."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Local models: weight dtype."""
    seed: Seed = 0
    """Seed of local sampling (an API's sampling is not seedable in general) and of the stage's
    other random draws (the judge's bootstrap)."""


@dataclass(frozen=True)
class ApiClient:
    """An OpenAI-compatible chat-completions API."""

    base_url: str | None = None
    """Endpoint of the OpenAI-compatible API; None uses the client default or OPENAI_BASE_URL."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never stored)."""
    concurrency: Count = 8
    """Openai backend: requests in flight at once."""
    max_retries: NonNegativeInt = 6
    """Openai backend: the client's retries per request on 429/5xx/timeouts/dropped
    connections."""
    request_timeout: PositiveFloat = 120.0
    """Openai backend: seconds before one request attempt is abandoned (then retried)."""


@dataclass(frozen=True)
class ChatSettings(ApiClient, LocalGeneration, TokenLimits):
    """Where conversations go (`gad.api.chat.connect`): the stages that talk to a chat model
    (`gad collect`, `gad judge`) are these settings and more."""

    backend: Literal["openai", "local"] = "local"
    """`openai`: any OpenAI-compatible chat-completions endpoint; `local`: a local model."""
    model: LocalModel = "qwen2.5-coder-0.5b"
    """API model name (openai backend) or built-in name / HF folder (local backend)."""
