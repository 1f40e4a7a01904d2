"""The one place that reads which reward the settings ask for: the GAD stage's reward object
(`choose`), and whether the discriminator's slot holds a frozen reward model (`frozen_reward`,
which decides what the stages load)."""

from __future__ import annotations

from gad.config import load as cfg
from gad.methods.rewards.frozen import FrozenScorer
from gad.methods.rewards.mix import MixedReward
from gad.methods.rewards.online import OnlineDiscriminator
from gad.methods.rewards.whitebox import WhiteBoxTeacher
from gad.methods.state import Models, Reward


def choose(config: cfg.GADConfig, m: Models) -> Reward:
    """The reward of the GAD stage for `method`, `reward_model` and `reward_mix_alpha` (their
    combinations were checked before any work), on the stage's loaded models `m`."""
    if config.method == "whitebox":
        return WhiteBoxTeacher(m.teacher, m.teacher_contexts)
    if config.method == "offpolicy":
        # The discriminator trained in the warmup, frozen from here on (paper Fig. 6).
        return FrozenScorer(m.discriminator, m.d_tokenizer)
    if frozen_reward(config):
        # Reward distillation: the discriminator's slot holds the frozen reward model.
        return FrozenScorer(m.discriminator, m.d_tokenizer)
    online = OnlineDiscriminator(m)
    if config.reward_mix_alpha is not None:
        rm = FrozenScorer(m.reward_model, m.rm_tokenizer, phase="score_rm")
        return MixedReward(online, rm, config.reward_mix_alpha)
    return online


def frozen_reward(config: cfg.GADConfig) -> bool:
    """The discriminator's slot holds the frozen `reward_model` (reward distillation) rather than
    a discriminator that learns; with `reward_mix_alpha` the reward model is mixed in instead."""
    return bool(config.reward_model) and config.reward_mix_alpha is None
