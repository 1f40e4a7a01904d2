"""Supervised fine-tuning on chat records: the SeqKD baseline and GAD's generator warmup.

Response-only cross-entropy, AdamW, constant lr after an optional linear warmup, gradient
clipping and accumulation, bf16 autocast, built on accelerate so one command runs on CPU, one
GPU or several. The loss of an optimizer step is the mean over every response token of the
global batch, whatever the split into micro-batches and processes, so a run on 2 processes
computes the same update as one process with the same global batch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from gad.config import load as cfg
from gad.core import checkpoint
from gad.core.tracking import MetricsLog, PhaseTimer, tracker_config
from gad.data import dataset
from gad.models import lora, lora_roles, store
from gad.train import engine, loop

log = logging.getLogger(__name__)
console = Console(stderr=True)


@dataclass
class _Run:
    """One SFT run's live state (models wrapped by accelerate)."""

    config: cfg.SFTConfig
    run_dir: Path
    accelerator: Any
    prepared: dataset.Prepared
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    plan: list[list[int]]
    global_batch: int


def train(config: cfg.SFTConfig) -> Path:
    """Run SFT as configured; returns the folder of the final model (a plain HF folder)."""
    started = time.time()
    run_dir = Path(config.output_dir)
    config, accelerator = loop.start(config, run_dir, run_dir / "config.yaml")
    resume_from = loop.resume_point(run_dir, config.resume)
    run = _setup(config, run_dir, accelerator, resume_from)
    start_step = loop.restore(
        resume_from, "sft", optimizers={"model": run.optimizer}, schedulers={"model": run.scheduler}
    )["step"]
    if config.report_to != "none":
        accelerator.init_trackers("gad-sft", config=tracker_config(cfg.to_dict(config)))
    metrics = MetricsLog(run_dir, accelerator, resume_step=start_step if resume_from else None)
    if accelerator.is_main_process:
        dataset.print_summary(run.prepared, len(run.plan), run.global_batch)
    total_steps = min(len(run.plan), config.max_steps) if config.max_steps else len(run.plan)
    skipped = [0]

    def step_fn(step: int, timer: PhaseTimer) -> dict[str, Any]:
        row = _step(run, step)
        skipped[0] += int(row["skipped"])
        return row

    spec = loop.Loop(
        "sft",
        total_steps,
        start_step,
        metrics,
        ("loss",),
        accelerator.is_main_process,
        lambda step, final: _save(run, step),
        config.save_every,
        save_final=config.save_state and (total_steps > start_step or resume_from is None),
        log_every=config.log_every,
    )
    last_loss, skipped = loop.run(spec, step_fn).get("loss", float("nan")), skipped[0]
    summary = {"steps": total_steps, "final_loss": last_loss, "skipped_steps": skipped}
    final_dir = _finish(run, summary | {"wall_seconds": round(time.time() - started, 2)})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_dir


def _setup(
    config: cfg.SFTConfig, run_dir: Path, accelerator: Any, resume_from: Path | None
) -> _Run:
    """Data, model, optimizer and the batch plan (from the latest checkpoint on resume)."""
    torch.manual_seed(config.seed)
    source = str(resume_from) if resume_from else config.model
    # Data first: a bad record should fail in a second, not after loading the model.
    prepared = dataset.prepare(config.data, store.load_tokenizer(source), config)
    if lora.enabled(config):
        # A frozen base from `model` and the adapter: the checkpoint's on resume, else fresh.
        lora_roles.check_accelerator(accelerator)
        adapters, tokenizer = lora_roles.base_adapters(config.model)
        adapters.autocast = accelerator.autocast
        model = lora_roles.policy(adapters, config, resume_from)
    else:
        model, tokenizer = store.load(source)
        model.config.use_cache = False
    checkpoint.check_space(run_dir, model)
    model.train()
    global_batch = config.micro_batch_size * config.grad_accum * accelerator.num_processes
    plan = engine.batch_plan(len(prepared.examples), config.epochs, global_batch, config.seed)
    optimizer = engine.make_optimizer(model, config.lr, config.weight_decay, config.adam_betas)
    scheduler = engine.constant_with_warmup(optimizer, config.warmup_steps)
    if lora.enabled(config):
        optimizer = accelerator.prepare(optimizer)  # views share a base: accelerate wraps none
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    return _Run(
        config,
        run_dir,
        accelerator,
        prepared,
        model,
        tokenizer,
        optimizer,
        scheduler,
        plan,
        global_batch,
    )


def _step(run: _Run, step: int) -> dict[str, Any]:
    """One optimizer step of response-only cross-entropy over the step's global batch."""
    t0 = time.perf_counter()
    acc, examples = run.accelerator, run.prepared.examples
    world = acc.num_processes
    step_examples = [examples[i] for i in run.plan[step]]
    # Normalise by the global batch's response-token count: every token weighs the same
    # however the batch is split; x world undoes DDP's averaging of gradients.
    n_tokens = sum(len(e.input_ids) - e.prompt_len for e in step_examples)
    mine, _ = engine.local_slice(run.plan[step], acc.process_index, world)
    totals = {"nll": 0.0, "seen": 0.0}

    def loss_of(indices: list[int]) -> torch.Tensor:
        batch = engine.on_device(
            [examples[i] for i in indices], run.tokenizer.pad_token_id, acc.device
        )
        totals["seen"] += float(batch["attention_mask"].sum())
        nll = engine.response_nll_sum(run.model, batch)
        totals["nll"] += nll.item()
        return nll * world / n_tokens

    result = engine.optimizer_step(
        acc,
        run.model,
        run.optimizer,
        engine.chunks(mine, run.config.micro_batch_size),
        loss_of,
        run.config.max_grad_norm,
        run.scheduler,
    )
    nll, seen = engine.reduce_sum(acc, [totals["nll"], totals["seen"]])
    seconds = time.perf_counter() - t0
    return {
        "loss": nll / n_tokens,
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": result.grad_norm,
        "skipped": result.skipped,
        "response_tokens": n_tokens,
        "tokens_per_s": seen / seconds,
        "seconds": seconds,
        "epoch": step * run.global_batch / len(examples),
    }


def _save(run: _Run, step: int) -> Path:
    return checkpoint.save(
        run.run_dir,
        step,
        run.accelerator,
        model=run.model,
        tokenizer=run.tokenizer,
        optimizers={"model": run.optimizer},
        schedulers={"model": run.scheduler},
        keep=run.config.keep_checkpoints,
    )


def _finish(run: _Run, summary: dict[str, Any]) -> Path:
    """`final/` (a plain HF folder) and `summary.json`."""
    final_dir = run.run_dir / "final"
    acc, prepared = run.accelerator, run.prepared
    if acc.is_main_process:
        if lora.enabled(run.config):
            lora_roles.save_merged(run.model, final_dir, run.tokenizer)
        else:
            acc.unwrap_model(run.model).save_pretrained(final_dir, safe_serialization=True)
            run.tokenizer.save_pretrained(final_dir)
        summary = {
            "steps": summary["steps"],
            "planned_steps": len(run.plan),
            "examples": len(prepared.examples),
            "skipped_invalid": len(prepared.skipped_invalid),
            "prompt_too_long": prepared.prompt_too_long,
            "truncated_responses": len(prepared.truncated),
            "final_loss": summary["final_loss"],
            "skipped_steps": summary["skipped_steps"],
            "wall_seconds": summary["wall_seconds"],
            "final_model": str(final_dir),
        }
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        console.print(
            f"sft done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"model in [bold]{final_dir}[/]"
        )
    return final_dir
