"""The white-box ceiling's reward: a local teacher's exact log-probs of the student's samples.

`method=whitebox` is on-policy distillation with the teacher's own probabilities (SPEC §5):
not black-box, so not the product's main method, but the bound a black-box method is measured
against. The teacher may answer under a hidden context or a mixture of them (`mixture`). Its
signal is per token: the policy update turns the log-probs into advantages
(`losses.whitebox_advantages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gad.core.tracking import PhaseTimer
from gad.data import chats
from gad.methods.rewards.frozen import SHOW
from gad.methods.state import Sampled, Signal, Stage
from gad.models import mixture
from gad.train import engine


def teacher_logprobs(
    accelerator: Any,
    teacher: Any,
    pad: int,
    teacher_prompts: list[tuple[list[int], ...]],
    students: list[chats.Example],
    contexts: list[mixture.Component],
) -> list[torch.Tensor]:
    """The frozen teacher's exact log-probs (temperature 1) of each sample's sampled ids, one
    [L_i] tensor per sample. Each of the teacher's hidden contexts reads its own prompt
    (context + prompt; `teacher_prompts[i][k]`), and a mixture of contexts combines them
    exactly (`mixture.token_logprobs`). Needs the student's tokenizer (`pad` is its pad id)."""
    per_context = []
    for k in range(len(contexts)):
        examples = [
            chats.Example(e.id, tp[k] + e.input_ids[e.prompt_len :], len(tp[k]), e.truncated)
            for tp, e in zip(teacher_prompts, students, strict=True)
        ]
        parts = engine.length_sorted_chunks(examples, 8)
        with accelerator.autocast():
            # The context is read once per call, not once per sample.
            prefix = engine.SharedPrefix(teacher, [tp[k] for tp in teacher_prompts])
            per_context.append(engine.logprobs(teacher, examples, pad, parts, 1.0, prefix))
    if len(contexts) == 1:
        return per_context[0]
    log_w = mixture.log_weights(contexts)
    return [
        mixture.token_logprobs(torch.stack(rows), log_w).float()
        for rows in zip(*per_context, strict=True)
    ]


@dataclass
class WhiteBoxTeacher:
    """The local teacher (`teacher_model`) under its hidden contexts (`teacher_context`)."""

    teacher: Any
    contexts: list[mixture.Component]
    show: tuple[str, ...] = ("g/teacher_kl",) + SHOW

    def score(self, stage: Stage, step: int, sampled: Sampled, timer: PhaseTimer) -> Signal:
        n, pad = stage.config.n_samples, engine.pad_id_of(stage.models.tokenizer)
        with timer("teacher_logp"):
            teacher_prompts = [e.teacher_prompts for e in sampled.examples for _ in range(n)]
            logp = teacher_logprobs(
                stage.accelerator, self.teacher, pad, teacher_prompts, sampled.students,
                self.contexts,
            )  # fmt: skip
        return Signal(None, logp, {})
