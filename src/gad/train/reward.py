"""`gad reward-model`: a reward model distilled from the teacher's labels (SPEC §4 step 3).

The model is the discriminator's: a causal LM backbone with a scalar head
(`discriminator.build`), scored at the last real token of the response, so the saved
`final/` folder loads with `discriminator.load` and plugs into `gad train --reward-model`.

Training data: the records of `gad label` (`labels.jsonl`), teacher and student responses alike
(`sources`), tokenised exactly as the RL loop builds sequences (`chats.encode_sft`: chat template,
response ending with the end-of-turn token). Losses (`losses.py`):

bt   Bradley–Terry on within-prompt pairs: every two responses of one prompt whose labels differ
     (by more than `min_label_gap`) form a pair, the higher label preferred;
     `-log σ(s⁺ - s⁻)` averaged over the step's pairs. A step samples prompts and takes all
     their pairs, so each response is scored once however many pairs it is in. Prompts whose
     responses all share one label give no pair (counted in the summary).
bce  pointwise binary cross-entropy of σ(score) against `meta.good` (1 = correct / good).

A deterministic split by prompt content (`evalsets.is_held_out`) holds out `held_out` of the
prompts; their pairs measure pairwise accuracy (share of pairs ranked strictly right) before
training, every `eval_every` steps and at the end. Also reported: the same on student-only
pairs (what RL needs: ranking the student's own samples), and pointwise accuracy (score > 0 on
good responses, < 0 on the others; meaningful for `bce`).

"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from gad.config import load as cfg
from gad.core import checkpoint
from gad.core.tracking import MetricsLog, PhaseTimer, tracker_config
from gad.data import chats, evalsets
from gad.data.labels import read_labels
from gad.models import discriminator, lora, lora_roles, store
from gad.train import engine, loop, score_losses

console = Console(stderr=True)


def make_pairs(
    prompt_ids: list[str], labels: list[float], min_gap: float = 0.0
) -> list[tuple[int, int]]:
    """(preferred, other) index pairs: every two items of one prompt whose labels differ by
    more than `min_gap`, the higher label first. Order: by prompt (first appearance), then by
    index, so the same data always gives the same pairs."""
    by_prompt: dict[str, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        by_prompt.setdefault(pid, []).append(i)
    pairs = []
    for items in by_prompt.values():
        for a, i in enumerate(items):
            for j in items[a + 1 :]:
                if labels[i] - labels[j] > min_gap:
                    pairs.append((i, j))
                elif labels[j] - labels[i] > min_gap:
                    pairs.append((j, i))
    return pairs


@dataclass
class Split:
    """One side of the held-out split: tokenised responses, their labels, and their pairs."""

    examples: list[chats.Example] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    good: list[bool] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    prompt_ids: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    pair_groups: list[list[tuple[int, int]]] = field(default_factory=list)
    """`pairs` by prompt (prompts without a pair left out): the units a BT step samples."""


def prepare(config: cfg.RewardConfig, tokenizer: Any) -> tuple[Split, Split, dict[str, Any]]:
    """(train, held-out, counts) from the labelled records."""
    records = read_labels(config.data)
    if config.sources != "both":
        records = [r for r in records if r.meta["source"] == config.sources]
    encoded = chats.encode_sft(
        tokenizer,
        records,
        max_prompt_tokens=config.max_prompt_tokens,
        max_response_tokens=config.max_response_tokens,
    )
    by_id = {e.id: e for e in encoded.examples}
    train, held = Split(), Split()
    for record in records:
        example = by_id.get(record.id)
        if example is None:
            continue  # prompt too long: counted below
        side = held if evalsets.is_held_out(record, config.held_out, config.split_seed) else train
        side.examples.append(example)
        side.labels.append(float(record.meta["label"]))
        side.good.append(bool(record.meta["good"]))
        side.sources.append(str(record.meta["source"]))
        side.prompt_ids.append(str(record.meta["prompt_id"]))
    for side in (train, held):
        side.pairs = make_pairs(side.prompt_ids, side.labels, config.min_label_gap)
        groups: dict[str, list[tuple[int, int]]] = {}
        for pair in side.pairs:
            groups.setdefault(side.prompt_ids[pair[0]], []).append(pair)
        side.pair_groups = list(groups.values())
    paired = {train.prompt_ids[i] for pair in train.pairs for i in pair}
    counts = {
        "records": len(records),
        "prompt_too_long": len(encoded.prompt_too_long),
        "truncated": len(encoded.truncated),
        "train_responses": len(train.examples),
        "held_out_responses": len(held.examples),
        "train_prompts": len(set(train.prompt_ids)),
        "held_out_prompts": len(set(held.prompt_ids)),
        "train_prompts_without_pair": len(set(train.prompt_ids) - paired),
        "train_pairs": len(train.pairs),
        "held_out_pairs": len(held.pairs),
        "teacher_responses": sum(s == "teacher" for s in train.sources + held.sources),
        "student_responses": sum(s == "student" for s in train.sources + held.sources),
    }
    return train, held, counts


def evaluate(model: Any, split: Split, pad_id: int, batch_size: int) -> dict[str, float | None]:
    """Held-out accuracies of `model` on `split` (None where there is nothing to measure)."""
    if not split.examples:
        return {"eval/pairwise_accuracy": None}
    s = engine.scores(model, split.examples, pad_id, batch_size).cpu()
    out: dict[str, float | None] = {"eval/pairwise_accuracy": None}
    if split.pairs:
        hi = torch.tensor([i for i, _ in split.pairs])
        lo = torch.tensor([j for _, j in split.pairs])
        out["eval/pairwise_accuracy"] = score_losses.discriminator_accuracy(s[hi], s[lo]).item()
        student = [
            (i, j)
            for i, j in split.pairs
            if split.sources[i] == "student" and split.sources[j] == "student"
        ]
        if student:
            hi_s = torch.tensor([i for i, _ in student])
            lo_s = torch.tensor([j for _, j in student])
            out["eval/pairwise_accuracy_student"] = score_losses.discriminator_accuracy(
                s[hi_s], s[lo_s]
            ).item()
    good = torch.tensor(split.good)
    out["eval/pointwise_accuracy"] = ((s > 0) == good).float().mean().item()
    out["eval/score_good"] = s[good].mean().item() if good.any() else None
    out["eval/score_bad"] = s[~good].mean().item() if (~good).any() else None
    return out


def _pack(items: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive items in chunks of at most `limit` total size (an item alone may exceed it)."""
    out: list[list[int]] = []
    total = 0
    for item, size in zip(items, sizes, strict=True):
        if out and total + size <= limit:
            out[-1].append(item)
            total += size
        else:
            out.append([item])
            total = size
    return out


def _step(
    config: cfg.RewardConfig,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    split: Split,
    items: list[int],
    pad: int,
) -> tuple[float, float, int, engine.StepResult]:
    """One optimizer step over this process's share of the step's items.

    BT: `items` are prompts (`split.pair_groups`); each response of a prompt is scored once and
    enters all of its pairs. BCE: `items` are responses. The loss is the mean over the global
    step's pairs (responses), however it is split into micro-batches and processes. Returns
    (loss sum, correct sum) over this process's pairs (responses), the global count, and what
    the optimizer step did.
    """
    world, bt = accelerator.num_processes, config.loss == "bt"
    mine, _ = engine.local_slice(items, accelerator.process_index, world)
    if bt:
        n_global = sum(len(split.pair_groups[g]) for g in items)
        sizes = [len({i for pair in split.pair_groups[g] for i in pair}) for g in mine]
        parts = _pack(mine, sizes, config.micro_batch_size)
    else:
        n_global = len(items)
        parts = engine.chunks(mine, config.micro_batch_size)
    totals = {"loss": 0.0, "correct": 0.0}

    def loss_of(part: list[int]) -> torch.Tensor:
        if bt:
            pairs = [pair for g in part for pair in split.pair_groups[g]]
            seq_ids = sorted({i for pair in pairs for i in pair})
        else:
            seq_ids = part
        batch = engine.on_device([split.examples[i] for i in seq_ids], pad, accelerator.device)
        with accelerator.autocast():
            s = discriminator.scores(model, batch["input_ids"], batch["attention_mask"])
        if bt:
            at = {i: k for k, i in enumerate(seq_ids)}
            hi = s[[at[a] for a, _ in pairs]]
            lo = s[[at[b] for _, b in pairs]]
            loss, count = score_losses.bt_discriminator_loss(hi, lo), len(pairs)
            hits = score_losses.discriminator_accuracy(hi, lo).item() * count
        else:
            target = torch.tensor([float(split.good[i]) for i in part], device=s.device)
            loss, count = score_losses.pointwise_bce_loss(s, target), len(part)
            hits = ((s.detach() > 0).float() == target).float().sum().item()
        totals["loss"] += loss.item() * count
        totals["correct"] += hits
        # Sum over this part, divided by the global count: the global mean.
        return loss * count * world / n_global

    result = engine.optimizer_step(
        accelerator, model, optimizer, parts, loss_of, config.max_grad_norm
    )
    return totals["loss"], totals["correct"], n_global, result


def train(config: cfg.RewardConfig) -> Path:
    """Train the reward model as configured; returns the `final/` folder."""
    started = time.time()
    run_dir = Path(config.output_dir)
    config, accelerator = loop.start(config, run_dir, run_dir / "config.yaml")
    if not 0.0 <= config.held_out < 1.0:
        raise cfg.ConfigError(f"'held_out' must lie in [0, 1), got {config.held_out}")
    resume_from = loop.resume_point(run_dir, config.resume)
    tokenizer = store.load_tokenizer(str(resume_from) if resume_from else config.model)
    # Data first: a bad record should fail in a second, not after loading the model.
    train_split, held, counts = prepare(config, tokenizer)
    n_items = _count_items(config, train_split)
    torch.manual_seed(config.seed)
    model = _load_model(config, resume_from, tokenizer)
    pad = tokenizer.pad_token_id
    plan = engine.batch_plan(n_items, config.epochs, config.global_batch_size, config.seed)
    total = min(len(plan), config.max_steps) if config.max_steps else len(plan)
    model, optimizer = _prepare(config, accelerator, model)
    optimizers = {"reward_model": optimizer}
    start_step = loop.restore(resume_from, "reward-model", optimizers=optimizers)["step"]
    if config.report_to != "none":
        accelerator.init_trackers("gad-reward", config=tracker_config(cfg.to_dict(config)))
    metrics = MetricsLog(run_dir, accelerator, resume_step=start_step if resume_from else None)
    if accelerator.is_main_process:
        _print_data(counts, total, config)

    def held_out_metrics() -> dict[str, float | None]:
        with accelerator.autocast():
            return evaluate(accelerator.unwrap_model(model), held, pad, config.micro_batch_size)

    before = held_out_metrics() if resume_from is None else None
    if before is not None:
        metrics.log(0, before)

    def step_fn(step: int, timer: PhaseTimer) -> dict[str, Any]:
        t0 = time.perf_counter()
        loss_sum, correct, n_global, result = _step(
            config, accelerator, model, optimizer, train_split, plan[step], pad
        )
        loss_sum, correct = engine.reduce_sum(accelerator, [loss_sum, correct])
        row = {
            "loss": loss_sum / n_global,
            "accuracy": correct / n_global,
            "grad_norm": result.grad_norm,
            "skipped": result.skipped,
            "seconds": time.perf_counter() - t0,
            "epoch": step * config.global_batch_size / n_items,
        }
        if (config.eval_every and (step + 1) % config.eval_every == 0) or step + 1 == total:
            row.update(held_out_metrics())
        return row

    def save(step: int, final: bool) -> Path:
        return checkpoint.save(
            run_dir, step, accelerator, model=model, tokenizer=tokenizer, optimizers=optimizers,
            keep=config.keep_checkpoints,
        )  # fmt: skip

    spec = loop.Loop(
        "reward-model",
        total,
        start_step,
        metrics,
        ("loss", "accuracy"),
        accelerator.is_main_process,
        save,
        config.save_every,
        save_final=total > start_step and config.save_state,
    )
    row = loop.run(spec, step_fn)
    after = {k: v for k, v in row.items() if k.startswith("eval/")} or held_out_metrics()
    extra = {"held_out_before": before, "held_out_after": after}
    final = _finish(config, accelerator, model, tokenizer, counts | extra, total, started)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _count_items(config: cfg.RewardConfig, split: Split) -> int:
    """The units a step samples (BT: prompts with a pair; BCE: responses); none stops."""
    n_items = len(split.pair_groups) if config.loss == "bt" else len(split.examples)
    if n_items == 0:
        raise chats.DataError(
            f"{config.data}: no training {'pair' if config.loss == 'bt' else 'response'}: "
            "every training prompt's responses share one label (or the split left none)"
        )
    return n_items


def _load_model(config: cfg.RewardConfig, resume_from: Path | None, tokenizer: Any) -> Any:
    """The scalar-head model: the checkpoint's on resume, else a fresh head on `model`; with
    LoRA an adapter and head on the frozen base `model`."""
    if lora.enabled(config):
        adapters, _ = lora_roles.base_adapters(config.model)
        model = lora_roles.scorer(adapters, config, resume_from, seed=config.seed, name="reward")
    elif resume_from is not None:
        model = discriminator.load(str(resume_from))
    else:
        model = discriminator.build(
            config.model, pad_token_id=tokenizer.pad_token_id, seed=config.seed
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    return model


def _prepare(config: cfg.RewardConfig, accelerator: Any, model: Any) -> tuple[Any, Any]:
    """The model and its AdamW, as accelerate runs them (a LoRA view is not wrapped)."""
    optimizer = engine.make_optimizer(model, config.lr, config.weight_decay, config.adam_betas)
    if isinstance(model, lora.ScalarView):
        lora_roles.check_accelerator(accelerator)
        model.adapters.autocast = accelerator.autocast
        return model, accelerator.prepare(optimizer)
    return accelerator.prepare(model, optimizer)


def _print_data(counts: dict[str, Any], total: int, config: cfg.RewardConfig) -> None:
    """What the reward model trains and is evaluated on."""
    console.print(
        f"data: {counts['train_responses']} training responses of "
        f"{counts['train_prompts']} prompts ({counts['train_pairs']} pairs; "
        f"{counts['train_prompts_without_pair']} prompts without a pair), held out "
        f"{counts['held_out_responses']} responses of {counts['held_out_prompts']} prompts "
        f"({counts['held_out_pairs']} pairs); {total} steps of {config.global_batch_size} "
        f"{'prompts' if config.loss == 'bt' else 'responses'}"
    )
    if counts["prompt_too_long"]:
        console.print(f"[yellow]left out {counts['prompt_too_long']} over-long prompt(s)[/]")


def _finish(
    config: cfg.RewardConfig,
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    counts: dict[str, Any],
    total: int,
    started: float,
) -> Path:
    """`final/` (the scalar-head model, loadable with `discriminator.load`) and its summary."""
    run_dir = Path(config.output_dir)
    before, after = counts.pop("held_out_before"), counts.pop("held_out_after")
    final = run_dir / "final"
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if isinstance(model, lora.ScalarView):
            lora_roles.save_merged(model, final, tokenizer)
        else:
            accelerator.unwrap_model(model).save_pretrained(final, state_dict=state)
            tokenizer.save_pretrained(final)
        summary = {
            **counts,
            "loss": config.loss,
            "steps": total,
            "held_out_before": before,
            "held_out_after": after,
            "final_model": str(final),
            "wall_seconds": round(time.time() - started, 2),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        acc = after.get("eval/pairwise_accuracy")
        console.print(
            f"reward model done: {total} steps, held-out pairwise accuracy "
            f"{'n/a' if acc is None else f'{acc:.3f}'}; model in [bold]{final}[/]"
        )
    return final
