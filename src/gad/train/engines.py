"""Which engine generates from a local model, chosen once per run and said with its reason
(like `mixed_precision: auto`): gad's own transformers loop, or vLLM (`vllm_rollout`).

`for_policy` builds the engine of a training stage (it follows the policy's updates);
`for_model` the engine of a command that only generates (collect, generate, label, judge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from gad.models import store
from gad.train.rollout import Rollout, TransformersRollout
from gad.train.vllm_rollout import INSTALL, EngineError, VLLMRollout, available

console = Console(stderr=True)
VLLM_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def choose(requested: str, device: torch.device, lora: bool) -> tuple[str, str]:
    """The engine a run generates with, and why (said like `mixed_precision: auto`'s choice).

    `auto`: vLLM on a GPU when it is installed and the run is full-parameter; the transformers
    loop on a CPU, where vLLM's 20-30 s start-up outweighs a small run's generation, and
    wherever vLLM is missing. An explicit `vllm` that cannot run is an error, never a silent
    switch."""
    if requested == "transformers":
        return "transformers", "engine: transformers (asked)"
    if requested == "vllm":
        if not available():
            raise EngineError(f"engine: vllm is not installed; {INSTALL}")
        if lora:
            raise EngineError(
                "engine: vllm with lora_rank > 0 is not supported yet (the merged weights would "
                "be pushed after every update); use --engine transformers or full fine-tuning"
            )
        return "vllm", "engine: vllm (asked)"
    if device.type != "cuda":
        return (
            "transformers",
            f"engine: auto -> transformers ({device.type}: vLLM's start-up outweighs a small run)",
        )
    if not available():
        return "transformers", f"engine: auto -> transformers (vLLM is not installed: {INSTALL})"
    if lora:
        return (
            "transformers",
            "engine: auto -> transformers (LoRA runs push no weights to vLLM yet)",
        )
    return "vllm", "engine: auto -> vllm (a GPU, vLLM installed)"


def for_policy(
    requested: str,
    accelerator: Any,
    policy: Any,
    source: str | Path,
    tokenizer: Any,
    *,
    lora: bool,
    optimizer: Any,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
    seed: int,
) -> Rollout:
    """A training stage's engine: the transformers loop on `policy` itself, or a vLLM engine
    started on `source` (the policy's folder as the stage starts) that follows `optimizer`'s
    steps. vLLM runs single-process for now: a multi-process launch is refused."""
    engine, reason = choose(requested, accelerator.device, lora)
    if engine == "vllm" and accelerator.num_processes > 1:
        raise EngineError(
            "engine: vllm runs single-process for now (one engine per process is not wired "
            "yet); launch one process or use --engine transformers"
        )
    if accelerator.is_main_process and requested != "transformers":
        console.print(reason)
    if engine == "vllm":
        dtype = VLLM_DTYPES.get(autocast_dtype, "float32")  # type: ignore[arg-type]
        return VLLMRollout(
            store.resolve(source), tokenizer, dtype=dtype, seed=seed, policy=policy,
            optimizer=optimizer,
        )  # fmt: skip
    return TransformersRollout(
        policy, tokenizer, batch_size=batch_size, autocast_dtype=autocast_dtype
    )


def for_model(
    requested: str, model: str, dtype: str, seed: int, batch_size: int
) -> tuple[Rollout, Any]:
    """The engine and tokenizer of a local model that only generates (no updates follow)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine, reason = choose(requested, device, lora=False)
    if requested != "transformers":
        console.print(reason)
    if engine == "vllm":
        tokenizer = store.load_tokenizer(model)
        return VLLMRollout(store.resolve(model), tokenizer, dtype=dtype, seed=seed), tokenizer
    loaded, tokenizer = store.load(model, dtype=getattr(torch, dtype))
    return TransformersRollout(loaded, tokenizer, batch_size=batch_size), tokenizer
