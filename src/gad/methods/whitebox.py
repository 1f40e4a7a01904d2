"""The white-box ceiling's reward: a local teacher's exact log-probs of the student's samples.

`method=whitebox` is on-policy distillation with the teacher's own probabilities (SPEC §5):
not black-box, so not the product's main method, but the bound a black-box method is measured
against. The teacher may answer under a hidden context or a mixture of them (`mixture`).
"""

from __future__ import annotations

from typing import Any

import torch

from gad.data import chats
from gad.methods.state import Models
from gad.models import mixture
from gad.train import engine


def teacher_logprobs(
    accelerator: Any,
    m: Models,
    teacher_prompts: list[list[list[int]]],
    students: list[chats.Example],
    contexts: list[mixture.Component],
) -> list[torch.Tensor]:
    """`method=whitebox`: the frozen teacher's exact log-probs (temperature 1) of each sample's
    sampled ids, one [L_i] tensor per sample. Each of the teacher's hidden contexts reads its
    own prompt (context + prompt; `teacher_prompts[i][k]`), and a mixture of contexts combines
    them exactly (`mixture.token_logprobs`). Needs the student's tokenizer."""
    per_context = []
    pad = engine.pad_id_of(m.tokenizer)
    for k in range(len(contexts)):
        examples = [
            chats.Example(e.id, tp[k] + e.input_ids[e.prompt_len :], len(tp[k]), e.truncated)
            for tp, e in zip(teacher_prompts, students, strict=True)
        ]
        parts = engine.length_sorted_chunks(examples, 8)
        with accelerator.autocast():
            # The context is read once per call, not once per sample.
            prefix = engine.SharedPrefix(m.teacher, [tp[k] for tp in teacher_prompts])
            per_context.append(engine.logprobs(m.teacher, examples, pad, parts, 1.0, prefix))
    if len(contexts) == 1:
        return per_context[0]
    log_w = mixture.log_weights(contexts)
    return [
        mixture.token_logprobs(torch.stack(rows), log_w).float()
        for rows in zip(*per_context, strict=True)
    ]
