"""The online discriminator's reward (`method=gad`, SPEC §3 Eq. 8): the discriminator learns
while the policy does, and its scores of the samples *before* its update are their rewards.

Every `d_update_every` steps it takes `d_steps` Bradley–Terry (or CE) updates on (teacher
answer, N student samples) per prompt, plus pairs replayed from a pool of past samples
(`d_replay_size`); the first update's forward gives the rewards. Between updates it only scores
(`frozen.FrozenScorer`). `update_d` is the warmup's discriminator step too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from gad.config import load as cfg
from gad.core.tracking import PhaseTimer
from gad.data import chats
from gad.methods import samples
from gad.methods.rewards.frozen import SHOW, FrozenScorer, scalar_signal, scorer_inputs
from gad.methods.state import Models, Sampled, Signal, Stage
from gad.models import discriminator
from gad.train import engine, score_losses


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
    loss_fn = {"bt": score_losses.bt_discriminator_loss, "ce": score_losses.ce_discriminator_loss}[
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
        "d/accuracy": score_losses.discriminator_accuracy(teacher_p, student_b.view(-1, n)).item(),
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


@dataclass
class OnlineDiscriminator:
    """The discriminator that learns online; its pre-update scores are the rewards."""

    models: Models
    show: tuple[str, ...] = SHOW

    def sample_rewards(
        self, stage: Stage, step: int, sampled: Sampled, timer: PhaseTimer
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The samples' rewards [P*N] and the discriminator's stats after its `d_steps`
        updates (between updates, its scores alone)."""
        config, acc, m, n = stage.config, stage.accelerator, self.models, stage.config.n_samples
        if step % config.d_update_every:
            return FrozenScorer(m.discriminator, m.d_tokenizer).sample_rewards(
                stage, sampled, timer
            )
        d_students = scorer_inputs(stage, m.d_tokenizer, sampled)
        with timer("update_d"):
            d_teacher = [e.d_teacher for e in sampled.examples]
            replayed = []
            if config.d_replay_size:
                drawn = samples.replay_draw(stage.replay, len(d_students), config.seed, step)
                replayed = [
                    (stage.examples[e["teacher"]].d_teacher, samples.replay_example(e))
                    for e in drawn
                ]
            d_rows = []
            for _ in range(config.d_steps):
                scores_b, d_stats = update_d(
                    config, acc, m, d_teacher, d_students, config.batch_prompts, replayed
                )
                d_rows.append((scores_b, d_stats))
            if config.d_replay_size:
                fresh = [
                    {"teacher": sampled.indices[k // n], **dataclasses.asdict(e)}
                    for k, e in enumerate(d_students)
                ]
                stage.replay = samples.replay_push(stage.replay, fresh, config.d_replay_size)
        # The first pass's scores are the discriminator's scores before its update.
        (reward_b, row), last = d_rows[0], d_rows[-1][1]
        if len(d_rows) > 1:
            row = row | {"d/loss_last": last["d/loss"]}
        return reward_b, row

    def score(self, stage: Stage, step: int, sampled: Sampled, timer: PhaseTimer) -> Signal:
        reward_b, row = self.sample_rewards(stage, step, sampled, timer)
        return scalar_signal(stage, reward_b, sampled, row, timer)
