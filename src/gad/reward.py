"""`gad reward-model`: a reward model distilled from the teacher's labels (SPEC §4 step 3).

The model is the discriminator's: a causal LM backbone with a scalar head
(`discriminator.build`), scored at the last real token of the response, so the saved
`final/` folder loads with `discriminator.load` and plugs into `gad train --reward-model`.

Training data: the records of `gad label` (`labels.jsonl`), teacher and student responses alike
(`sources`), tokenised exactly as the RL loop builds sequences (`data.encode_sft`: chat template,
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

`distill_data` prepares `gad train --method reward-distill`: the SFT warmup's records (teacher
responses labelled good) and the RL stage's prompts.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tqdm.auto import tqdm

from gad import checkpoint, data, discriminator, evalsets, losses, models, precision, sft
from gad import config as cfg
from gad.tracking import MetricsLog, tracker_config

console = Console(stderr=True)

LABEL_FIELDS = ("prompt_id", "source", "label", "good")
"""`meta` fields every labelled record must carry (`gad label` writes them)."""


def read_labels(path: str) -> list[data.Record]:
    """Labelled records of `path`; a record without the label fields stops with its id."""
    records = data.read_records(path).records
    for record in records:
        missing = [k for k in LABEL_FIELDS if k not in record.meta]
        if missing:
            raise data.DataError(
                f"{path}: record '{record.id}': field 'meta.{missing[0]}' is missing (expected "
                f"the labels.jsonl of `gad label`)"
            )
        label = record.meta["label"]
        if not isinstance(label, int | float) or isinstance(label, bool) or math.isnan(label):
            raise data.DataError(f"{path}: record '{record.id}': field 'meta.label': not a number")
        if record.response is None:
            raise data.DataError(f"{path}: record '{record.id}': field 'messages': no response")
    return records


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


@torch.no_grad()
def score(model: Any, examples: list[data.Example], pad_id: int, batch_size: int) -> torch.Tensor:
    """Scores of `examples` under a scalar-head model, no gradient. Shape: [B] float32, on the
    model's device, in the examples' order (scored in length-sorted batches: less padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(len(examples), device=device)
    with torch.no_grad():
        for idx in sft.length_sorted_chunks(examples, batch_size):
            batch = sft.collate([examples[i] for i in idx], pad_id)
            out[idx] = discriminator.scores(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )
    model.train(was_training)
    return out


@dataclass
class Split:
    """One side of the held-out split: tokenised responses, their labels, and their pairs."""

    examples: list[data.Example] = field(default_factory=list)
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
    encoded = data.encode_sft(
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
    s = score(model, split.examples, pad_id, batch_size).cpu()
    out: dict[str, float | None] = {"eval/pairwise_accuracy": None}
    if split.pairs:
        hi = torch.tensor([i for i, _ in split.pairs])
        lo = torch.tensor([j for _, j in split.pairs])
        out["eval/pairwise_accuracy"] = losses.discriminator_accuracy(s[hi], s[lo]).item()
        student = [
            (i, j)
            for i, j in split.pairs
            if split.sources[i] == "student" and split.sources[j] == "student"
        ]
        if student:
            hi_s = torch.tensor([i for i, _ in student])
            lo_s = torch.tensor([j for _, j in student])
            out["eval/pairwise_accuracy_student"] = losses.discriminator_accuracy(
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
    config: cfg.RewardConfig, accelerator: Any, model: Any, split: Split, items: list[int], pad: int
) -> tuple[float, float, int]:
    """Forward/backward of this process's share of one step.

    BT: `items` are prompts (`split.pair_groups`); each response of a prompt is scored once and
    enters all of its pairs. BCE: `items` are responses. The loss is the mean over the global
    step's pairs (responses), however it is split into micro-batches and processes. Returns
    (loss sum, correct sum) over this process's pairs (responses) and the global count.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    bt = config.loss == "bt"
    mine = [i for chunk in sft.micro_batches(items, rank, world, 1) for i in chunk]
    if bt:
        n_global = sum(len(split.pair_groups[g]) for g in items)
        sizes = [len({i for pair in split.pair_groups[g] for i in pair}) for g in mine]
        parts = _pack(mine, sizes, config.micro_batch_size)
    else:
        n_global = len(items)
        parts = [
            mine[i : i + config.micro_batch_size]
            for i in range(0, len(mine), config.micro_batch_size)
        ]
    loss_sum = correct = 0.0
    for j, part in enumerate(parts):
        if bt:
            pairs = [pair for g in part for pair in split.pair_groups[g]]
            seq_ids = sorted({i for pair in pairs for i in pair})
        else:
            seq_ids = part
        batch = sft.collate([split.examples[i] for i in seq_ids], pad)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.no_sync(model) if j < len(parts) - 1 else nullcontext():
            with accelerator.autocast():
                s = discriminator.scores(model, batch["input_ids"], batch["attention_mask"])
            if bt:
                at = {i: k for k, i in enumerate(seq_ids)}
                hi = s[[at[a] for a, _ in pairs]]
                lo = s[[at[b] for _, b in pairs]]
                loss, count = losses.bt_discriminator_loss(hi, lo), len(pairs)
                hits = losses.discriminator_accuracy(hi, lo).item() * count
            else:
                target = torch.tensor([float(split.good[i]) for i in part], device=s.device)
                loss, count = losses.pointwise_bce_loss(s, target), len(part)
                hits = ((s.detach() > 0).float() == target).float().sum().item()
            # Sum over this part, divided by the global count: the global mean. DDP averages
            # gradients over processes, hence the factor `world`.
            accelerator.backward(loss * count * world / n_global)
        loss_sum += loss.item() * count
        correct += hits
    return loss_sum, correct, n_global


def train(config: cfg.RewardConfig) -> Path:
    """Train the reward model as configured; returns the `final/` folder."""
    started = time.time()
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config, choice = precision.apply(config)
    accelerator = sft.make_accelerator(config.mixed_precision, config.report_to, run_dir)
    if accelerator.is_main_process:
        cfg.save(config, run_dir / "config.yaml", {"mixed_precision": choice.reason})
    if not 0.0 <= config.held_out < 1.0:
        raise cfg.ConfigError(f"'held_out' must lie in [0, 1), got {config.held_out}")
    resume_from = checkpoint.latest(run_dir) if config.resume else None
    source = str(resume_from) if resume_from else config.model
    tokenizer = models.load_tokenizer(source)
    # Data first: a bad record should fail in a second, not after loading the model.
    train_split, held, counts = prepare(config, tokenizer)
    n_items = len(train_split.pair_groups) if config.loss == "bt" else len(train_split.examples)
    if n_items == 0:
        raise data.DataError(
            f"{config.data}: no training {'pair' if config.loss == 'bt' else 'response'}: "
            "every training prompt's responses share one label (or the split left none)"
        )
    torch.manual_seed(config.seed)
    if resume_from is not None:
        model = discriminator.load(str(resume_from))
    else:
        model = discriminator.build(
            config.model, pad_token_id=tokenizer.pad_token_id, seed=config.seed
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    pad = tokenizer.pad_token_id
    plan = sft.batch_plan(n_items, config.epochs, config.batch_size, config.seed)
    total = min(len(plan), config.max_steps) if config.max_steps else len(plan)
    optimizer = sft.make_optimizer(model, config.lr, config.weight_decay, (0.9, 0.999))
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = 0
    if resume_from is not None:
        start_step = checkpoint.load_state(resume_from, optimizers={"reward_model": optimizer})[
            "step"
        ]
        console.print(f"resuming from {resume_from} at step {start_step}")
    if config.report_to != "none":
        accelerator.init_trackers("gad-reward", config=tracker_config(cfg.to_dict(config)))
    metrics = MetricsLog(run_dir, accelerator, resume_step=start_step if resume_from else None)
    if accelerator.is_main_process:
        console.print(
            f"data: {counts['train_responses']} training responses of "
            f"{counts['train_prompts']} prompts ({counts['train_pairs']} pairs; "
            f"{counts['train_prompts_without_pair']} prompts without a pair), held out "
            f"{counts['held_out_responses']} responses of {counts['held_out_prompts']} prompts "
            f"({counts['held_out_pairs']} pairs); {total} steps of {config.batch_size} "
            f"{'prompts' if config.loss == 'bt' else 'responses'}"
        )
        if counts["prompt_too_long"]:
            console.print(f"[yellow]left out {counts['prompt_too_long']} over-long prompt(s)[/]")

    def held_out_metrics() -> dict[str, float | None]:
        with accelerator.autocast():
            return evaluate(accelerator.unwrap_model(model), held, pad, config.micro_batch_size)

    before = held_out_metrics() if resume_from is None else None
    if before is not None:
        metrics.log(0, before)
    bar = tqdm(
        total=total,
        initial=start_step,
        desc="reward-model",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    row: dict[str, Any] = {}
    for step in range(start_step, total):
        t0 = time.perf_counter()
        items = plan[step]
        loss_sum, correct, n_global = _step(config, accelerator, model, train_split, items, pad)
        clip = config.max_grad_norm or math.inf
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
        if math.isfinite(float(grad_norm)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sums = torch.tensor([loss_sum, correct], device=accelerator.device)
        sums = accelerator.reduce(sums, "sum") if accelerator.num_processes > 1 else sums
        done = step + 1
        row = {
            "loss": sums[0].item() / n_global,
            "accuracy": sums[1].item() / n_global,
            "grad_norm": float(grad_norm),
            "seconds": time.perf_counter() - t0,
            "epoch": step * config.batch_size / n_items,
        }
        if (config.eval_every and done % config.eval_every == 0) or done == total:
            row.update(held_out_metrics())
        metrics.log(done, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}")
        if config.save_every and done % config.save_every == 0 and done < total:
            _save(config, accelerator, run_dir, model, tokenizer, optimizer, done)
    bar.close()
    if total > start_step and config.save_state:
        _save(config, accelerator, run_dir, model, tokenizer, optimizer, total)
    after = {k: v for k, v in row.items() if k.startswith("eval/")} or held_out_metrics()
    final = run_dir / "final"
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
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
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _save(
    config: cfg.RewardConfig,
    accelerator: Any,
    run_dir: Path,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    step: int,
) -> Path:
    return checkpoint.save(
        run_dir,
        step,
        accelerator,
        model=model,
        tokenizer=tokenizer,
        optimizers={"reward_model": optimizer},
        keep=config.keep_checkpoints,
    )


# ---------------------------------------------------------------- reward-distill pipeline


def distill_data(labels_path: str, out: Path) -> tuple[Path, Path]:
    """The two data files of `gad train --method reward-distill`, written into `out`:

    `sft.jsonl`      every teacher response labelled good (the SFT warmup's data);
    `prompts.jsonl`  every labelled prompt once, with one teacher response (a good one when
                     there is one): the RL stage's prompts. Its response is only scored by the
                     frozen reward model, as a diagnostic (`d/teacher_score`).
    """
    records = read_labels(labels_path)
    good = [r for r in records if r.meta["source"] == "teacher" and r.meta["good"]]
    if not good:
        raise data.DataError(
            f"{labels_path}: no teacher response is labelled good: nothing for the SFT warmup"
        )
    chosen: dict[str, data.Record] = {}
    for record in records:
        pid = str(record.meta["prompt_id"])
        held = chosen.get(pid)
        rank = (record.meta["source"] == "teacher", bool(record.meta["good"]))
        if held is None or rank > (held.meta["source"] == "teacher", bool(held.meta["good"])):
            chosen[pid] = record
    out.mkdir(parents=True, exist_ok=True)
    sft_path, prompts_path = out / "sft.jsonl", out / "prompts.jsonl"
    data.write_records(sft_path, good)
    data.write_records(prompts_path, chosen.values())
    return sft_path, prompts_path
