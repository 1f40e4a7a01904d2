"""The combined reward (`reward_mix_alpha`): the online discriminator's scores and a frozen
reward model's, each z-scored within its prompt's group, mixed with weight alpha on the
discriminator (`losses.mixed_reward`). The discriminator keeps learning; the reward model never
does."""

from __future__ import annotations

from dataclasses import dataclass

from gad.core.tracking import PhaseTimer
from gad.methods.rewards.frozen import SHOW, FrozenScorer, scalar_signal
from gad.methods.rewards.online import OnlineDiscriminator
from gad.methods.state import Sampled, Signal, Stage
from gad.train import losses


@dataclass
class MixedReward:
    """alpha x the discriminator's reward + (1 - alpha) x the reward model's, per group."""

    discriminator: OnlineDiscriminator
    reward_model: FrozenScorer
    alpha: float
    show: tuple[str, ...] = SHOW

    def score(self, stage: Stage, step: int, sampled: Sampled, timer: PhaseTimer) -> Signal:
        n = stage.config.n_samples
        d_b, row = self.discriminator.sample_rewards(stage, step, sampled, timer)
        rm_b, _ = self.reward_model.sample_rewards(stage, sampled, timer)
        row = row | {"reward/d_mean": d_b.mean().item(), "reward/rm_mean": rm_b.mean().item()}
        reward_b = losses.mixed_reward(d_b.view(-1, n), rm_b.view(-1, n), self.alpha).reshape(-1)
        return scalar_signal(stage, reward_b, sampled, row, timer)
