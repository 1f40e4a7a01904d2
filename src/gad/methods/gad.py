"""GAD: Generative Adversarial Distillation, the method (SPEC §3, Algorithm 1).

Two steps, each read top to bottom as named, timed phases:

warmup_step  rollout (fresh student samples) -> update_d (Bradley–Terry, teacher vs. student)
             -> update_g (SFT on the teacher answers; skipped for `warmup_d_only_steps`)
gad_step     rollout -> ref_logp -> update_d (its forward gives the rewards: the
             discriminator's scores *before* its update) -> advantages -> update_g (GRPO, Eq. 7)

Two facts make the GAD step cheaper than the reference implementation without changing it:
with one policy update per step (PPO mini-batch = batch, as in the paper), the old log-probs
are the policy's own log-probs at that update, so they come from the update's forward pass;
and the discriminator's pre-update scores are the scores its update's forward computes.
Baselines and ablations are settings of the same steps (`method`, `warmup_*`, `d_loss`,
`discriminator`, `reward_model`), not copies. The stage runner (setup, resume, checkpoints,
health checks) is `gad_stage`; the held-out evaluation and model selection `selection`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from gad.config import load as cfg
from gad.core.tracking import PhaseTimer
from gad.data import chats
from gad.methods import samples, whitebox
from gad.methods.state import Models, Stage, frozen_reward, local_prompts
from gad.models import discriminator
from gad.train import engine, losses
from gad.train.rollout import Completion, Sampling

# ----------------------------------------------------------------------------- phases


def rollout_step(
    config: cfg.GADConfig, m: Models, prompts: list[chats.Example], step: int, rank_offset: int
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
    teacher: list[chats.Example],
    students: list[chats.Example],
    global_prompts: int,
    replayed: list[tuple[chats.Example, chats.Example]] = (),  # type: ignore[assignment]
) -> tuple[torch.Tensor, dict[str, float]]:
    """One discriminator update on (teacher answer, N student samples) per prompt (Eq. 8),
    all as `chats.discriminator_input` built them.

    `replayed` are (teacher answer, past student sample) pairs from the replay pool: extra
    pairs of the same loss, so the loss is the mean over current and replayed pairs; their
    scores are never rewards. Returns the current student scores of the forward pass *before*
    the optimizer step (the GAD rewards), [P*N] prompt-major, and the stats.
    """
    n, d, pad = config.n_samples, m.discriminator, engine.pad_id_of(m.d_tokenizer)
    loss_fn = {"bt": losses.bt_discriminator_loss, "ce": losses.ce_discriminator_loss}[
        config.d_loss
    ]
    world = accelerator.num_processes
    current, extra = len(teacher) * n, len(replayed)
    w_current, w_replay = current / (current + extra), extra / (current + extra)
    per_micro = max(1, config.micro_batch_size // (n + 1))
    parts = [("current", s) for s in range(0, len(teacher), per_micro)]
    pairs_per_micro = max(1, config.micro_batch_size // 2)
    parts += [("replay", s) for s in range(0, extra, pairs_per_micro)]
    seen: dict[str, list] = {"teacher": [], "student": [], "loss": [], "replay_loss": []}

    def loss_of(part: tuple[str, int]) -> torch.Tensor:
        kind, start = part
        if kind == "current":
            t_ex = teacher[start : start + per_micro]
            s_ex = students[start * n : (start + len(t_ex)) * n]
        else:
            t_ex = [t for t, _ in replayed[start : start + pairs_per_micro]]
            s_ex = [s for _, s in replayed[start : start + pairs_per_micro]]
        batch = engine.on_device(t_ex + s_ex, pad, accelerator.device)
        with accelerator.autocast():
            score_b = discriminator.scores(d, batch["input_ids"], batch["attention_mask"])
            teacher_p = score_b[: len(t_ex)]
            student_pn = score_b[len(t_ex) :].view(len(t_ex), -1)
            loss = loss_fn(teacher_p, student_pn)
        if kind == "replay":
            seen["replay_loss"].append(loss.item() * len(t_ex))
            return loss * w_replay * len(t_ex) / extra
        seen["loss"].append(loss.item() * len(t_ex))
        seen["teacher"].append(teacher_p.detach())
        seen["student"].append(student_pn.detach().reshape(-1))
        # Mean over all pairs of the global batch, however it is split.
        return loss * w_current * len(t_ex) * world / global_prompts

    d.train()
    result = engine.optimizer_step(accelerator, d, m.d_opt, parts, loss_of, config.max_grad_norm)
    teacher_p, student_b = torch.cat(seen["teacher"]), torch.cat(seen["student"])
    correct_pn = (teacher_p.unsqueeze(-1) > student_b.view(-1, n)).float()
    cut_pn = torch.tensor([e.truncated for e in students], device=correct_pn.device).view(-1, n)
    # Split by the student's finish: a pinned accuracy on cut samples only is a length cue.
    # Counted over all processes (each holds a different number of cut samples).
    by_finish = [correct_pn[~cut_pn], correct_pn[cut_pn]]
    right_fin, n_fin, right_cut, n_cut = engine.reduce_sum(
        accelerator, [float(v) for x in by_finish for v in (x.sum(), x.numel())]
    )
    stats = {
        "d/loss": sum(seen["loss"]) / len(teacher),
        "d/accuracy": losses.discriminator_accuracy(teacher_p, student_b.view(-1, n)).item(),
        "d/accuracy_finished": right_fin / n_fin if n_fin else math.nan,
        "d/accuracy_cut": right_cut / n_cut if n_cut else math.nan,
        "d/teacher_score": teacher_p.mean().item(),
        "d/student_score": student_b.mean().item(),
        "d/grad_norm": result.grad_norm,
    }
    if extra:
        stats["d/replay_loss"] = sum(seen["replay_loss"]) / extra
        stats["d/replay_pairs"] = float(extra)
    return student_b, stats


def ref_logprobs(config: cfg.GADConfig, accelerator: Any, m: Models, students: list) -> list:
    """Log-probs of the sampled tokens under the frozen reference policy, one [L_i] tensor per
    sample (None each without a reference), batched as `update_g` batches them."""
    if m.reference is None:
        return [None] * len(students)
    parts = engine.length_sorted_chunks(students, config.micro_batch_size)
    with accelerator.autocast():
        return engine.logprobs(
            m.reference, students, engine.pad_id_of(m.tokenizer), parts, config.temperature
        )


def update_g(
    config: cfg.GADConfig,
    accelerator: Any,
    m: Models,
    students: list[chats.Example],
    advantage_b: torch.Tensor | None,
    ref_logp: list,
    global_sequences: int,
    teacher_logp: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """One GRPO policy update (Eq. 7) over this process's sequences.

    `advantage_b` [P*N] are the group advantages; with `teacher_logp` (white-box, per sample)
    the advantages are per token instead, `losses.whitebox_advantages`.
    """
    g, world = m.generator, accelerator.num_processes
    if config.loss_agg == "token-mean":
        # verl's token-mean: every response token of the global batch weighs the same.
        local = float(sum(len(e.input_ids) - e.prompt_len for e in students))
        global_tokens = engine.reduce_sum(accelerator, [local])[0]
    totals = dict.fromkeys(("pg_loss", "kl", "clip_frac", "entropy", "loss"), 0.0)
    if teacher_logp is not None:
        totals["teacher_kl"] = 0.0

    def loss_of(idx: list[int]) -> torch.Tensor:
        pad = engine.pad_id_of(m.tokenizer)
        batch = engine.on_device([students[i] for i in idx], pad, accelerator.device)
        logp_bt, mask_bt, entropy_bt = engine.response_logprobs(
            g, batch, config.temperature, entropy=True
        )
        if teacher_logp is not None:
            teacher_bt = engine.rows_to_bt([teacher_logp[i] for i in idx], mask_bt)
            advantage = losses.whitebox_advantages(teacher_bt, logp_bt) * mask_bt
        else:
            advantage = advantage_b[idx].to(logp_bt.device)  # type: ignore[index]
        ref_bt = None
        if ref_logp[idx[0]] is not None:
            ref_bt = engine.rows_to_bt([ref_logp[i] for i in idx], mask_bt)
        # One update per step: the sampling policy is this very policy, so the old log-probs
        # are these log-probs, detached (ratio = 1, the clip stays inactive).
        loss, stats = losses.policy_loss(
            logp_bt,
            logp_bt.detach(),
            advantage,
            mask_bt,
            clip_eps=config.clip_eps,
            kl_coef=config.kl_coef,
            ref_logp_bt=ref_bt,
            agg=config.loss_agg,
        )
        weight = len(idx) / len(students)
        totals["loss"] += loss.item() * weight
        for key in ("pg_loss", "kl", "clip_frac"):
            totals[key] += stats[key].item() * weight
        totals["entropy"] += losses.masked_mean(entropy_bt, mask_bt).item() * weight
        if teacher_logp is not None:
            # Per-token reverse KL(π || teacher) on the samples: the quantity descended.
            totals["teacher_kl"] -= losses.masked_mean(advantage, mask_bt).item() * weight
        # Reweigh the micro-batch's mean to its share of the global mean.
        if config.loss_agg == "token-mean":
            return loss * float(mask_bt.sum()) * world / global_tokens
        return loss * len(idx) * world / global_sequences

    g.train()
    parts = engine.length_sorted_chunks(students, config.micro_batch_size)
    result = engine.optimizer_step(accelerator, g, m.g_opt, parts, loss_of, config.max_grad_norm)
    return {f"g/{k}": v for k, v in totals.items()} | {"g/grad_norm": result.grad_norm}


def sft_g_step(
    config: cfg.GADConfig,
    accelerator: Any,
    m: Models,
    examples: list[chats.Example],
    global_tokens: int,
) -> dict[str, float]:
    """Warmup generator step: response-only cross-entropy on the teacher answers (SeqKD)."""
    g, world, nll = m.generator, accelerator.num_processes, [0.0]

    def loss_of(idx: list[int]) -> torch.Tensor:
        pad = m.tokenizer.pad_token_id
        batch = engine.on_device([examples[i] for i in idx], pad, accelerator.device)
        loss_sum = engine.response_nll_sum(g, batch)
        nll[0] += loss_sum.item()
        return loss_sum * world / global_tokens

    g.train()
    parts = engine.length_sorted_chunks(examples, config.micro_batch_size)
    result = engine.optimizer_step(accelerator, g, m.g_opt, parts, loss_of, config.max_grad_norm)
    return {"g/sft_loss_local": nll[0], "g/grad_norm": result.grad_norm}


def score_and_update_d(
    stage: Stage, step: int, indices: list[int], groups: list[list[Completion]], timer: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The rewards of this step's samples [P*N] (the discriminator's scores before its update,
    or a frozen scorer's), and the discriminator's stats after its `d_steps` updates."""
    config, acc, m, n = stage.config, stage.accelerator, stage.models, stage.config.n_samples
    d_students = _student_d_inputs(stage, indices, groups)
    d_rows: list[dict[str, float]] = []
    if m.d_opt is not None and step % config.d_update_every == 0:
        with timer("update_d"):
            d_teacher = [stage.d_teacher[i] for i in indices]
            replayed = []
            if config.d_replay_size:
                drawn = samples.replay_draw(stage.replay, len(d_students), config.seed, step)
                replayed = [
                    (stage.d_teacher[e["teacher"]], samples.replay_example(e)) for e in drawn
                ]
            # The first pass's scores are the discriminator's scores before its update.
            for k in range(config.d_steps):
                scores_b, d_stats = update_d(
                    config, acc, m, d_teacher, d_students, config.batch_prompts, replayed
                )
                if k == 0:
                    reward_b = scores_b
                d_rows.append(d_stats)
            if config.d_replay_size:
                fresh = [
                    {"teacher": indices[k // n], **dataclasses.asdict(e)}
                    for k, e in enumerate(d_students)
                ]
                stage.replay = samples.replay_push(stage.replay, fresh, config.d_replay_size)
    else:
        with timer("score"), acc.autocast():
            # A frozen scorer (reward model, off-policy D), or a discriminator between its
            # updates (`d_update_every`), needs only the samples' scores.
            pad = engine.pad_id_of(m.d_tokenizer)
            reward_b = engine.scores(m.discriminator, d_students, pad, config.micro_batch_size)
            d_rows.append({"d/student_score": reward_b.mean().item()})
    if m.reward_model is not None:
        with timer("score_rm"), acc.autocast():
            rm_inputs = _student_d_inputs(stage, indices, groups, m.rm_tokenizer)
            pad = engine.pad_id_of(m.rm_tokenizer)
            rm_b = engine.scores(m.reward_model, rm_inputs, pad, config.micro_batch_size)
        d_rows[0]["reward/d_mean"] = reward_b.mean().item()
        d_rows[0]["reward/rm_mean"] = rm_b.mean().item()
        alpha: float = config.reward_mix_alpha  # type: ignore[assignment]
        reward_b = losses.mixed_reward(reward_b.view(-1, n), rm_b.view(-1, n), alpha).reshape(-1)
    row = dict(d_rows[0])
    if len(d_rows) > 1:
        row["d/loss_last"] = d_rows[-1]["d/loss"]
    return reward_b, row


def step_signals(stage: Stage, indices: list[int], groups: list[list[Completion]]) -> dict:
    """Per-step signals that expose a construction shortcut (`gad_stage.likely_shortcut`)."""
    teacher = stage.d_teacher or stage.examples
    prompts = [stage.records[stage.examples[i].id].prompt for i in indices]
    return {
        "signals/teacher_cut_share": sum(teacher[i].truncated for i in indices) / len(indices),
        "signals/noncanonical_share": samples.noncanonical_share(
            stage.models.tokenizer, prompts, groups
        ),
    }


def _student_d_inputs(
    stage: Stage, indices: list[int], groups: list[list[Completion]], tokenizer: Any = None
) -> list[chats.Example]:
    prompts = [stage.records[stage.examples[i].id].prompt for i in indices]
    return samples.discriminator_inputs(
        tokenizer or stage.models.d_tokenizer, prompts, groups, stage.config.max_response_tokens
    )


# ----------------------------------------------------------------------------- steps


def warmup_step(stage: Stage, step: int, timer: PhaseTimer) -> dict[str, Any]:
    """One warmup step: the discriminator on fresh samples, the generator by SFT."""
    config, acc, m = stage.config, stage.accelerator, stage.models
    offpolicy, frozen = config.method == "offpolicy", frozen_reward(config)
    indices, prompts, offset = local_prompts(stage, step)
    d_only = 0 if (frozen or config.method == "whitebox") else config.warmup_d_only_steps
    train_g = config.warmup_generator and (step < stage.sft_steps if offpolicy else step >= d_only)
    train_d = config.warmup_discriminator and m.d_opt is not None
    train_d = train_d and (step >= stage.sft_steps if offpolicy else True)
    row: dict[str, Any] = {"phase/train_g": int(train_g), "phase/train_d": int(train_d)}
    if train_d:
        with timer("rollout"):
            groups = rollout_step(config, m, prompts, step, offset)
            students = samples.student_examples(prompts, groups)
        row |= samples.length_stats(students) | step_signals(stage, indices, groups)
        with timer("update_d"):
            d_students = _student_d_inputs(stage, indices, groups)
            d_teacher = [stage.d_teacher[i] for i in indices]
            row |= update_d(config, acc, m, d_teacher, d_students, config.batch_prompts)[1]
    if train_g:
        with timer("update_g"):
            step_examples = [stage.examples[i] for i in stage.plan[step]]
            tokens = sum(len(e.input_ids) - e.prompt_len for e in step_examples)
            g_stats = sft_g_step(config, acc, m, prompts, tokens)
        g_stats["g/sft_loss"] = g_stats.pop("g/sft_loss_local") / tokens
        row |= g_stats
    row = engine.reduce_mean(acc, row)
    if train_g:
        row["g/sft_loss"] *= acc.num_processes  # local sums over global tokens
    return row


def gad_step(stage: Stage, step: int, timer: PhaseTimer) -> dict[str, Any]:
    """One GAD-stage step (white-box: the teacher's log-probs instead of a discriminator)."""
    config, acc, m, n = stage.config, stage.accelerator, stage.models, stage.config.n_samples
    indices, prompts, offset = local_prompts(stage, step)
    with timer("rollout"):
        groups = rollout_step(config, m, prompts, step, offset)
        students = samples.student_examples(prompts, groups)
    row: dict[str, Any] = step_signals(stage, indices, groups)
    with timer("ref_logp"):
        ref_logp = ref_logprobs(config, acc, m, students)
    teacher_logp, advantage_b = None, None
    if config.method == "whitebox":
        with timer("teacher_logp"):
            teacher_prompts = [stage.teacher_prompts[i] for i in indices for _ in range(n)]
            teacher_logp = whitebox.teacher_logprobs(
                acc, m, teacher_prompts, students, stage.teacher_mixture
            )
    else:
        reward_b, d_stats = score_and_update_d(stage, step, indices, groups, timer)
        lengths_b = torch.tensor(
            [float(len(e.input_ids) - e.prompt_len) for e in students], device=reward_b.device
        )
        reward_b = losses.shaped_reward(
            reward_b, lengths_b, length_penalty=config.length_penalty, score_clip=config.score_clip
        )
        with timer("advantages"):
            advantage_b = losses.group_advantages(reward_b.view(-1, n)).reshape(-1)
        row |= d_stats | {
            "reward/mean": reward_b.mean().item(),
            "reward/std": engine.global_std(acc, reward_b),
            "advantage/mean": advantage_b.mean().item(),
        }
    with timer("update_g"):
        global_sequences = config.batch_prompts * n
        row |= update_g(
            config, acc, m, students, advantage_b, ref_logp, global_sequences, teacher_logp
        )
    generated = float(sum(len(c.token_ids) for group in groups for c in group))
    row = engine.reduce_mean(
        acc, row | samples.length_stats(students) | {"tokens/generated": generated}
    )
    row["tokens/generated"] *= acc.num_processes
    row["tokens/rollout_per_s"] = row["tokens/generated"] / max(timer.seconds["rollout"], 1e-9)
    return row
