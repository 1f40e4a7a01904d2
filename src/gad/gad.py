"""GAD: Generative Adversarial Distillation (SPEC §3, Algorithm 1).

Two stages, each a loop that reads top to bottom as named, timed steps:

warmup   rollout (fresh student samples) -> update_d (Bradley–Terry, teacher vs. student)
         -> update_g (SFT on the teacher answers; skipped for the first `warmup_d_only_steps`)
gad      rollout -> ref_logp -> update_d (its forward gives the rewards: the discriminator's
         scores *before* its update) -> advantages -> update_g (GRPO, Eq. 7)

Two facts make the GAD step cheaper than the reference implementation without changing it:
with one policy update per step (PPO mini-batch = batch, as in the paper), the old log-probs
are the policy's own log-probs at that update, so they come from the update's forward pass;
and the discriminator's pre-update scores are the scores its update's forward computes.
Baselines and ablations are settings of the same loops (`method`, `warmup_*`, `d_loss`,
`discriminator`, `reward_model`), not copies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gad import checkpoint, data, discriminator, evalsets, losses, models, precision, reward, sft
from gad import config as cfg
from gad.rollout import Completion, Sampling, TransformersRollout
from gad.tracking import MetricsLog, PhaseTimer, tracker_config

console = Console(stderr=True)


class TrainingStopped(cfg.UserError, RuntimeError):
    """Too many consecutive non-finite steps; a checkpoint was written before stopping."""


# ----------------------------------------------------------------------------- batches


def response_logprobs(
    model: Any, batch: dict[str, torch.Tensor], temperature: float, *, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens under `model` at the sampling temperature (as verl).

    Returns `(logp_bt, mask_bt, entropy_bt)` over the positions `sft.response_logits` keeps
    (from the batch's earliest response token on); the mask is 1 on response tokens. The
    entropy (detached) costs a full-vocabulary softmax, so it is computed only when asked for
    (the policy update logs it), else None.
    """
    logits_btv, targets_bt, mask_bt = sft.response_logits(model, batch)
    logp_bt = losses.gather_logprobs(logits_btv, targets_bt, temperature)
    if not entropy:
        return logp_bt, mask_bt, None
    with torch.no_grad():
        entropy_bt = losses.token_entropy_from_logits(logits_btv.detach(), temperature)
    return logp_bt, mask_bt, entropy_bt


def student_examples(
    prompts: list[data.Example], groups: list[list[Completion]]
) -> list[data.Example]:
    """Prompt + sampled ids as examples (prompt-major: prompt p's N samples are adjacent)."""
    out = []
    for prompt, group in zip(prompts, groups, strict=True):
        prompt_ids = prompt.input_ids[: prompt.prompt_len]
        for k, completion in enumerate(group):
            out.append(
                data.Example(
                    f"{prompt.id}#{k}",
                    prompt_ids + completion.token_ids,
                    prompt.prompt_len,
                    completion.finish_reason == "length",
                )
            )
    return out


def discriminator_inputs(
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    groups: list[list[Completion]],
    max_response_tokens: int,
) -> list[data.Example]:
    """The student samples as the discriminator sees them (prompt-major): their decoded text,
    re-encoded by `data.discriminator_input` exactly as a teacher answer of the same text and
    finish would be."""
    return [
        data.discriminator_input(
            tokenizer,
            prompt,
            completion.text,
            finished=completion.finish_reason == "stop",
            max_response_tokens=max_response_tokens,
            id=f"s{p}#{k}",
        )
        for p, (prompt, group) in enumerate(zip(prompts, groups, strict=True))
        for k, completion in enumerate(group)
    ]


def teacher_discriminator_inputs(
    tokenizer: Any, records: list[data.Record], max_response_tokens: int
) -> list[data.Example]:
    """The teacher answers as the discriminator sees them, by the same rule as the samples
    (`discriminator_inputs`); finished unless the record says its writer cut it."""
    return [
        data.discriminator_input(
            tokenizer,
            r.prompt,
            r.response or "",
            finished=data.record_finished(r),
            max_response_tokens=max_response_tokens,
            id=r.id,
        )
        for r in records
    ]


def noncanonical_share(
    tokenizer: Any, prompts: list[list[dict[str, str]]], groups: list[list[Completion]]
) -> float:
    """Share of samples whose sampled ids are not the canonical encoding of their own text
    (what a discriminator fed the sampled ids could tell from teacher text)."""
    flags = [
        data.encode_response(tokenizer, prompt, c.text, finished=c.finish_reason == "stop")
        != c.token_ids
        for prompt, group in zip(prompts, groups, strict=True)
        for c in group
    ]
    return sum(flags) / max(1, len(flags))


def replay_push(pool: list[Any], new: list[Any], capacity: int) -> list[Any]:
    """The replay pool after adding `new`: first in, first out, at most `capacity` entries."""
    return (pool + new)[-capacity:] if capacity > 0 else []


def replay_draw(pool: list[Any], k: int, seed: int, step: int) -> list[Any]:
    """`k` entries of the pool (all of it when smaller), drawn without replacement by a
    generator seeded from (seed, step), so a resumed run draws the same."""
    return random.Random(seed * 1_000_003 + step).sample(pool, min(k, len(pool)))


# ----------------------------------------------------------------------------- run state


@dataclass
class Models:
    """Everything a stage trains or reads, already wrapped by accelerate."""

    generator: Any
    discriminator: Any
    tokenizer: Any
    g_opt: Any
    d_opt: Any | None
    reference: Any | None = None
    rollout: TransformersRollout | None = None
    reward_model: Any | None = None
    """The frozen reward model R of the combined reward (`reward_mix_alpha`), else None."""
    d_tokenizer: Any | None = None
    """The discriminator's own tokenizer (it may differ from the student's)."""
    rm_tokenizer: Any | None = None
    """The reward model's tokenizer (combined reward)."""
    teacher: Any | None = None
    """`method=whitebox`: the frozen local teacher whose log-probs are the reward."""


def frozen_reward(config: cfg.GADConfig) -> bool:
    """The discriminator slot holds the frozen `reward_model` (reward distillation) rather than
    a discriminator that learns; with `reward_mix_alpha` the reward model is mixed in instead."""
    return bool(config.reward_model) and config.reward_mix_alpha is None


@dataclass
class Health:
    """Counters behind the warnings; saved in checkpoints so a resume keeps them."""

    bad_steps: int = 0
    skipped_steps: int = 0
    acc_streak: int = 0
    base_length: float | None = None
    warned: list[str] = field(default_factory=list)


@dataclass
class Selection:
    """Held-out evaluations of the GAD stage and the best step so far (saved for resume)."""

    evals: list[dict[str, Any]] = field(default_factory=list)
    base_length: float | None = None
    best_step: int | None = None
    best_value: float | None = None


# ----------------------------------------------------------------------------- steps


def rollout_step(
    config: cfg.GADConfig, m: Models, prompts: list[data.Example], step: int, rank_offset: int
) -> list[list[Completion]]:
    """N fresh samples per prompt from the current student."""
    sampling = Sampling(config.temperature, config.top_p, config.max_response_tokens)
    seeds = None
    if config.per_prompt_seeds:
        seeds = [hash((config.seed, step, rank_offset + i)) % (2**31) for i in range(len(prompts))]
    return m.rollout.generate(  # type: ignore[union-attr]
        [p.input_ids[: p.prompt_len] for p in prompts], config.n_samples, sampling, seeds
    )


def update_d(
    config: cfg.GADConfig,
    accelerator: Any,
    m: Models,
    teacher: list[data.Example],
    students: list[data.Example],
    global_prompts: int,
    replayed: list[tuple[data.Example, data.Example]] = (),  # type: ignore[assignment]
) -> tuple[torch.Tensor, dict[str, float]]:
    """One discriminator update on (teacher answer, N student samples) per prompt (Eq. 8),
    all as `data.discriminator_input` built them.

    `replayed` are (teacher answer, past student sample) pairs from the replay pool: extra
    pairs of the same loss, so the loss is the mean over current and replayed pairs; their
    scores are never rewards. Returns the current student scores of the forward pass *before*
    the optimizer step (the GAD rewards), [P*N] prompt-major, and the stats. (A frozen scorer
    goes through `reward.score` instead: it needs no teacher answers.)
    """
    n = config.n_samples
    d = m.discriminator
    pad = _pad_id(m.d_tokenizer)
    loss_fn = (
        losses.bt_discriminator_loss if config.d_loss == "bt" else losses.ce_discriminator_loss
    )
    world = accelerator.num_processes
    current, extra = len(teacher) * n, len(replayed)
    w_current, w_replay = current / (current + extra), extra / (current + extra)
    prompts_per_micro = max(1, config.micro_batch_size // (n + 1))
    pairs_per_micro = max(1, config.micro_batch_size // 2)
    student_scores, teacher_scores = [], []
    loss_sum = replay_loss_sum = 0.0
    micro = list(range(0, len(teacher), prompts_per_micro))
    replay_micro = list(range(0, extra, pairs_per_micro))
    last = len(micro) + len(replay_micro) - 1
    d.train()
    for j, start in enumerate(micro):
        t_ex = teacher[start : start + prompts_per_micro]
        s_ex = students[start * n : (start + len(t_ex)) * n]
        batch = sft.collate(t_ex + s_ex, pad)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            with accelerator.no_sync(d) if j < last else nullcontext():
                score_b = discriminator.scores(d, batch["input_ids"], batch["attention_mask"])
                teacher_p, student_pn = score_b[: len(t_ex)], score_b[len(t_ex) :].view(-1, n)
                loss = loss_fn(teacher_p, student_pn)
                # Mean over all pairs of the global batch, however it is split.
                accelerator.backward(loss * w_current * len(t_ex) * world / global_prompts)
        loss_sum += loss.item() * len(t_ex)
        teacher_scores.append(teacher_p.detach())
        student_scores.append(student_pn.detach().reshape(-1))
    for j, start in enumerate(replay_micro, start=len(micro)):
        part = replayed[start : start + pairs_per_micro]
        batch = sft.collate([t for t, _ in part] + [s for _, s in part], pad)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            with accelerator.no_sync(d) if j < last else nullcontext():
                score_b = discriminator.scores(d, batch["input_ids"], batch["attention_mask"])
                loss = loss_fn(score_b[: len(part)], score_b[len(part) :].view(-1, 1))
                accelerator.backward(loss * w_replay * len(part) / extra)
        replay_loss_sum += loss.item() * len(part)
    teacher_p = torch.cat(teacher_scores)
    student_b = torch.cat(student_scores)
    correct_pn = (teacher_p.unsqueeze(-1) > student_b.view(-1, n)).float()
    cut_pn = torch.tensor([e.truncated for e in students], device=correct_pn.device).view(-1, n)
    stats = {
        "d/loss": loss_sum / len(teacher),
        "d/accuracy": losses.discriminator_accuracy(teacher_p, student_b.view(-1, n)).item(),
        # Split by the student's finish: a pinned accuracy on cut samples only is a length cue.
        "d/accuracy_finished": _mean_or_nan(correct_pn, ~cut_pn),
        "d/accuracy_cut": _mean_or_nan(correct_pn, cut_pn),
        "d/teacher_score": teacher_p.mean().item(),
        "d/student_score": student_b.mean().item(),
    }
    if extra:
        stats["d/replay_loss"] = replay_loss_sum / extra
        stats["d/replay_pairs"] = float(extra)
    grad_norm = accelerator.clip_grad_norm_(d.parameters(), config.max_grad_norm or math.inf)
    stats["d/grad_norm"] = float(grad_norm)
    if math.isfinite(stats["d/grad_norm"]):
        m.d_opt.step()  # type: ignore[union-attr]
    m.d_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
    return student_b, stats


def _mean_or_nan(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over the mask; NaN (not 0) when it selects nothing, so "no cut samples this step"
    never reads as "accuracy 0 on cut samples"."""
    return losses.masked_mean(x, mask).item() if bool(mask.any()) else math.nan


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def ref_logprobs(config: cfg.GADConfig, accelerator: Any, m: Models, students: list) -> list:
    """Log-probs of the sampled tokens under the frozen reference policy, one entry per
    micro-batch of `length_sorted_chunks` (the order `update_g` uses)."""
    parts = sft.length_sorted_chunks(students, config.micro_batch_size)
    if m.reference is None:
        return [None] * len(parts)
    out = []
    with torch.no_grad(), accelerator.autocast():
        for idx in parts:
            batch = sft.collate([students[i] for i in idx], m.tokenizer.pad_token_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            logp_bt, _, _ = response_logprobs(m.reference, batch, config.temperature)
            out.append(logp_bt)
    return out


def teacher_logprobs(
    accelerator: Any, m: Models, teacher_prompts: list[list[int]], students: list[data.Example]
) -> list[torch.Tensor]:
    """`method=whitebox`: the frozen teacher's log-probs (temperature 1) of each sample's
    sampled ids, after the teacher's own prompt (the hidden context + the prompt): one [L_i]
    tensor per sample, L_i its response length. Needs the student's tokenizer."""
    examples = [
        data.Example(e.id, tp + e.input_ids[e.prompt_len :], len(tp), e.truncated)
        for tp, e in zip(teacher_prompts, students, strict=True)
    ]
    out: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    with torch.no_grad(), accelerator.autocast():
        for idx in sft.length_sorted_chunks(examples, 8):
            batch = sft.collate([examples[i] for i in idx], _pad_id(m.tokenizer))
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            logp_bt, mask_bt, _ = response_logprobs(m.teacher, batch, 1.0)
            for row, i in enumerate(idx):
                out[i] = logp_bt[row][mask_bt[row] != 0].float()
    return out


def _rows_to_bt(rows: list[torch.Tensor], mask_bt: torch.Tensor) -> torch.Tensor:
    """Per-row response values laid out on a micro-batch's [B, T] response mask."""
    out_bt = torch.zeros(mask_bt.shape, dtype=torch.float32, device=mask_bt.device)
    for r, values in enumerate(rows):
        out_bt[r, mask_bt[r] != 0] = values.to(mask_bt.device)
    return out_bt


def update_g(
    config: cfg.GADConfig,
    accelerator: Any,
    m: Models,
    students: list[data.Example],
    advantage_b: torch.Tensor | None,
    ref_logp: list,
    global_sequences: int,
    teacher_logp: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """One GRPO policy update (Eq. 7) over this process's sequences.

    `advantage_b` [P*N] are the group advantages; with `teacher_logp` (white-box, per sample)
    the advantages are per token instead, `losses.whitebox_advantages`.
    """
    g = m.generator
    g.train()
    world = accelerator.num_processes
    parts = sft.length_sorted_chunks(students, config.micro_batch_size)
    token_mean = config.loss_agg == "token-mean"
    if token_mean:
        # verl's token-mean: every response token of the global batch weighs the same.
        local = torch.tensor(float(sum(len(e.input_ids) - e.prompt_len for e in students)))
        global_tokens = float(accelerator.reduce(local.to(accelerator.device), "sum"))
    totals = {"pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "loss": 0.0}
    for j, idx in enumerate(parts):
        batch = sft.collate([students[i] for i in idx], _pad_id(m.tokenizer))
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.no_sync(g) if j < len(parts) - 1 else nullcontext():
            logp_bt, mask_bt, entropy_bt = response_logprobs(
                g, batch, config.temperature, entropy=True
            )
            if teacher_logp is not None:
                teacher_bt = _rows_to_bt([teacher_logp[i] for i in idx], mask_bt)
                advantage = losses.whitebox_advantages(teacher_bt, logp_bt) * mask_bt
            else:
                advantage = advantage_b[idx].to(logp_bt.device)  # type: ignore[index]
            # One update per step: the sampling policy is this very policy, so the old
            # log-probs are these log-probs, detached (ratio = 1, the clip stays inactive).
            loss, stats = losses.policy_loss(
                logp_bt,
                logp_bt.detach(),
                advantage,
                mask_bt,
                clip_eps=config.clip_eps,
                kl_coef=config.kl_coef,
                ref_logp_bt=ref_logp[j],
                agg=config.loss_agg,
            )
            # Reweigh the micro-batch's mean to its share of the global mean.
            if token_mean:
                share = float(mask_bt.sum()) * world / global_tokens
            else:
                share = len(idx) * world / global_sequences
            accelerator.backward(loss * share)
        weight = len(idx) / len(students)
        totals["loss"] += loss.item() * weight
        for key in ("pg_loss", "kl", "clip_frac"):
            totals[key] += stats[key].item() * weight
        totals["entropy"] += losses.masked_mean(entropy_bt, mask_bt).item() * weight
        if teacher_logp is not None:
            # Per-token reverse KL(π || teacher) on the samples: the quantity descended.
            kl_t = -losses.masked_mean(advantage, mask_bt).item()
            totals["teacher_kl"] = totals.get("teacher_kl", 0.0) + kl_t * weight
    grad_norm = accelerator.clip_grad_norm_(g.parameters(), config.max_grad_norm or math.inf)
    totals["grad_norm"] = float(grad_norm)
    if math.isfinite(totals["grad_norm"]):
        m.g_opt.step()
    m.g_opt.zero_grad(set_to_none=True)
    return {f"g/{k}": v for k, v in totals.items()}


def sft_g_step(
    config: cfg.GADConfig,
    accelerator: Any,
    m: Models,
    examples: list[data.Example],
    global_tokens: int,
) -> dict[str, float]:
    """Warmup generator step: response-only cross-entropy on the teacher answers (SeqKD)."""
    g = m.generator
    g.train()
    parts = sft.length_sorted_chunks(examples, config.micro_batch_size)
    nll = 0.0
    for j, idx in enumerate(parts):
        batch = sft.collate([examples[i] for i in idx], m.tokenizer.pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.no_sync(g) if j < len(parts) - 1 else nullcontext():
            loss_sum = sft.response_nll_sum(g, batch)
            accelerator.backward(loss_sum * accelerator.num_processes / global_tokens)
        nll += loss_sum.item()
    grad_norm = float(accelerator.clip_grad_norm_(g.parameters(), config.max_grad_norm or math.inf))
    if math.isfinite(grad_norm):
        m.g_opt.step()
    m.g_opt.zero_grad(set_to_none=True)
    return {"g/sft_loss_local": nll, "g/grad_norm": grad_norm}


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """What both stage loops share: data, plan, run folder, accelerator, models."""

    name: str
    config: cfg.GADConfig
    run_dir: Path
    accelerator: Any
    examples: list[data.Example]
    plan: list[list[int]]
    models: Models
    start_step: int
    metrics: MetricsLog
    health: Health
    records: dict[str, data.Record] = field(default_factory=dict)
    """The records behind `examples`, by id (their prompts and text, for re-encoding)."""
    d_teacher: list[data.Example] = field(default_factory=list)
    """The teacher answers as the discriminator sees them, aligned with `examples`."""
    teacher_prompts: list[list[int]] = field(default_factory=list)
    """`method=whitebox`: the teacher's prompt ids (hidden context + prompt) per example."""
    replay: list[dict[str, Any]] = field(default_factory=list)
    """The discriminator's replay pool of past student samples (`d_replay_size`)."""
    selection: Selection = field(default_factory=Selection)


def _stage_plan(n_examples: int, epochs: float, global_batch: int, seed: int) -> list[list[int]]:
    """`sft.batch_plan` for a possibly fractional number of epochs."""
    whole = sft.batch_plan(n_examples, max(1, math.ceil(epochs)), global_batch, seed)
    per_epoch = math.ceil(n_examples / global_batch)
    return whole[: max(1, round(epochs * per_epoch))]


def _local_indices(stage: Stage, step: int) -> tuple[list[int], int]:
    """This process's example indices of a step (a contiguous slice) and its global offset."""
    indices = stage.plan[step]
    world, rank = stage.accelerator.num_processes, stage.accelerator.process_index
    per_rank = len(indices) // world
    return indices[rank * per_rank : (rank + 1) * per_rank], rank * per_rank


def _local_prompts(stage: Stage, step: int) -> tuple[list[data.Example], int]:
    """This process's prompts of a step and the slice's global offset."""
    mine, offset = _local_indices(stage, step)
    return [stage.examples[i] for i in mine], offset


def _reduce_mean(accelerator: Any, stats: dict[str, float]) -> dict[str, float]:
    """Mean of each stat over processes (every process holds an equal share of the batch)."""
    if accelerator.num_processes == 1 or not stats:
        return stats
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, "mean")
    return dict(zip(keys, t.tolist(), strict=True))


def _length_stats(students: list[data.Example]) -> dict[str, float]:
    lengths = [len(e.input_ids) - e.prompt_len for e in students]
    return {
        "response/length_mean": sum(lengths) / len(lengths),
        "response/length_max": float(max(lengths)),
        "response/truncated_share": sum(e.truncated for e in students) / len(students),
    }


def _tokenizer_of(folder: str, fallback: Any) -> Any:
    """The tokenizer saved with a model folder; `fallback` (the student's) for folders saved
    without one (reward models and discriminators written before gad saved theirs)."""
    path = Path(folder)
    if path.is_dir() and not (path / "tokenizer_config.json").exists():
        console.print(f"[yellow]{folder} has no tokenizer: using the student's[/]")
        return fallback
    return models.load_tokenizer(folder)


def _teacher_context(path: str | None) -> list[dict[str, str]]:
    """The hidden messages the white-box teacher sees before every prompt (a JSON list)."""
    if not path:
        return []
    try:
        messages = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise cfg.ConfigError(f"teacher_context: cannot read {path}: {err}") from err
    if not isinstance(messages, list) or not all(
        isinstance(x, dict) and {"role", "content"} <= set(x) for x in messages
    ):
        raise cfg.ConfigError(
            f"teacher_context: {path} must hold a JSON list of {{'role', 'content'}} messages"
        )
    return [{"role": x["role"], "content": x["content"]} for x in messages]


def _load_teacher(config: cfg.GADConfig, tokenizer: Any, accelerator: Any) -> Any:
    if not config.teacher_model:
        raise cfg.ConfigError("method=whitebox needs teacher_model (a local model)")
    teacher_tok = models.load_tokenizer(config.teacher_model)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise cfg.ConfigError(
            f"teacher_model {config.teacher_model}: method=whitebox needs the student's "
            "tokenizer (its per-token log-probs score the student's sampled ids)"
        )
    teacher, _ = models.load(config.teacher_model)
    return teacher.to(accelerator.device).eval().requires_grad_(False)


def _setup(
    config: cfg.GADConfig, name: str, accelerator: Any, *, epochs: float, init: dict[str, Any]
) -> Stage:
    """Load models (from the latest checkpoint on resume), data, optimizers, and the plan."""
    run_dir = Path(config.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = checkpoint.latest(run_dir) if config.resume else None
    g_source = str(resume_from) if resume_from else init["generator"]
    # Data first: a bad record should fail in a second, not after loading two models.
    prepared = sft.prepare_data(
        config.data,
        models.load_tokenizer(g_source),
        max_prompt_tokens=config.max_prompt_tokens,
        max_response_tokens=config.max_response_tokens,
        skip_invalid=config.skip_invalid,
        exclude=config.exclude,
    )
    generator, tokenizer = models.load(g_source)
    generator.config.use_cache = False
    d, d_tokenizer = None, None
    if init.get("discriminator") or init.get("discriminator_folder") or resume_from:
        if resume_from is not None and (resume_from / "discriminator").exists():
            d_folder = str(resume_from / "discriminator")
        else:
            d_folder = init.get("discriminator_folder")
        if d_folder:
            d = discriminator.load(d_folder)
            d_tokenizer = _tokenizer_of(d_folder, tokenizer)
        elif init.get("discriminator"):
            d_tokenizer = models.load_tokenizer(init["discriminator"])
            d = discriminator.build(
                init["discriminator"], pad_token_id=_pad_id(d_tokenizer), seed=config.seed
            )
    if d is not None:
        d.config.pad_token_id = _pad_id(d_tokenizer)
    checkpoint.check_space(run_dir, generator, *([d] if d is not None else []))
    world = accelerator.num_processes
    if config.batch_prompts % world:
        raise cfg.ConfigError(
            f"batch_prompts={config.batch_prompts} must be divisible by the {world} processes"
        )
    plan = _stage_plan(len(prepared.examples), epochs, config.batch_prompts, config.seed)
    g_opt = sft.make_optimizer(generator, config.lr, config.weight_decay, (0.9, 0.999))
    d_trainable = d is not None and init.get("d_trainable", True)
    d_opt = (
        sft.make_optimizer(d, config.d_lr, config.weight_decay, (0.9, 0.999))
        if d_trainable
        else None
    )
    if d_trainable:
        generator, d, g_opt, d_opt = accelerator.prepare(generator, d, g_opt, d_opt)
    else:
        generator, g_opt = accelerator.prepare(generator, g_opt)
        if d is not None:
            d = d.to(accelerator.device).eval().requires_grad_(False)
    reference = None
    if init.get("reference"):
        reference, _ = models.load(init["reference"])
        reference = reference.to(accelerator.device).eval().requires_grad_(False)
    m = Models(generator, d, tokenizer, g_opt, d_opt, reference, d_tokenizer=d_tokenizer)
    m.rollout = TransformersRollout(
        accelerator.unwrap_model(generator),
        tokenizer,
        batch_size=config.rollout_batch_size,
    )
    state: dict[str, Any] = {"step": 0}
    if resume_from is not None:
        optimizers = {"generator": g_opt} | ({"discriminator": d_opt} if d_opt else {})
        state = checkpoint.load_state(resume_from, optimizers=optimizers)
        console.print(f"{name}: resuming from {resume_from} at step {state['step']}")
    elif init.get("optimizers") and not config.reset_optimizers:
        _continue_optimizers(init["optimizers"], config, g_opt, d_opt)
    stage = Stage(
        name,
        config,
        run_dir,
        accelerator,
        prepared.examples,
        plan,
        m,
        state["step"],
        MetricsLog(run_dir, accelerator, resume_step=state["step"] if resume_from else None),
        Health(**state.get("health", {})),
        records=prepared.records,
        replay=state.get("replay", []),
        selection=Selection(**state.get("selection", {})),
    )
    if d is not None:
        stage.d_teacher = teacher_discriminator_inputs(
            d_tokenizer,
            [prepared.records[e.id] for e in prepared.examples],
            config.max_response_tokens,
        )
    if config.method == "whitebox" and name == "gad":
        m.teacher = _load_teacher(config, tokenizer, accelerator)
        context = _teacher_context(config.teacher_context)
        stage.teacher_prompts = [
            data.encode_prompt(tokenizer, context + prepared.records[e.id].prompt)
            for e in prepared.examples
        ]
    if config.report_to != "none":
        accelerator.init_trackers(f"gad-{name}", config=tracker_config(cfg.to_dict(config)))
    if accelerator.is_main_process:
        sft.print_data_summary(prepared, len(plan), config.batch_prompts)
    return stage


OPTIMIZERS_FILE = "final_optimizers.pt"


def _continue_optimizers(path: Path, config: cfg.GADConfig, g_opt: Any, d_opt: Any) -> None:
    """Continue the warmup's AdamW states (as the reference does, restoring the warmup
    checkpoint with its optimizer): a fresh Adam moves every weight by about ±lr in its first
    bias-corrected steps, and a short GAD stage would live inside that transient. The
    learning rates are this stage's."""
    saved = torch.load(path, weights_only=False)
    pairs = [("generator", g_opt, config.lr), ("discriminator", d_opt, config.d_lr)]
    for key, opt, lr in pairs:
        if opt is None or key not in saved:
            continue
        opt.load_state_dict(saved[key])
        for group in opt.param_groups:
            group["lr"] = lr
    console.print(f"gad: continuing the warmup's optimizer states ({', '.join(saved)})")


def _save(stage: Stage, step: int, final: bool = False) -> Path:
    m, acc = stage.models, stage.accelerator
    optimizers = {"generator": m.g_opt} | ({"discriminator": m.d_opt} if m.d_opt else {})
    others = {"discriminator": m.discriminator} if m.discriminator is not None else {}
    path = checkpoint.save(
        stage.run_dir,
        step,
        acc,
        model=m.generator,
        tokenizer=m.tokenizer,
        others=others,
        other_tokenizers={"discriminator": m.d_tokenizer} if others else {},
        optimizers=optimizers,
        state={
            "health": stage.health.__dict__,
            "replay": stage.replay,
            "selection": stage.selection.__dict__,
        },
        keep=0 if final else stage.config.keep_checkpoints,
    )
    return path


def _save_generator(stage: Stage, folder: Path) -> None:
    """The generator as a plain HF folder (and the discriminator with its tokenizer inside)."""
    m, acc = stage.models, stage.accelerator
    states = {"g": acc.get_state_dict(m.generator)}
    if m.discriminator is not None:
        states["d"] = acc.get_state_dict(m.discriminator)
    if acc.is_main_process:
        acc.unwrap_model(m.generator).save_pretrained(folder, state_dict=states["g"])
        m.tokenizer.save_pretrained(folder)
        if m.discriminator is not None:
            acc.unwrap_model(m.discriminator).save_pretrained(
                folder / "discriminator", state_dict=states["d"]
            )
            m.d_tokenizer.save_pretrained(folder / "discriminator")
    acc.wait_for_everyone()


def _finish(stage: Stage) -> Path:
    """Write `<stage>/final`: the generator (HF folder) with `discriminator/` inside; after the
    warmup also both optimizers' states, which the GAD stage continues."""
    m, acc = stage.models, stage.accelerator
    final = stage.run_dir / "final"
    _save_generator(stage, final)
    if stage.name == "warmup" and acc.is_main_process:
        states = {"generator": m.g_opt.state_dict()}
        if m.d_opt is not None:
            states["discriminator"] = m.d_opt.state_dict()
        tmp = stage.run_dir / (OPTIMIZERS_FILE + ".tmp")
        torch.save(states, tmp)
        tmp.replace(stage.run_dir / OPTIMIZERS_FILE)
    acc.wait_for_everyone()
    return final


def likely_shortcut(row: dict[str, Any]) -> str:
    """What most likely lets the discriminator win, read from one step's signals."""
    teacher_cut = row.get("signals/teacher_cut_share", 0.0)
    student_cut = row.get("response/truncated_share", 0.0)
    acc_finished, acc_cut = row.get("d/accuracy_finished"), row.get("d/accuracy_cut")
    if abs(teacher_cut - student_cut) > 0.2:
        return (
            f"likely the length limit: {teacher_cut:.0%} of teacher answers and "
            f"{student_cut:.0%} of student samples are cut off (accuracy {acc_finished:.2f} on "
            f"finished samples, {acc_cut:.2f} on cut ones); raise max_response_tokens"
        )
    if row.get("signals/noncanonical_share", 0.0) > 0.5:
        return (
            f"{row['signals/noncanonical_share']:.0%} of samples are non-canonical tokenisations "
            "of their text; the discriminator sees re-encoded text, so this is the student's "
            "sampling (temperature?), not the encoding"
        )
    return (
        "no construction shortcut in sight (cut-off shares match, text re-encoded): the "
        "student is far from the teacher; a longer warmup or a lower d_lr may help"
    )


def _check_health(stage: Stage, step: int, row: dict[str, Any], finite: bool) -> list[str]:
    """The warnings a user needs to trust a run (never crashes, except on repeated NaN)."""
    c, h = stage.config, stage.health
    warnings = []
    if not finite:
        h.bad_steps += 1
        h.skipped_steps += 1
        warnings.append(f"non-finite loss or gradient at step {step}: update skipped")
        if h.bad_steps >= c.max_bad_steps:
            path = _save(stage, step)
            raise TrainingStopped(
                f"{h.bad_steps} consecutive non-finite steps (last at step {step}); stopped. "
                f"Checkpoint: {path}. Lower the learning rate or check the data."
            )
    else:
        h.bad_steps = 0
    acc = row.get("d/accuracy")
    if acc is not None and stage.models.d_opt is not None:
        h.acc_streak = h.acc_streak + 1 if acc > c.d_acc_warn else 0
        if h.acc_streak == c.d_acc_warn_steps:
            warnings.append(
                f"discriminator accuracy above {c.d_acc_warn} for {c.d_acc_warn_steps} steps: "
                + likely_shortcut(row)
            )
    length = row.get("response/length_mean")
    if length is not None and stage.name == "gad":
        if h.base_length is None:
            h.base_length = length
        elif length > c.length_warn_ratio * h.base_length and "length" not in h.warned:
            h.warned.append("length")
            warnings.append(
                f"mean response length {length:.0f} exceeds {c.length_warn_ratio}x its "
                f"post-warmup value {h.base_length:.0f}: possible reward hacking"
            )
    for w in warnings:
        console.print(f"[yellow]warning (step {step}): {w}[/]")
    return warnings


def _progress(stage: Stage, total: int) -> Progress:
    progress = Progress(
        TextColumn(f"[bold]{stage.name}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        disable=not stage.accelerator.is_main_process,
    )
    return progress


def _run_loop(stage: Stage, total: int, step_fn: Any, show: tuple[str, ...]) -> None:
    with _progress(stage, total) as progress:
        task = progress.add_task(stage.name, total=total, completed=stage.start_step, stats="")
        for step in range(stage.start_step, total):
            t0 = time.perf_counter()
            timer = PhaseTimer()
            row = step_fn(step, timer)
            finite = all(
                math.isfinite(v) for k, v in row.items() if isinstance(v, float) and "loss" in k
            ) and all(math.isfinite(v) for k, v in row.items() if k.endswith("grad_norm"))
            row.update(timer.as_metrics())
            row["time/step"] = time.perf_counter() - t0
            done = step + 1
            row["warnings"] = _check_health(stage, done, row, finite)
            stage.metrics.log(done, row)
            progress.update(
                task,
                completed=done,
                stats="  ".join(f"{k.split('/')[-1]} {row[k]:.3g}" for k in show if k in row),
            )
            if stage.config.save_every and done % stage.config.save_every == 0 and done < total:
                _save(stage, done)
    if total > stage.start_step and stage.config.save_state:
        _save(stage, total, final=True)


# ----------------------------------------------------------------------------- warmup


def _step_signals(
    stage: Stage, indices: list[int], groups: list[list[Completion]]
) -> dict[str, float]:
    """Per-step signals that expose a construction shortcut (see `likely_shortcut`)."""
    teacher = stage.d_teacher or stage.examples
    prompts = [stage.records[stage.examples[i].id].prompt for i in indices]
    return {
        "signals/teacher_cut_share": sum(teacher[i].truncated for i in indices) / len(indices),
        "signals/noncanonical_share": noncanonical_share(stage.models.tokenizer, prompts, groups),
    }


def _student_d_inputs(
    stage: Stage, indices: list[int], groups: list[list[Completion]], tokenizer: Any = None
) -> list[data.Example]:
    prompts = [stage.records[stage.examples[i].id].prompt for i in indices]
    return discriminator_inputs(
        tokenizer or stage.models.d_tokenizer, prompts, groups, stage.config.max_response_tokens
    )


def warmup(config: cfg.GADConfig, accelerator: Any) -> Path:
    """Stage 1: generator SFT on teacher answers + discriminator BT on fresh student samples.

    `method="offpolicy"` runs it sequentially instead (paper Fig. 6): SFT for `warmup_epochs`,
    then the discriminator alone for `offpolicy_d_epochs` on the frozen student's samples.
    `method="whitebox"` has no discriminator: its warmup is the generator's SFT alone.
    """
    offpolicy = config.method == "offpolicy"
    whitebox = config.method == "whitebox"
    epochs = config.warmup_epochs + (config.offpolicy_d_epochs if offpolicy else 0.0)
    init: dict[str, Any] = {"generator": config.model}
    if not whitebox:
        init["discriminator"] = config.discriminator or config.model
    frozen = frozen_reward(config)
    if frozen:
        # Nothing to warm up on the reward side: load it frozen rather than build a spare D.
        init |= {"discriminator_folder": config.reward_model, "d_trainable": False}
    stage = _setup(config, "warmup", accelerator, epochs=epochs, init=init)
    m = stage.models
    sft_steps = len(
        _stage_plan(len(stage.examples), config.warmup_epochs, config.batch_prompts, config.seed)
    )
    d_only_steps = 0 if (frozen or whitebox) else config.warmup_d_only_steps

    def step_fn(step: int, timer: PhaseTimer) -> dict[str, Any]:
        indices, offset = _local_indices(stage, step)
        prompts = [stage.examples[i] for i in indices]
        train_g = config.warmup_generator and (
            step < sft_steps if offpolicy else step >= d_only_steps
        )
        train_d = (
            config.warmup_discriminator
            and not frozen
            and not whitebox
            and (step >= sft_steps if offpolicy else True)
        )
        row: dict[str, Any] = {"phase/train_g": int(train_g), "phase/train_d": int(train_d)}
        if train_d:
            with timer("rollout"):
                groups = rollout_step(config, m, prompts, step, offset)
                students = student_examples(prompts, groups)
            row.update(_length_stats(students))
            row.update(_step_signals(stage, indices, groups))
            with timer("update_d"):
                d_students = _student_d_inputs(stage, indices, groups)
                d_teacher = [stage.d_teacher[i] for i in indices]
                _, d_stats = update_d(
                    config, accelerator, m, d_teacher, d_students, config.batch_prompts
                )
            row.update(d_stats)
        if train_g:
            with timer("update_g"):
                tokens = sum(
                    len(stage.examples[i].input_ids) - stage.examples[i].prompt_len
                    for i in stage.plan[step]
                )
                g_stats = sft_g_step(config, accelerator, m, prompts, tokens)
            g_stats["g/sft_loss"] = g_stats.pop("g/sft_loss_local") / tokens
            row.update(g_stats)
        row = _reduce_mean(accelerator, {k: v for k, v in row.items()})
        if train_g:
            row["g/sft_loss"] *= accelerator.num_processes  # local sums over global tokens
        return row

    _run_loop(stage, len(stage.plan), step_fn, ("d/loss", "d/accuracy", "g/sft_loss"))
    return _finish(stage)


# ----------------------------------------------------------------------------- GAD stage


def adversarial(config: cfg.GADConfig, accelerator: Any) -> Path:
    """Stage 2: on-policy GRPO against the discriminator, which keeps learning (Algorithm 1).

    With `method="offpolicy"` or a `reward_model`, the discriminator is frozen: only scores.
    With `reward_mix_alpha`, the discriminator learns and the frozen reward model is mixed into
    its reward (`losses.mixed_reward`). With `method="whitebox"` there is no discriminator: the
    teacher's exact log-probs give per-token advantages (the white-box ceiling).
    """
    out = Path(config.output_dir)
    warm = out / "warmup" / "final"
    whitebox = config.method == "whitebox"
    init: dict[str, Any] = {"generator": str(warm) if warm.exists() else config.model}
    if whitebox:
        pass
    elif frozen_reward(config):
        init["discriminator_folder"] = config.reward_model
    elif (warm / "discriminator").exists():
        init["discriminator_folder"] = str(warm / "discriminator")
    else:
        init["discriminator"] = config.discriminator or config.model
    init["d_trainable"] = config.method == "gad" and not frozen_reward(config)
    if warm.exists() and (out / "warmup" / OPTIMIZERS_FILE).exists():
        init["optimizers"] = out / "warmup" / OPTIMIZERS_FILE
    if config.kl_coef > 0:
        # The reference is the student as it enters this stage, frozen; kept on disk so a
        # resumed run compares against the same policy.
        reference = out / "gad" / "reference"
        if accelerator.is_main_process and not (reference / "config.json").exists():
            model, tokenizer = models.load(init["generator"])
            model.save_pretrained(reference)
            tokenizer.save_pretrained(reference)
        accelerator.wait_for_everyone()
        init["reference"] = str(reference)
    stage = _setup(config, "gad", accelerator, epochs=config.epochs, init=init)
    total = len(stage.plan)
    if config.max_steps:
        total = min(total, config.max_steps)
    m, n = stage.models, config.n_samples
    if config.reward_mix_alpha is not None:
        rm = discriminator.load(config.reward_model)  # type: ignore[arg-type]
        m.rm_tokenizer = _tokenizer_of(config.reward_model, m.tokenizer)  # type: ignore[arg-type]
        rm.config.pad_token_id = _pad_id(m.rm_tokenizer)
        m.reward_model = rm.to(accelerator.device).eval().requires_grad_(False)
    held_out = HeldOut.load(config, stage) if config.eval_every else None

    def step_fn(step: int, timer: PhaseTimer) -> dict[str, Any]:
        indices, offset = _local_indices(stage, step)
        prompts = [stage.examples[i] for i in indices]
        with timer("rollout"):
            groups = rollout_step(config, m, prompts, step, offset)
            students = student_examples(prompts, groups)
        generated = sum(len(c.token_ids) for group in groups for c in group)
        row: dict[str, Any] = _step_signals(stage, indices, groups)
        with timer("ref_logp"):
            ref_logp = ref_logprobs(config, accelerator, m, students)
        teacher_logp, advantage_b = None, None
        if whitebox:
            with timer("teacher_logp"):
                teacher_prompts = [stage.teacher_prompts[i] for i in indices for _ in range(n)]
                teacher_logp = teacher_logprobs(accelerator, m, teacher_prompts, students)
        else:
            reward_b, d_stats = score_and_update_d(stage, step, indices, groups, timer)
            row.update(d_stats)
            lengths_b = torch.tensor(
                [float(len(e.input_ids) - e.prompt_len) for e in students],
                device=reward_b.device,
            )
            reward_b = losses.shaped_reward(
                reward_b,
                lengths_b,
                length_penalty=config.length_penalty,
                score_clip=config.score_clip,
            )
            with timer("advantages"):
                advantage_b = losses.group_advantages(reward_b.view(-1, n)).reshape(-1)
            row["reward/mean"] = reward_b.mean().item()
            row["reward/std"] = reward_b.std().item() if reward_b.numel() > 1 else 0.0
            row["advantage/mean"] = advantage_b.mean().item()
        with timer("update_g"):
            g_stats = update_g(
                config,
                accelerator,
                m,
                students,
                advantage_b,
                ref_logp,
                config.batch_prompts * n,
                teacher_logp,
            )
        row |= {**g_stats, **_length_stats(students), "tokens/generated": float(generated)}
        row = _reduce_mean(accelerator, row)
        row["tokens/generated"] *= accelerator.num_processes
        row["tokens/rollout_per_s"] = row["tokens/generated"] / max(timer.seconds["rollout"], 1e-9)
        if held_out is not None and (step + 1) % config.eval_every == 0:
            with timer("eval"):
                row.update(held_out.evaluate(step + 1))
        return row

    if held_out is not None and stage.start_step == 0:
        # Step 0: the post-warmup student, the reference for the length range.
        stage.metrics.log(0, held_out.evaluate(0))
    show = ("reward/mean", "d/loss", "d/accuracy", "g/kl", "response/length_mean")
    _run_loop(stage, total, step_fn, ("g/teacher_kl",) + show if whitebox else show)
    if held_out is not None:
        held_out.write_summary()
    return _finish(stage)


@dataclass
class HeldOut:
    """Held-out evaluation every `eval_every` steps and the paper's model selection: the best
    step whose mean length stays within `eval_length_range` of the post-warmup length."""

    stage: Stage
    records: list[data.Record]
    prompt_ids: list[list[int]]
    teacher: Any | None = None
    teacher_prompt_ids: list[list[int]] = field(default_factory=list)
    d_teacher: list[data.Example] = field(default_factory=list)

    @classmethod
    def load(cls, config: cfg.GADConfig, stage: Stage) -> HeldOut:
        if not config.eval_data:
            raise cfg.ConfigError(
                "eval_every needs eval_data: held-out teacher chat records (`gad split` the "
                "prompts, `gad collect` the held-out part)"
            )
        records = [r for r in data.read_records(config.eval_data).records if r.response is not None]
        if not records:
            raise cfg.ConfigError(f"eval_data: {config.eval_data} has no teacher answer")
        evalsets.refuse_overlap(list(stage.records.values()), config.eval_data, config.data)
        m = stage.models
        held = cls(stage, records, [data.encode_prompt(m.tokenizer, r.prompt) for r in records])
        if config.teacher_model:
            held.teacher = m.teacher or _load_teacher(config, m.tokenizer, stage.accelerator)
            context = _teacher_context(config.teacher_context)
            held.teacher_prompt_ids = [
                data.encode_prompt(m.tokenizer, context + r.prompt) for r in records
            ]
        elif m.discriminator is not None:
            held.d_teacher = teacher_discriminator_inputs(
                m.d_tokenizer, records, config.max_response_tokens
            )
        return held

    @property
    def metric(self) -> str:
        return "eval/reverse_kl" if self.teacher is not None else "eval/d_accuracy"

    def evaluate(self, step: int) -> dict[str, float]:
        """One sample per held-out prompt at temperature 1 (own seed; the training's random
        stream is left as it was), scored; updates the selection and `best/`."""
        stage, config, m = self.stage, self.stage.config, self.stage.models
        rng = torch.get_rng_state()
        torch.manual_seed(config.seed * 7_919 + step)
        groups = m.rollout.generate(  # type: ignore[union-attr]
            self.prompt_ids, 1, Sampling(1.0, 1.0, config.max_response_tokens)
        )
        torch.set_rng_state(rng)
        samples = [g[0] for g in groups]
        row = {
            "eval/length_mean": sum(len(c.token_ids) for c in samples) / len(samples),
            "eval/finished_share": sum(c.finish_reason == "stop" for c in samples) / len(samples),
        }
        if self.teacher is not None:
            row["eval/reverse_kl"] = self._exact_reverse_kl(samples)
        elif self.d_teacher:
            prompts = [r.prompt for r in self.records]
            d_samples = discriminator_inputs(
                m.d_tokenizer, prompts, [[c] for c in samples], config.max_response_tokens
            )
            pad = _pad_id(m.d_tokenizer)
            with stage.accelerator.autocast():
                t_b = reward.score(m.discriminator, self.d_teacher, pad, config.micro_batch_size)
                s_b = reward.score(m.discriminator, d_samples, pad, config.micro_batch_size)
            row["eval/d_accuracy"] = (t_b > s_b).float().mean().item()
        self._select(step, row)
        return row

    @torch.no_grad()
    def _exact_reverse_kl(self, samples: list[Completion]) -> float:
        """KL(student || teacher) per sampled token, exact over the full vocabulary."""
        m, acc = self.stage.models, self.stage.accelerator
        total, tokens = 0.0, 0
        for prompt, teacher_prompt, c in zip(
            self.prompt_ids, self.teacher_prompt_ids, samples, strict=True
        ):
            rows = []
            for model, ids in ((m.generator, prompt), (self.teacher, teacher_prompt)):
                example = data.Example("", ids + c.token_ids, len(ids), False)
                batch = sft.collate([example], _pad_id(m.tokenizer))
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.autocast():
                    logits_btv, _, mask_bt = sft.response_logits(model, batch)
                rows.append(logits_btv[0][mask_bt[0] != 0])
            ones = torch.ones(rows[0].shape[:1], device=rows[0].device)
            total += float(losses.token_kl_from_logits(rows[0][None], rows[1][None], ones[None]))
            tokens += len(c.token_ids)
        return total / max(1, tokens)

    def _select(self, step: int, row: dict[str, float]) -> None:
        sel, config = self.stage.selection, self.stage.config
        length = row["eval/length_mean"]
        if sel.base_length is None:
            sel.base_length = length
        low, high = (
            sel.base_length / config.eval_length_range,
            sel.base_length * config.eval_length_range,
        )
        in_range = low <= length <= high
        row["eval/in_range"] = float(in_range)
        sel.evals.append({"step": step, **row})
        value = row.get(self.metric)
        if value is None or not in_range:
            return
        if sel.best_value is None or value < sel.best_value:
            sel.best_step, sel.best_value = step, value
            _save_generator(self.stage, self.stage.run_dir / "best")

    def write_summary(self) -> None:
        sel, config = self.stage.selection, self.stage.config
        base = sel.base_length or 0.0
        summary = {
            "chosen_step": sel.best_step,
            "metric": self.metric,
            "value": sel.best_value,
            "length_range": [base / config.eval_length_range, base * config.eval_length_range],
            "reason": (
                f"lowest {self.metric} among the evaluations whose mean length stayed within "
                f"{config.eval_length_range}x of the post-warmup {base:.1f} tokens"
                if sel.best_step is not None
                else "no evaluation stayed within the length range"
            ),
            "model": str(self.stage.run_dir / "best") if sel.best_step is not None else None,
            "evals": sel.evals,
        }
        if self.stage.accelerator.is_main_process:
            path = self.stage.run_dir / "selection.json"
            path.write_text(json.dumps(summary, indent=2) + "\n")
            console.print(
                f"model selection: step {sel.best_step} ({self.metric} {sel.best_value}); "
                f"{summary['reason']}; {path}"
            )


def score_and_update_d(
    stage: Stage, step: int, indices: list[int], groups: list[list[Completion]], timer: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The rewards of this step's samples [P*N] (the discriminator's scores before its update,
    or a frozen scorer's), and the discriminator's stats after its `d_steps` updates."""
    config, accelerator, m, n = (
        stage.config,
        stage.accelerator,
        stage.models,
        stage.config.n_samples,
    )
    d_students = _student_d_inputs(stage, indices, groups)
    d_rows: list[dict[str, float]] = []
    if m.d_opt is not None:
        with timer("update_d"):
            d_teacher = [stage.d_teacher[i] for i in indices]
            replayed = []
            if config.d_replay_size:
                drawn = replay_draw(stage.replay, len(d_students), config.seed, step)
                replayed = [(stage.d_teacher[e["teacher"]], _example(e)) for e in drawn]
            # The first pass's scores are the discriminator's scores before its update.
            reward_b, d_stats = update_d(
                config, accelerator, m, d_teacher, d_students, config.batch_prompts, replayed
            )
            d_rows.append(d_stats)
            for _ in range(config.d_steps - 1):
                d_rows.append(
                    update_d(
                        config,
                        accelerator,
                        m,
                        d_teacher,
                        d_students,
                        config.batch_prompts,
                        replayed,
                    )[1]
                )
            if config.d_replay_size:
                fresh = [
                    {"teacher": indices[k // n], **dataclasses.asdict(e)}
                    for k, e in enumerate(d_students)
                ]
                stage.replay = replay_push(stage.replay, fresh, config.d_replay_size)
    else:
        with timer("score"), accelerator.autocast():
            # A frozen scorer (reward model, off-policy D) needs only the samples' scores.
            reward_b = reward.score(
                m.discriminator, d_students, _pad_id(m.d_tokenizer), config.micro_batch_size
            )
            d_rows.append({"d/student_score": reward_b.mean().item()})
    if m.reward_model is not None:
        with timer("score_rm"), accelerator.autocast():
            rm_inputs = _student_d_inputs(stage, indices, groups, m.rm_tokenizer)
            rm_b = reward.score(
                m.reward_model, rm_inputs, _pad_id(m.rm_tokenizer), config.micro_batch_size
            )
        d_rows[0]["reward/d_mean"] = reward_b.mean().item()
        d_rows[0]["reward/rm_mean"] = rm_b.mean().item()
        alpha: float = config.reward_mix_alpha  # type: ignore[assignment]
        reward_b = losses.mixed_reward(reward_b.view(-1, n), rm_b.view(-1, n), alpha)
        reward_b = reward_b.reshape(-1)
    row = dict(d_rows[0])
    if len(d_rows) > 1:
        row["d/loss_last"] = d_rows[-1]["d/loss"]
    return reward_b, row


def _example(entry: dict[str, Any]) -> data.Example:
    return data.Example(entry["id"], entry["input_ids"], entry["prompt_len"], entry["truncated"])


def train(config: cfg.GADConfig) -> Path:
    """Run the configured stage(s); returns the final generator folder of the last stage."""
    out = Path(config.output_dir)
    checkpoint.check_writable(out)
    config, choice = precision.apply(config)
    accelerator = sft.make_accelerator(config.mixed_precision, config.report_to, out)
    # Rollouts sample from torch's generator: seed it so a run is reproducible (a resumed run
    # restores the generator state from its checkpoint instead).
    torch.manual_seed(config.seed * 1_000_003 + accelerator.process_index)
    if accelerator.is_main_process:
        # Stages run one by one may differ in settings (the demo's learning rates): keep each.
        name = "config.yaml" if config.stage == "all" else f"config.{config.stage}.yaml"
        cfg.save(config, out / name, {"mixed_precision": choice.reason})
    if config.reward_model and config.method == "offpolicy":
        raise cfg.ConfigError("reward_model and method=offpolicy exclude each other")
    if config.reward_mix_alpha is not None and (
        config.method != "gad" or not config.reward_model or not 0 <= config.reward_mix_alpha <= 1
    ):
        raise cfg.ConfigError(
            "reward_mix_alpha needs method=gad, a reward_model, and a value in [0, 1]"
        )
    stage_configs = {"warmup": config, "gad": config}
    if config.method == "reward-distill":
        if not config.reward_model:
            raise cfg.ConfigError(
                "method=reward-distill needs reward_model: train one with `gad reward-model "
                "LABELS --output-dir runs/rm` and pass --reward-model runs/rm/final"
            )
        # `data` is `gad label` output: the warmup learns the teacher responses labelled good,
        # the RL stage visits every labelled prompt once per epoch.
        files = out / "data"
        if accelerator.is_main_process:
            reward.distill_data(config.data, files)
        accelerator.wait_for_everyone()
        stage_configs = {
            "warmup": dataclasses.replace(config, data=str(files / "sft.jsonl")),
            "gad": dataclasses.replace(config, data=str(files / "prompts.jsonl")),
        }
    started = time.time()
    final = None
    if config.stage in ("warmup", "all"):
        final = warmup(stage_configs["warmup"], accelerator)
        console.print(f"warmup done in {time.time() - started:.0f}s: {final}")
    if config.stage in ("gad", "all"):
        final = adversarial(stage_configs["gad"], accelerator)
        console.print(f"GAD stage done in {time.time() - started:.0f}s: {final}")
    accelerator.end_training()
    return final  # type: ignore[return-value]
