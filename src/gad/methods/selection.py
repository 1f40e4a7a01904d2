"""An answer to "when has it converged?": the GAD stage's held-out evaluation and the paper's
model selection.

Every `eval_every` steps the student answers the held-out prompts (`eval_data`) once at
temperature 1 and is scored: by exact reverse KL(student || teacher) per token when the
teacher is a local model (`teacher_model`), else by the discriminator's accuracy on the
held-out teacher answers against these fresh samples. The best step whose mean length stays
within `eval_length_range` of the post-warmup length is kept in `gad/best`, and
`gad/selection.json` says which step was chosen and why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from gad.config import load as cfg
from gad.core import checkpoint
from gad.data import chats, evalsets
from gad.methods.samples import discriminator_inputs, teacher_discriminator_inputs
from gad.methods.state import Stage
from gad.models import mixture
from gad.train import engine, losses
from gad.train.rollout import Completion, Sampling

console = Console(stderr=True)


@dataclass
class HeldOut:
    """Held-out evaluation every `eval_every` steps and the paper's model selection: the best
    step whose mean length stays within `eval_length_range` of the post-warmup length."""

    stage: Stage
    records: list[chats.Record]
    prompt_ids: list[list[int]]
    save_best: Callable[[Path], None]
    """Writes the current generator (and discriminator) as HF folders into a folder."""
    teacher: Any | None = None
    teacher_prompt_ids: list[list[list[int]]] = field(default_factory=list)
    """Per record, the teacher's prompt ids under each of its hidden contexts."""
    contexts: list[mixture.Component] = field(default_factory=list)
    d_teacher: list[chats.Example] = field(default_factory=list)

    @classmethod
    def load(
        cls,
        stage: Stage,
        teacher: Any | None,
        contexts: list[mixture.Component],
        save_best: Callable[[Path], None],
    ) -> HeldOut:
        """The held-out records of `eval_data`, scored by `teacher` (a local model under its
        hidden `contexts`, a mixture when several) when given, and by the stage's
        discriminator's accuracy when it has one."""
        config, m = stage.config, stage.models
        if not config.eval_data:
            raise cfg.ConfigError(
                "eval_every needs eval_data: held-out teacher chat records (`gad split` the "
                "prompts, `gad collect` the held-out part)"
            )
        records = [
            r for r in chats.read_records(config.eval_data).records if r.response is not None
        ]
        if not records:
            raise cfg.ConfigError(f"eval_data: {config.eval_data} has no teacher answer")
        evalsets.refuse_overlap([e.record for e in stage.examples], config.eval_data, config.data)
        prompt_ids = [chats.encode_prompt(m.tokenizer, r.prompt) for r in records]
        held = cls(stage, records, prompt_ids, save_best, teacher, contexts=contexts)
        if teacher is not None:
            held.teacher_prompt_ids = [
                [chats.encode_prompt(m.tokenizer, c.messages + r.prompt) for c in contexts]
                for r in records
            ]
        if m.discriminator is not None:
            held.d_teacher = teacher_discriminator_inputs(
                m.d_tokenizer, records, config.max_response_tokens
            )
        return held

    @property
    def metric(self) -> str:
        return "eval/reverse_kl" if self.teacher is not None else "eval/d_accuracy"

    def evaluate(self, step: int) -> dict[str, float]:
        """One sample per held-out prompt at temperature 1 (own seed; the training's random
        stream is left as it was), scored; updates the selection and `best/`."""
        stage, config, m = self.stage, self.stage.config, self.stage.models
        # Every generator, CUDA's too (manual_seed reseeds them all): on a GPU the training
        # samples from CUDA's, which a CPU-only restore would leave reseeded.
        with checkpoint.streams_kept():
            torch.manual_seed(config.seed * 7_919 + step)
            groups = m.rollout.generate(  # type: ignore[union-attr]
                self.prompt_ids, 1, Sampling(1.0, 1.0, config.max_response_tokens)
            )
        samples = [g[0] for g in groups]
        row = {
            "eval/length_mean": sum(len(c.token_ids) for c in samples) / len(samples),
            "eval/finished_share": sum(c.finish_reason == "stop" for c in samples) / len(samples),
        }
        if self.teacher is not None:
            row["eval/reverse_kl"] = self._exact_reverse_kl(samples)
        if self.d_teacher:
            # Teacher answers the discriminator never trained on against fresh samples: a
            # batch accuracy near 1 beside a held-out one near 0.5 is memorising, not judging.
            prompts = [r.prompt for r in self.records]
            d_samples = discriminator_inputs(
                m.d_tokenizer, prompts, [[c] for c in samples], config.max_response_tokens
            )
            pad = engine.pad_id_of(m.d_tokenizer)
            with stage.accelerator.autocast():
                t_b = engine.scores(m.discriminator, self.d_teacher, pad, config.micro_batch_size)
                s_b = engine.scores(m.discriminator, d_samples, pad, config.micro_batch_size)
            row["eval/d_accuracy"] = (t_b > s_b).float().mean().item()
        self._select(step, row)
        return row

    @torch.no_grad()
    def _exact_reverse_kl(self, samples: list[Completion]) -> float:
        """KL(student || teacher) per sampled token, exact over the full vocabulary; a mixture
        teacher's next-token distribution is its exact posterior-weighted mixture."""
        m, acc = self.stage.models, self.stage.accelerator
        log_w = mixture.log_weights(self.contexts)
        total, tokens = 0.0, 0
        for prompt, teacher_prompts, c in zip(
            self.prompt_ids, self.teacher_prompt_ids, samples, strict=True
        ):
            rows = []
            for model, ids in [(m.generator, prompt)] + [
                (self.teacher, p) for p in teacher_prompts
            ]:
                example = chats.Example("", ids + c.token_ids, len(ids), False)
                batch = engine.on_device([example], engine.pad_id_of(m.tokenizer), acc.device)
                with acc.autocast():
                    logits_btv, _, mask_bt = engine.response_logits(model, batch)
                rows.append(logits_btv[0][mask_bt[0] != 0].float())
            teacher_tv = rows[1]
            if len(rows) > 2:
                logp_ktv = torch.log_softmax(torch.stack(rows[1:]), -1)
                tokens_t = torch.tensor(c.token_ids, device=logp_ktv.device)
                teacher_tv = mixture.next_token_logprobs(logp_ktv, tokens_t, log_w)
            ones = torch.ones(rows[0].shape[:1], device=rows[0].device)
            kl = losses.token_kl_from_logits(rows[0][None], teacher_tv[None], ones[None])
            total += float(kl)
            tokens += len(c.token_ids)
        return total / max(1, tokens)

    def _select(self, step: int, row: dict[str, float]) -> None:
        sel, config = self.stage.selection, self.stage.config
        length = row["eval/length_mean"]
        if sel.base_length is None:
            sel.base_length = length
        low = sel.base_length / config.eval_length_range
        high = sel.base_length * config.eval_length_range
        in_range = low <= length <= high
        row["eval/in_range"] = float(in_range)
        sel.evals.append({"step": step, **row})
        value = row.get(self.metric)
        if value is None or not in_range:
            return
        if sel.best_value is None or value < sel.best_value:
            sel.best_step, sel.best_value = step, value
            self.save_best(self.stage.run_dir / "best")

    def write_summary(self) -> None:
        sel, config = self.stage.selection, self.stage.config
        base = sel.base_length or 0.0
        summary = {
            "chosen_step": sel.best_step,
            "metric": self.metric,
            "value": sel.best_value,
            "length_range": [base / config.eval_length_range, base * config.eval_length_range],
            "reason": (
                f"lowest {self.metric} among the evaluations whose mean length stayed within "
                f"{config.eval_length_range}x of the post-warmup {base:.1f} tokens"
                if sel.best_step is not None
                else "no evaluation stayed within the length range"
            ),
            "model": str(self.stage.run_dir / "best") if sel.best_step is not None else None,
            "evals": sel.evals,
        }
        if self.stage.accelerator.is_main_process:
            path = self.stage.run_dir / "selection.json"
            path.write_text(json.dumps(summary, indent=2) + "\n")
            console.print(
                f"model selection: step {sel.best_step} ({self.metric} {sel.best_value}); "
                f"{summary['reason']}; {path}"
            )
