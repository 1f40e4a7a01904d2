"""The one place that chooses the GAD stage's reward from the settings."""

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
    if config.reward_model and config.reward_mix_alpha is None:
        # Reward distillation: the discriminator's slot holds the frozen reward model.
        return FrozenScorer(m.discriminator, m.d_tokenizer)
    online = OnlineDiscriminator(m)
    if config.reward_mix_alpha is not None:
        rm = FrozenScorer(m.reward_model, m.rm_tokenizer, phase="score_rm")
        return MixedReward(online, rm, config.reward_mix_alpha)
    return online
