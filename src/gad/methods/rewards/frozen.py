"""A frozen scalar scorer's reward: the samples' scores, nothing learns.

Two settings use it: `method=offpolicy` (the discriminator trained in the warmup, frozen for
the GAD stage) and reward distillation (`method=reward-distill`, or `reward_model` without
`reward_mix_alpha`: the trained reward model). The same scoring serves the online
discriminator between its updates (`d_update_every`) and the reward model of a mix. Scalar
rewards become the policy's signal here too (`scalar_signal`): shaped, then group advantages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gad.core.tracking import PhaseTimer
from gad.methods import samples
from gad.methods.state import Sampled, Signal, Stage
from gad.train import engine, losses

SHOW = ("reward/mean", "d/loss", "d/accuracy", "g/kl", "response/length_mean")
"""The progress bar's stats for a scalar reward."""


def scorer_inputs(stage: Stage, tokenizer: Any, sampled: Sampled) -> list:
    """The samples as a scorer with `tokenizer` reads them (text re-encoded, [P*N])."""
    prompts = [e.record.prompt for e in sampled.examples]
    return samples.discriminator_inputs(
        tokenizer, prompts, sampled.groups, stage.config.max_response_tokens
    )


def scalar_signal(
    stage: Stage, reward_b: torch.Tensor, sampled: Sampled, row: dict, timer: PhaseTimer
) -> Signal:
    """Per-sample rewards [P*N] as the policy's signal: shaped (`length_penalty`,
    `score_clip`), then normalised within each prompt's group (GRPO's advantages)."""
    config, acc, n = stage.config, stage.accelerator, stage.config.n_samples
    lengths_b = torch.tensor(
        [float(len(e.input_ids) - e.prompt_len) for e in sampled.students],
        device=reward_b.device,
    )
    reward_b = losses.shaped_reward(
        reward_b, lengths_b, length_penalty=config.length_penalty, score_clip=config.score_clip
    )
    with timer("advantages"):
        advantage_b = losses.group_advantages(reward_b.view(-1, n)).reshape(-1)
    row = row | {
        "reward/mean": reward_b.mean().item(),
        "reward/std": engine.global_std(acc, reward_b),
        "advantage/mean": advantage_b.mean().item(),
    }
    return Signal(advantage_b, None, row)


@dataclass
class FrozenScorer:
    """A frozen scalar-head model whose scores of the samples are their rewards."""

    model: Any
    tokenizer: Any
    phase: str = "score"
    """The timer's name for the scoring."""
    show: tuple[str, ...] = SHOW

    def sample_rewards(
        self, stage: Stage, sampled: Sampled, timer: PhaseTimer
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The samples' scores [P*N] and their mean."""
        config, acc = stage.config, stage.accelerator
        with timer(self.phase), acc.autocast():
            inputs = scorer_inputs(stage, self.tokenizer, sampled)
            pad = engine.pad_id_of(self.tokenizer)
            reward_b = engine.scores(self.model, inputs, pad, config.micro_batch_size)
        return reward_b, {"d/student_score": reward_b.mean().item()}

    def score(self, stage: Stage, step: int, sampled: Sampled, timer: PhaseTimer) -> Signal:
        reward_b, row = self.sample_rewards(stage, sampled, timer)
        return scalar_signal(stage, reward_b, sampled, row, timer)
