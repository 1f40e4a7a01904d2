"""The GAD stage's reward seam: `choose` picks one object per setting, and each reward gives
the policy update a signal of the right shape (a scalar reward: [P*N] group advantages; the
white box: per-token teacher log-probs)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from gad.config import load as cfg
from gad.core.tracking import PhaseTimer
from gad.data import chats
from gad.methods.rewards.choice import choose
from gad.methods.rewards.frozen import FrozenScorer
from gad.methods.rewards.mix import MixedReward
from gad.methods.rewards.online import OnlineDiscriminator
from gad.methods.rewards.whitebox import WhiteBoxTeacher
from gad.methods.samples import student_examples
from gad.methods.state import Models, Sampled, TrainingExample, training_examples
from gad.models import discriminator, mixture, store
from gad.train import engine, loop
from gad.train.rollout import Completion

P, N = 2, 3


def models(**kw) -> Models:
    return Models("generator", "discriminator", "tokenizer", "g_opt", **kw)


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        ({}, OnlineDiscriminator),
        ({"method": "offpolicy"}, FrozenScorer),
        ({"method": "reward-distill", "reward_model": "rm"}, FrozenScorer),
        ({"reward_model": "rm"}, FrozenScorer),
        ({"reward_model": "rm", "reward_mix_alpha": 0.5}, MixedReward),
        ({"method": "whitebox", "teacher_model": "t"}, WhiteBoxTeacher),
    ],
)
def test_choose_picks_one_reward_per_setting(settings, kind):
    m = models(reward_model="rm-model", rm_tokenizer="rm-tok", teacher="teacher", d_opt="d_opt")
    reward = choose(cfg.GADConfig(**settings), m)
    assert type(reward) is kind
    if kind is FrozenScorer:
        # The off-policy discriminator and reward distillation's model both sit in D's slot.
        assert (reward.model, reward.phase) == ("discriminator", "score")
    if kind is MixedReward:
        assert reward.alpha == 0.5 and reward.discriminator.models is m
        assert (reward.reward_model.model, reward.reward_model.phase) == ("rm-model", "score_rm")
    if kind is WhiteBoxTeacher:
        assert reward.teacher == "teacher" and "g/teacher_kl" in reward.show


@pytest.fixture(scope="module")
def scene(tiny_dir, tmp_path_factory):
    """A stage-like scene: P prompts, N completions each, a tiny discriminator and teacher."""
    tokenizer = store.load_tokenizer(str(tiny_dir))
    pad = engine.pad_id_of(tokenizer)
    d = discriminator.build(str(tiny_dir), pad_token_id=pad, seed=0)
    teacher, _ = store.load(str(tiny_dir))
    config = cfg.GADConfig(n_samples=N, batch_prompts=P, micro_batch_size=4, d_update_every=2)
    records = [
        chats.Record(f"r{p}", [{"role": "user", "content": f"q {p}"}, {"role": "assistant",
                     "content": "an answer"}])
        for p in range(P)
    ]  # fmt: skip
    encoded = chats.encode_sft(tokenizer, records, max_prompt_tokens=64, max_response_tokens=16)
    prepared = SimpleNamespace(examples=encoded.examples, records={r.id: r for r in records})
    m = Models(None, d, tokenizer, None, torch.optim.AdamW(d.parameters(), lr=1e-3))
    m.d_tokenizer, m.teacher = tokenizer, teacher
    m.teacher_contexts = mixture.load(None)
    examples = training_examples(prepared, m, config)
    torch.manual_seed(0)
    groups = [
        [Completion(torch.randint(5, 200, (3 + k,)).tolist(), f"words {k}", "length")
         for k in range(N)]
        for _ in range(P)
    ]  # fmt: skip
    students = student_examples([e.policy for e in examples], groups)
    accelerator = loop.make_accelerator("no", "none", tmp_path_factory.mktemp("acc"))
    stage = SimpleNamespace(
        config=config, accelerator=accelerator, models=m, examples=examples, replay=[]
    )
    return stage, Sampled(list(range(P)), examples, groups, students)


def test_training_examples_hold_what_each_consumer_needs(scene):
    stage, sampled = scene
    (first, _) = sampled.examples
    assert isinstance(first, TrainingExample)
    assert first.record.id == first.policy.id == "r0"
    assert first.d_teacher is not None and first.teacher_answer is first.d_teacher
    assert len(first.teacher_prompts) == 1  # one hidden context: the empty one
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.d_teacher = None  # type: ignore[misc]


def test_a_frozen_scorer_gives_group_advantages_and_learns_nothing(scene):
    stage, sampled = scene
    m = stage.models
    before = [p.detach().clone() for p in m.discriminator.parameters()]
    signal = FrozenScorer(m.discriminator, m.d_tokenizer).score(stage, 0, sampled, PhaseTimer())
    assert signal.teacher_logp is None and signal.advantage_b.shape == (P * N,)
    assert torch.allclose(signal.advantage_b.view(P, N).mean(-1), torch.zeros(P), atol=1e-5)
    assert {"d/student_score", "reward/mean", "reward/std", "advantage/mean"} <= set(signal.row)
    assert all(torch.equal(a, b) for a, b in zip(before, m.discriminator.parameters(), strict=True))


def test_the_online_discriminator_learns_on_its_steps_only(scene):
    stage, sampled = scene
    m = stage.models
    reward = OnlineDiscriminator(m)
    between, row = reward.sample_rewards(stage, 1, sampled, PhaseTimer())  # d_update_every=2
    assert between.shape == (P * N,) and set(row) == {"d/student_score"}
    before = [p.detach().clone() for p in m.discriminator.parameters()]
    timer = PhaseTimer()
    scores_b, row = reward.sample_rewards(stage, 2, sampled, timer)
    # Its rewards are its scores before the update: those of the step between.
    assert torch.allclose(scores_b, between, atol=1e-5)
    assert "d/loss" in row and "update_d" in timer.seconds
    assert not all(
        torch.equal(a, b) for a, b in zip(before, m.discriminator.parameters(), strict=True)
    )


def test_the_mix_reports_both_parts(scene):
    stage, sampled = scene
    m = stage.models
    mixed = MixedReward(
        OnlineDiscriminator(m), FrozenScorer(m.discriminator, m.d_tokenizer, "score_rm"), 0.5
    )
    timer = PhaseTimer()
    signal = mixed.score(stage, 1, sampled, timer)
    assert signal.advantage_b.shape == (P * N,)
    assert {"reward/d_mean", "reward/rm_mean"} <= set(signal.row) and "score_rm" in timer.seconds


def test_the_white_box_gives_per_token_teacher_logprobs(scene):
    stage, sampled = scene
    m = stage.models
    signal = WhiteBoxTeacher(m.teacher, m.teacher_contexts).score(stage, 0, sampled, PhaseTimer())
    assert signal.advantage_b is None and len(signal.teacher_logp) == P * N
    lengths = [len(e.input_ids) - e.prompt_len for e in sampled.students]
    assert [t.shape[0] for t in signal.teacher_logp] == lengths
    assert all(bool((t <= 0).all()) for t in signal.teacher_logp)
