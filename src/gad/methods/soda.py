"""SODA: semi on-policy black-box distillation (SPEC §5, arXiv 2604.03873), `method: soda`.

One static snapshot of the starting student's own answers, one per training prompt, then DPO
(`losses.dpo_loss`) with the teacher's answer as chosen and the snapshot answer as rejected,
the starting model as the frozen reference. No rollout during training, no discriminator.

snapshot   once, before step 0: sample, then the reference's log-probs of both answers of
           every pair, all written to `<stage>/snapshot.jsonl` (reused on resume, so a resumed
           run trains on the very same pairs against the very same reference)
soda_step  one DPO update on `batch_prompts` pairs, under the stage's run loop like the GAD
           stage (resume, metrics, health checks, checkpoints)

Both answers are encoded by `chats.encode_sft`, so through `chats.encode_response` with the
end-of-turn token iff the answer finished (SPEC §3): a snapshot answer cut at
`max_response_tokens`, like a teacher answer with `finish_reason == "length"`, ends on a content
token, and "ends with end-of-turn" is never what tells chosen from rejected.

Log-probs are at temperature 1 (DPO's and TRL's convention), whatever the sampling temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gad.config import load as cfg
from gad.core import progress
from gad.core.tracking import PhaseTimer
from gad.data import chats
from gad.methods.state import Models, Stage, local_examples
from gad.models import lora, lora_roles
from gad.train import engine, losses
from gad.train.rollout import Sampling

SNAPSHOT_FILE = "snapshot.jsonl"
SHOW = ("soda/loss", "soda/margin", "soda/accuracy")
"""The progress bar's stats."""


def check(config: cfg.GADConfig) -> None:
    """The settings `method=soda` has no use for, refused rather than silently ignored."""
    if config.method != "soda":
        return
    if config.stage == "warmup":
        raise cfg.ConfigError("stage=warmup: method=soda has no warmup; use stage gad or all")
    if config.single_base:
        raise cfg.ConfigError("single_base: method=soda has no second model to share a base with")
    if config.reward_model:
        raise cfg.ConfigError("reward_model: method=soda trains on preference pairs, no reward")
    if config.eval_every:
        raise cfg.ConfigError("eval_every: method=soda has no held-out selection; set it to 0")
    defaults = type(config)()
    for name in UNUSED:
        if getattr(config, name) != getattr(defaults, name):
            raise cfg.ConfigError(
                f"{name}: method=soda does not use it (no rollout groups, discriminator, "
                "warmup or policy-gradient loss); remove it or use method gad"
            )


UNUSED = (
    "discriminator", "reward_mix_alpha", "warmup_epochs", "warmup_generator",
    "warmup_discriminator", "warmup_d_only_steps", "warmup_max_steps", "offpolicy_d_epochs",
    "n_samples", "d_lr", "clip_eps", "kl_coef", "d_loss", "d_steps", "d_update_every",
    "d_replay_size", "length_penalty", "score_clip", "loss_agg", "teacher_model",
    "teacher_context",
)  # fmt: skip
"""GAD-family settings a SODA run would otherwise ignore without a word."""


@dataclass
class Pairs:
    """The stage's DPO pairs, aligned with `stage.examples` (their teacher answers are chosen)."""

    rejected: list[chats.Example]
    """The snapshot answers as the policy sees them."""
    ref_chosen: torch.Tensor
    """[N] the reference's sequence log-probs of the chosen answers."""
    ref_rejected: torch.Tensor
    """[N] the same of the rejected answers."""


def rejected_examples(
    tokenizer: Any, records: list[chats.Record], config: cfg.GADConfig
) -> list[chats.Example]:
    """Snapshot records (prompt + the student's answer, meta.finish_reason) as examples, by the
    rule the teacher's answers follow (`chats.encode_sft`)."""
    return chats.encode_sft(
        tokenizer,
        records,
        max_prompt_tokens=config.max_prompt_tokens,
        max_response_tokens=config.max_response_tokens,
    ).examples


def reference_logprobs(stage: Stage, examples: list[chats.Example]) -> list[float]:
    """Sequence log-probs of `examples` under the starting model, frozen: the generator before
    its first update, in eval mode; with LoRA the bare base with the adapter disabled (a fresh
    adapter's B is zero, so that is the same function, and no adapter state can leak in)."""
    acc, m = stage.accelerator, stage.models
    generator = acc.unwrap_model(m.generator)
    was_training = generator.training
    generator.eval()
    model = generator
    if isinstance(generator, lora.LMView):
        model = lora_roles.frozen_reference(generator.adapters, None)
    parts = engine.length_sorted_chunks(examples, stage.config.micro_batch_size)
    with acc.autocast():
        rows = engine.logprobs(model, examples, engine.pad_id_of(m.tokenizer), parts, 1.0)
    generator.train(was_training)
    return [float(r.sum()) for r in rows]


def _sample_mine(stage: Stage) -> list[chats.Record]:
    """This process's share of the snapshot: one answer per example of its slice, at the
    run's temperature, with the reference's log-probs of both answers in `meta`."""
    config, acc, m = stage.config, stage.accelerator, stage.models
    indices, _ = engine.local_slice(
        range(len(stage.examples)), acc.process_index, acc.num_processes
    )
    sampling = Sampling(config.temperature, config.top_p, config.max_response_tokens)
    records: list[chats.Record] = []
    show = acc.is_main_process
    bar = progress.Bar("snapshot", len(indices), "prompts", show)
    try:
        for chunk in engine.chunks(indices, config.generation_batch_size):
            examples = [stage.examples[i] for i in chunk]
            seeds = None
            if config.per_prompt_seeds:
                seeds = [hash((config.seed, -1, i)) % (2**31) for i in chunk]
            prompts = [e.policy.input_ids[: e.policy.prompt_len] for e in examples]
            groups = m.rollout.generate(prompts, 1, sampling, seeds)  # type: ignore[union-attr]
            for e, (answer,) in zip(examples, groups, strict=True):
                messages = e.record.prompt + [{"role": "assistant", "content": answer.text}]
                records.append(
                    chats.Record(e.policy.id, messages, {"finish_reason": answer.finish_reason})
                )
            bar.update(len(records))
    finally:
        bar.close()
    chosen = [stage.examples[i].policy for i in indices]
    rejected = rejected_examples(m.tokenizer, records, config)
    ref_pairs = zip(
        reference_logprobs(stage, chosen), reference_logprobs(stage, rejected), strict=True
    )
    for record, (ref_c, ref_r) in zip(records, ref_pairs, strict=True):
        record.meta |= {"ref_logp_chosen": ref_c, "ref_logp_rejected": ref_r}
    return records


def snapshot(stage: Stage) -> Pairs:
    """The stage's pairs from `<stage>/snapshot.jsonl`, sampled and written first unless a
    resumed run finds it (each process samples its share; the main process joins them).
    A fresh start logs the snapshot's stats at step 0."""
    acc, path = stage.accelerator, stage.run_dir / SNAPSHOT_FILE
    if stage.start_step > 0 and not path.exists():
        raise cfg.ConfigError(
            f"resume: {path} is gone, so the pairs the checkpoint trained on cannot be rebuilt; "
            "run without resume to start afresh"
        )
    if not (stage.config.resume and path.exists()):
        part = stage.run_dir / f"snapshot.part-{acc.process_index}.jsonl"
        chats.write_records(part, _sample_mine(stage))
        acc.wait_for_everyone()
        if acc.is_main_process:
            parts = [stage.run_dir / f"snapshot.part-{r}.jsonl" for r in range(acc.num_processes)]
            chats.write_records(path, [r for p in parts for r in chats.read_records(p).records])
            for p in parts:
                p.unlink()
        acc.wait_for_everyone()
    by_id = {r.id: r for r in chats.read_records(path).records}
    chosen = [e.policy for e in stage.examples]
    missing = [e.id for e in chosen if e.id not in by_id]
    if missing:
        raise cfg.ConfigError(
            f"resume: {path} has no answer for {len(missing)} training prompt(s) (e.g. "
            f"{missing[0]}): the data changed; run without resume to start afresh"
        )
    records = [by_id[e.id] for e in chosen]
    pairs = Pairs(
        rejected_examples(stage.models.tokenizer, records, stage.config),
        torch.tensor([r.meta["ref_logp_chosen"] for r in records], dtype=torch.float32),
        torch.tensor([r.meta["ref_logp_rejected"] for r in records], dtype=torch.float32),
    )
    if stage.start_step == 0:
        stage.metrics.log(0, snapshot_stats(chosen, pairs.rejected))
    return pairs


def snapshot_stats(chosen: list[chats.Example], rejected: list[chats.Example]) -> dict[str, float]:
    """How the snapshot's answers ended and how long they are, beside the teacher's: a gap in
    finished shares is a cue DPO can learn instead of the content."""
    lengths = [len(e.input_ids) - e.prompt_len for e in rejected]
    return {
        "snapshot/finished_share": sum(not e.truncated for e in rejected) / len(rejected),
        "snapshot/length_mean": sum(lengths) / len(lengths),
        "snapshot/teacher_finished_share": sum(not e.truncated for e in chosen) / len(chosen),
    }


def dpo_update(
    config: cfg.GADConfig,
    accelerator: Any,
    m: Models,
    chosen: list[chats.Example],
    rejected: list[chats.Example],
    ref_chosen_b: torch.Tensor,
    ref_rejected_b: torch.Tensor,
) -> dict[str, float]:
    """One DPO update over this process's pairs (both answers of a pair in one micro-batch);
    the loss is the mean over the step's `batch_prompts` pairs, however they are split."""
    g, world, pad = m.generator, accelerator.num_processes, engine.pad_id_of(m.tokenizer)
    totals = dict.fromkeys(("loss", "margin", "accuracy", "chosen_reward", "rejected_reward"), 0.0)

    def loss_of(idx: list[int]) -> torch.Tensor:
        examples = [chosen[i] for i in idx] + [rejected[i] for i in idx]
        batch = engine.on_device(examples, pad, accelerator.device)
        logp_bt, mask_bt, _ = engine.response_logprobs(g, batch, 1.0)
        seq_b = torch.where(mask_bt != 0, logp_bt, torch.zeros_like(logp_bt)).sum(-1)
        k = len(idx)
        ref_c, ref_r = ref_chosen_b[idx].to(seq_b.device), ref_rejected_b[idx].to(seq_b.device)
        loss, stats = losses.dpo_loss(seq_b[:k], seq_b[k:], ref_c, ref_r, config.soda_beta)
        totals["loss"] += loss.item() * k / len(chosen)
        for key, value in stats.items():
            totals[key] += value.item() * k / len(chosen)
        return loss * k * world / config.batch_prompts

    g.train()
    # Micro-batches of pairs of similar length (the longer answer of each pair decides).
    longer = [
        max(c, r, key=lambda e: len(e.input_ids)) for c, r in zip(chosen, rejected, strict=True)
    ]
    parts = engine.length_sorted_chunks(longer, max(1, config.micro_batch_size // 2))
    result = engine.optimizer_step(accelerator, g, m.g_opt, parts, loss_of, config.max_grad_norm)
    return {f"soda/{k}": v for k, v in totals.items()} | {"soda/grad_norm": result.grad_norm}


def soda_step(stage: Stage, step: int, timer: PhaseTimer, pairs: Pairs) -> dict[str, Any]:
    """One SODA step: a DPO update on this process's share of the step's pairs."""
    indices, examples, _ = local_examples(stage, step)
    with timer("update_g"):
        row = dpo_update(
            stage.config,
            stage.accelerator,
            stage.models,
            [e.policy for e in examples],
            [pairs.rejected[i] for i in indices],
            pairs.ref_chosen[indices],
            pairs.ref_rejected[indices],
        )
    return engine.reduce_mean(stage.accelerator, row)
