"""Supervised fine-tuning on chat records: the SeqKD baseline and GAD's generator warmup.

Response-only cross-entropy, AdamW, constant lr after an optional linear warmup, gradient
clipping and accumulation, bf16 autocast, built on accelerate so one command runs on CPU, one
GPU or several. The loss of an optimizer step is the mean over every response token of the
global batch, whatever the split into micro-batches and processes, so a run on 2 processes
computes the same update as one process with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tqdm.auto import tqdm

from gad import checkpoint, data, evalsets, models, precision
from gad import config as cfg
from gad.discriminator import position_ids_from_mask
from gad.tracking import MetricsLog, tracker_config

log = logging.getLogger(__name__)
console = Console(stderr=True)


def collate(examples: list[data.Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, and `labels` (-100 off the response)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        labels[row, e.prompt_len : n] = input_ids[row, e.prompt_len : n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_logits(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits at the positions that predict response tokens, with their targets.

    Only the positions from the batch's earliest response start on go through the LM head
    (`logits_to_keep`): the prompts' logits are never used, and the full-vocabulary head is the
    costliest layer of a small model. Returns `(logits_btv, targets_bt, mask_bt)` with
    T = width - (earliest response start); the mask is 1 on response tokens (from the labels).
    """
    width = batch["input_ids"].size(1)
    is_response_bt = batch["labels"] != -100
    # First response position of each row (rows without one count as the full width).
    starts_b = torch.where(
        is_response_bt.any(dim=1), is_response_bt.int().argmax(dim=1), torch.tensor(width)
    )
    first = max(1, int(starts_b.min()))
    logits_btv = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from_mask(batch["attention_mask"]),
        logits_to_keep=width - first + 1,
    ).logits[:, :-1]
    return logits_btv, batch["input_ids"][:, first:], is_response_bt[:, first:].float()


def response_nll_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over response tokens of -log p(token | prefix). Shape: scalar."""
    logits_btv, targets_bt, mask_bt = response_logits(model, batch)
    targets_bt = targets_bt.masked_fill(mask_bt == 0, -100)
    return torch.nn.functional.cross_entropy(
        logits_btv.float().reshape(-1, logits_btv.size(-1)),
        targets_bt.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def length_sorted_chunks(examples: list[data.Example], size: int) -> list[list[int]]:
    """Indices of `examples` in micro-batches of similar length, longest first.

    Sampled responses of one group range from a few tokens to the cap; batching neighbours by
    length instead of by prompt cuts the padding every forward/backward pass computes. The
    losses are sums over sequences, so the grouping does not change them.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    return [order[i : i + size] for i in range(0, len(order), size)]


def batch_plan(n_examples: int, epochs: int, global_batch: int, seed: int) -> list[list[int]]:
    """Example indices of every optimizer step, fixed by the seed, so resuming at step k
    continues with exactly the batches an uninterrupted run would see.

    Each epoch is a fresh permutation; its last batch is filled up from the epoch's start (as
    torch's DistributedSampler does) so every step has a full global batch.
    """
    steps: list[list[int]] = []
    per_epoch = math.ceil(n_examples / global_batch)
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n_examples, generator=g).tolist()
        order = (order * math.ceil(per_epoch * global_batch / n_examples))[
            : per_epoch * global_batch
        ]
        steps += [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    return steps


def micro_batches(
    step_indices: list[int], rank: int, world: int, batch_size: int
) -> list[list[int]]:
    """This process's micro-batches of one optimizer step (interleaved across processes)."""
    chunks = [step_indices[i : i + batch_size] for i in range(0, len(step_indices), batch_size)]
    return [chunk for i, chunk in enumerate(chunks) if i % world == rank]


def make_optimizer(model: Any, lr: float, weight_decay: float, betas: tuple[float, float]) -> Any:
    """AdamW with no decay on biases and norms (the usual transformer split)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def constant_with_warmup(optimizer: Any, warmup_steps: int) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    )


def make_accelerator(mixed_precision: str, report_to: str, run_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state; a second stage in the same process (the demo,
    # a notebook) may ask for another precision. The distributed group itself is kept.
    AcceleratorState._reset_state(reset_partial_state=False)

    # Without an accelerator device, accelerate only forms a multi-process (gloo) group when
    # told it runs on CPU; torchrun's environment alone leaves each process on its own.
    has_device = torch.cuda.is_available() or (
        hasattr(torch, "accelerator") and torch.accelerator.is_available()
    )
    return Accelerator(
        cpu=not has_device,
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_dir=str(run_dir),
    )


@dataclass
class Prepared:
    """Tokenised training data and what was set aside, for the run summary."""

    examples: list[data.Example]
    skipped_invalid: list[str]
    prompt_too_long: list[str]
    truncated: list[str]
    """Responses cut here at `max_response_tokens`."""
    unfinished: list[str] = dataclasses.field(default_factory=list)
    """Responses their writer already cut (`meta.finish_reason == "length"`)."""
    records: dict[str, data.Record] = dataclasses.field(default_factory=dict)
    """The records behind `examples`, by id (the discriminator re-encodes their text)."""


def prepare_data(
    path: str,
    tokenizer: Any,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    skip_invalid: bool,
    exclude: str | None = None,
) -> Prepared:
    loaded = data.read_records(path, skip_invalid=skip_invalid)
    evalsets.refuse_overlap(loaded.records, exclude, path)
    encoded = data.encode_sft(
        tokenizer,
        loaded.records,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
    )
    if not encoded.examples:
        raise data.DataError(f"{path}: no usable training record")
    used = {e.id for e in encoded.examples}
    return Prepared(
        encoded.examples,
        loaded.skipped,
        encoded.prompt_too_long,
        encoded.truncated,
        encoded.unfinished,
        {r.id: r for r in loaded.records if r.id in used},
    )


def train(config: cfg.SFTConfig) -> Path:
    """Run SFT as configured; returns the folder of the final model (a plain HF folder)."""
    started = time.time()
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config, choice = precision.apply(config)
    accelerator = make_accelerator(config.mixed_precision, config.report_to, run_dir)
    resume_from = checkpoint.latest(run_dir) if config.resume else None
    if config.resume and resume_from is None:
        console.print(f"no checkpoint yet in {run_dir}: starting fresh")
    if accelerator.is_main_process:
        cfg.save(config, run_dir / "config.yaml", {"mixed_precision": choice.reason})

    torch.manual_seed(config.seed)
    source = str(resume_from) if resume_from else config.model
    # Data first: a bad record should fail in a second, not after loading the model.
    prepared = prepare_data(
        config.data,
        models.load_tokenizer(source),
        max_prompt_tokens=config.max_prompt_tokens,
        max_response_tokens=config.max_response_tokens,
        skip_invalid=config.skip_invalid,
        exclude=config.exclude,
    )
    model, tokenizer = models.load(source)
    model.config.use_cache = False
    model.train()
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.batch_size * config.grad_accum * world
    plan = batch_plan(len(prepared.examples), config.epochs, global_batch, config.seed)
    total_steps = min(len(plan), config.max_steps) if config.max_steps else len(plan)

    optimizer = make_optimizer(model, config.lr, config.weight_decay, config.adam_betas)
    scheduler = constant_with_warmup(optimizer, config.warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = 0
    if resume_from is not None:
        start_step = checkpoint.load_state(
            resume_from, optimizers={"model": optimizer}, schedulers={"model": scheduler}
        )["step"]
        console.print(f"resuming from {resume_from} at step {start_step}")
    if config.report_to != "none":
        accelerator.init_trackers("gad-sft", config=tracker_config(cfg.to_dict(config)))
    metrics = MetricsLog(run_dir, accelerator, resume_step=start_step if resume_from else None)
    if accelerator.is_main_process:
        print_data_summary(prepared, len(plan), global_batch)

    def save(step: int) -> Path:
        return checkpoint.save(
            run_dir,
            step,
            accelerator,
            model=model,
            tokenizer=tokenizer,
            optimizers={"model": optimizer},
            schedulers={"model": scheduler},
            keep=config.keep_checkpoints,
        )

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="sft",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    last_loss = float("nan")
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        step_examples = [prepared.examples[i] for i in plan[step]]
        # Normalise by the global batch's response-token count: every token weighs the same
        # however the batch is split; x world undoes DDP's averaging of gradients.
        n_tokens = sum(len(e.input_ids) - e.prompt_len for e in step_examples)
        mine = micro_batches(plan[step], rank, world, config.batch_size)
        loss_sum = torch.zeros(())
        seen_tokens = 0
        for m, indices in enumerate(mine):
            batch = collate([prepared.examples[i] for i in indices], tokenizer.pad_token_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            seen_tokens += int(batch["attention_mask"].sum())
            sync = m == len(mine) - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                nll = response_nll_sum(model, batch)
                accelerator.backward(nll * world / n_tokens)
            loss_sum += nll.detach().cpu()
        grad_norm = (
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            if config.max_grad_norm > 0
            else None
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = accelerator.reduce(loss_sum.to(accelerator.device), "sum").item() / n_tokens
        seen = accelerator.reduce(torch.tensor(seen_tokens, device=accelerator.device), "sum")
        last_loss = loss
        done = step + 1
        if done % config.log_every == 0 or done == total_steps:
            seconds = time.perf_counter() - t0
            metrics.log(
                done,
                {
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "response_tokens": n_tokens,
                    "tokens_per_s": float(seen) / seconds,
                    "seconds": seconds,
                    "epoch": step * global_batch / len(prepared.examples),
                },
            )
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if config.save_every and done % config.save_every == 0 and done < total_steps:
            save(done)
    bar.close()
    if config.save_state and (total_steps > start_step or resume_from is None):
        save(total_steps)
    final_dir = run_dir / "final"
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(final_dir, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
        summary = {
            "steps": total_steps,
            "planned_steps": len(plan),
            "examples": len(prepared.examples),
            "skipped_invalid": len(prepared.skipped_invalid),
            "prompt_too_long": prepared.prompt_too_long,
            "truncated_responses": len(prepared.truncated),
            "final_loss": last_loss,
            "wall_seconds": round(time.time() - started, 2),
            "final_model": str(final_dir),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        console.print(
            f"sft done: {total_steps} steps, final loss {last_loss:.4f}, "
            f"model in [bold]{final_dir}[/]"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_dir


# Above this share of cut-off answers the setup warns: few finished answers teach the student
# to stop mid-sentence, and "cut or not" becomes a length cue for the discriminator.
UNFINISHED_WARN_SHARE = 0.1


def print_data_summary(prepared: Prepared, steps: int, global_batch: int) -> None:
    console.print(
        f"data: {len(prepared.examples)} examples, {steps} optimizer steps of {global_batch}"
    )
    if prepared.skipped_invalid:
        console.print(f"[yellow]skipped {len(prepared.skipped_invalid)} invalid record(s):[/]")
        for reason in prepared.skipped_invalid[:5]:
            console.print(f"  {reason}")
    if prepared.prompt_too_long:
        console.print(
            f"[yellow]left out {len(prepared.prompt_too_long)} record(s) whose prompt exceeds "
            f"max_prompt_tokens: {', '.join(prepared.prompt_too_long[:5])}[/]"
        )
    if prepared.truncated:
        console.print(
            f"[yellow]{len(prepared.truncated)} response(s) cut at max_response_tokens[/]"
        )
    cut = len(set(prepared.truncated) | set(prepared.unfinished))
    if cut > UNFINISHED_WARN_SHARE * len(prepared.examples):
        console.print(
            f"[yellow]warning: {cut} of {len(prepared.examples)} answers "
            f"({cut / len(prepared.examples):.0%}) are cut off ({len(prepared.unfinished)} by "
            f"their writer, {len(prepared.truncated)} at max_response_tokens): they are learnt and "
            "shown to a discriminator without an end-of-turn token. Raise max_response_tokens, "
            "or the teacher's max_tokens in `gad collect`, so that most answers finish.[/]"
        )
