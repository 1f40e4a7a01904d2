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

from gad.config import rules
from gad.config.parts import VLLM_INSTALL, Engine, LocalGeneration
from gad.models import store
from gad.train.rollout import Rollout, TransformersRollout
from gad.train.vllm_rollout import EngineError, VLLMRollout, available

console = Console(stderr=True)
VLLM_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def choose(requested: str, device: torch.device, settings: Engine = Engine()) -> tuple[str, str]:
    """The engine a run generates with, and why (said like `mixed_precision: auto`'s choice).

    `auto`: vLLM on a GPU when it is installed; the transformers loop on a CPU, where vLLM's
    20-30 s start-up outweighs a small run's generation, and wherever vLLM is missing (or, found
    when it starts, does not run the model: `for_policy`, `for_model` say so). An explicit `vllm`
    that cannot run is an error, never a switch."""
    if requested == "auto" and (device.type != "cuda" or not available()):
        engine, reason = _auto(device)
        unused = rules.vllm_settings_set(settings)
        return engine, reason + (f"; {', '.join(unused)} unused" if unused else "")
    if requested == "transformers":
        return "transformers", "engine: transformers (asked)"
    if requested == "vllm":
        if not available():
            raise EngineError(f"engine: vllm is not installed; {VLLM_INSTALL}")
        if settings.vllm_sleep and device.type != "cuda":
            raise EngineError(
                f"vllm_sleep needs a GPU (vLLM's sleep mode frees GPU memory; this run is on "
                f"{device.type}); leave it off"
            )
        return "vllm", "engine: vllm (asked)"
    return "vllm", "engine: auto -> vllm (a GPU, vLLM installed)"


def _auto(device: torch.device) -> tuple[str, str]:
    if device.type != "cuda":
        return (
            "transformers",
            f"engine: auto -> transformers ({device.type}: vLLM's start-up outweighs a small run)",
        )
    return "transformers", f"engine: auto -> transformers (vLLM is not installed: {VLLM_INSTALL})"


def for_policy(
    settings: Engine,
    accelerator: Any,
    policy: Any,
    source: str | Path,
    tokenizer: Any,
    *,
    optimizer: Any,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
    seed: int,
) -> Rollout:
    """A training stage's engine: the transformers loop on `policy` itself, or a vLLM engine
    started on `source` (the policy's folder as the stage starts; a LoRA policy's base) that
    follows `optimizer`'s steps. Under a multi-process launch each process runs its own."""
    engine, reason = choose(settings.engine, accelerator.device, settings)
    if settings.vllm_tensor_parallel > 1 and engine == "vllm" and accelerator.num_processes < 2:
        raise EngineError(
            f"vllm_tensor_parallel={settings.vllm_tensor_parallel} needs a multi-process launch "
            "(torchrun / accelerate launch) whose processes the engine spans"
        )
    if accelerator.is_main_process and settings.engine != "transformers":
        console.print(reason)
    if engine == "vllm":
        dtype = VLLM_DTYPES.get(autocast_dtype, "float32")  # type: ignore[arg-type]
        try:
            return VLLMRollout(
                store.resolve(source), tokenizer, settings=settings, dtype=dtype, seed=seed,
                policy=policy, optimizer=optimizer, launcher=accelerator.num_processes > 1,
                logprobs=True,
            )  # fmt: skip
        except EngineError as err:
            if settings.engine != "auto":
                raise
            if accelerator.is_main_process:
                console.print(f"engine: auto -> transformers ({err})")
    return TransformersRollout(
        policy, tokenizer, batch_size=batch_size, autocast_dtype=autocast_dtype
    )


def for_model(settings: LocalGeneration, model: str) -> tuple[Rollout, Any]:
    """The engine and tokenizer of a local model that only generates (no updates follow)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine, reason = choose(settings.engine, device, settings)
    if settings.engine != "transformers":
        console.print(reason)
    if engine == "vllm":
        tokenizer = store.load_tokenizer(model)
        try:
            rollout = VLLMRollout(
                store.resolve(model), tokenizer, settings=settings, dtype=settings.dtype,
                seed=settings.seed,
            )  # fmt: skip
            return rollout, tokenizer
        except EngineError as err:
            if settings.engine != "auto":
                raise
            console.print(f"engine: auto -> transformers ({err})")
    loaded, tokenizer = store.load(model, dtype=getattr(torch, settings.dtype))
    rollout = TransformersRollout(loaded, tokenizer, batch_size=settings.generation_batch_size)
    return rollout, tokenizer
