"""GAD: Generative Adversarial Distillation, the method (SPEC §3, Algorithm 1).

Two steps, each read top to bottom as named, timed phases:

warmup_step  rollout (fresh student samples) -> update_d (Bradley–Terry, teacher vs. student)
             -> update_g (SFT on the teacher answers; skipped for `warmup_d_only_steps`)
gad_step     rollout -> ref_logp -> the stage's reward (`rewards`, chosen once at setup; the
             online discriminator's update gives the rewards: its scores *before* the update)
             -> update_g (GRPO, Eq. 7)

Two facts make the GAD step cheaper than the reference implementation without changing it:
with one policy update per step (PPO mini-batch = batch, as in the paper), the old log-probs
are the policy's own log-probs at that update, so they come from the update's forward pass;
and the discriminator's pre-update scores are the scores its update's forward computes.
Baselines and ablations are settings of the same steps (`method`, `warmup_*`, `d_loss`,
`discriminator`, `reward_model`), not copies. The stage runner (setup, resume, checkpoints,
health checks) is `stage`; the held-out evaluation and model selection `selection`.
"""

from __future__ import annotations

from typing import Any

import torch

from gad.config import load as cfg
from gad.core.tracking import PhaseTimer
from gad.data import chats
from gad.methods import samples
from gad.methods.rewards import online
from gad.methods.state import Models, Sampled, Stage, TrainingExample, local_examples
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
    engine_logp: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """One GRPO policy update (Eq. 7) over this process's sequences.

    `advantage_b` [P*N] are the group advantages; with `teacher_logp` (white-box, per sample)
    the advantages are per token instead, `losses.whitebox_advantages`. With `engine_logp`
    (vLLM's log-probs of the sampled tokens, per sample) it also logs how far the trainer's
    own log-probs, which the loss uses, are from the engine's: `rollout/logp_gap`, the mean
    absolute difference per token (and its max), the known trainer/engine mismatch.
    """
    g, world = m.generator, accelerator.num_processes
    if config.loss_agg == "token-mean":
        # verl's token-mean: every response token of the global batch weighs the same.
        local = float(sum(len(e.input_ids) - e.prompt_len for e in students))
        global_tokens = engine.reduce_sum(accelerator, [local])[0]
    totals = dict.fromkeys(("pg_loss", "kl", "clip_frac", "entropy", "loss"), 0.0)
    if teacher_logp is not None:
        totals["teacher_kl"] = 0.0
    gap = samples.GapTotals()

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
        if engine_logp is not None:
            gap.add(logp_bt, engine.rows_to_bt([engine_logp[i] for i in idx], mask_bt), mask_bt)
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
    row = {f"g/{k}": v for k, v in totals.items()} | {"g/grad_norm": result.grad_norm}
    if engine_logp is not None:
        row |= {"rollout/logp_gap": gap.mean(), "rollout/logp_gap_max": gap.max}
    return row


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


def step_signals(
    stage: Stage, examples: list[TrainingExample], groups: list[list[Completion]]
) -> dict:
    """Per-step signals that expose a construction shortcut (`health.likely_shortcut`)."""
    return {
        "signals/teacher_cut_share": sum(e.teacher_answer.truncated for e in examples)
        / len(examples),
        "signals/noncanonical_share": samples.noncanonical_share(
            stage.models.tokenizer, [e.record.prompt for e in examples], groups
        ),
    }


# ----------------------------------------------------------------------------- steps


def warmup_step(stage: Stage, step: int, timer: PhaseTimer) -> dict[str, Any]:
    """One warmup step: the discriminator on fresh samples, the generator by SFT, each on the
    steps of its schedule (`Stage.d_steps`, `Stage.g_steps`)."""
    config, acc, m = stage.config, stage.accelerator, stage.models
    _, examples, offset = local_examples(stage, step)
    policy = [e.policy for e in examples]
    train_g = config.warmup_generator and step in stage.g_steps
    train_d = config.warmup_discriminator and step in stage.d_steps
    row: dict[str, Any] = {"phase/train_g": int(train_g), "phase/train_d": int(train_d)}
    if train_d:
        with timer("rollout"):
            groups = rollout_step(config, m, policy, step, offset)
            students = samples.student_examples(policy, groups)
        row |= samples.length_stats(students) | step_signals(stage, examples, groups)
        with timer("update_d"):
            d_students = samples.discriminator_inputs(
                m.d_tokenizer,
                [e.record.prompt for e in examples],
                groups,
                config.max_response_tokens,
            )
            d_teacher = [e.d_teacher for e in examples]
            row |= online.update_d(config, acc, m, d_teacher, d_students, config.batch_prompts)[1]
    if train_g:
        with timer("update_g"):
            step_examples = [stage.examples[i].policy for i in stage.plan[step]]
            tokens = sum(len(e.input_ids) - e.prompt_len for e in step_examples)
            g_stats = sft_g_step(config, acc, m, policy, tokens)
        g_stats["g/sft_loss"] = g_stats.pop("g/sft_loss_local") / tokens
        row |= g_stats
    row = engine.reduce_mean(acc, row)
    if train_g:
        row["g/sft_loss"] *= acc.num_processes  # local sums over global tokens
    return row


def gad_step(stage: Stage, step: int, timer: PhaseTimer) -> dict[str, Any]:
    """One GAD-stage step: rollout -> ref_logp -> the stage's reward (`Stage.reward`: the
    discriminator's scores, a frozen scorer's, their mix, or the white-box teacher's
    log-probs) -> update_g."""
    config, acc, m, n = stage.config, stage.accelerator, stage.models, stage.config.n_samples
    indices, examples, offset = local_examples(stage, step)
    policy = [e.policy for e in examples]
    with timer("rollout"):
        groups = rollout_step(config, m, policy, step, offset)
        students = samples.student_examples(policy, groups)
    row: dict[str, Any] = step_signals(stage, examples, groups)
    with timer("ref_logp"):
        ref_logp = ref_logprobs(config, acc, m, students)
    sampled = Sampled(indices, examples, groups, students)
    signal = stage.reward.score(stage, step, sampled, timer)  # type: ignore[union-attr]
    row |= signal.row
    with timer("update_g"):
        global_sequences = config.batch_prompts * n
        row |= update_g(
            config, acc, m, students, signal.advantage_b, ref_logp, global_sequences,
            signal.teacher_logp, samples.engine_logprobs(groups),
        )  # fmt: skip
    generated = float(sum(len(c.token_ids) for group in groups for c in group))
    row = engine.reduce_mean(
        acc, row | samples.length_stats(students) | {"tokens/generated": generated}
    )
    row["tokens/generated"] *= acc.num_processes
    row["tokens/rollout_per_s"] = row["tokens/generated"] / max(timer.seconds["rollout"], 1e-9)
    return row
