"""What a GAD stage holds while it runs: its models, its data (one `TrainingExample` per
example) and plan, its reward, and the state a resumed run must get back (health counters,
replay pool, model selection)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from gad.config import load as cfg
from gad.core.tracking import MetricsLog, PhaseTimer
from gad.data import chats
from gad.methods.health import Health
from gad.methods.samples import teacher_discriminator_inputs
from gad.models import mixture
from gad.train import engine
from gad.train.rollout import Completion, TransformersRollout


@dataclass
class Models:
    """Everything a stage trains or reads, already wrapped by accelerate."""

    generator: Any
    discriminator: Any
    """The scalar-head model checkpointed as `discriminator/`: the discriminator, or with reward
    distillation the frozen reward model (`rewards.choose` says which role it plays)."""
    tokenizer: Any
    g_opt: Any
    d_opt: Any | None
    reference: Any | None = None
    rollout: TransformersRollout | None = None
    reward_model: Any | None = None
    """The frozen reward model R of the combined reward (`reward_mix_alpha`), else None."""
    d_tokenizer: Any | None = None
    """The discriminator's own tokenizer (it may differ from the student's)."""
    rm_tokenizer: Any | None = None
    """The reward model's tokenizer (combined reward)."""
    teacher: Any | None = None
    """`method=whitebox`: the frozen local teacher whose log-probs are the reward."""
    teacher_contexts: list[mixture.Component] = field(default_factory=list)
    """`method=whitebox`: the teacher's hidden contexts and their prior weights."""


@dataclass
class Selection:
    """Held-out evaluations of the GAD stage and the best step so far (saved for resume)."""

    evals: list[dict[str, Any]] = field(default_factory=list)
    base_length: float | None = None
    best_step: int | None = None
    best_value: float | None = None


@dataclass(frozen=True)
class TrainingExample:
    """One training example, with what each consumer of a step needs."""

    policy: chats.Example
    """Prompt + teacher answer in the student's ids: the SFT target; its prompt starts rollouts."""
    record: chats.Record
    """The chat record behind it (its prompt re-encodes the student's samples)."""
    d_teacher: chats.Example | None = None
    """The teacher answer as the discriminator sees it (None without a discriminator)."""
    teacher_prompts: tuple[list[int], ...] = ()
    """`method=whitebox`: the teacher's prompt ids under each of its hidden contexts (context +
    prompt), in `Models.teacher_contexts`' order."""

    @property
    def teacher_answer(self) -> chats.Example:
        """The teacher answer as the stage's scorer reads it (the policy's ids without one)."""
        return self.d_teacher if self.d_teacher is not None else self.policy


def training_examples(prepared: Any, m: Models, config: cfg.GADConfig) -> list[TrainingExample]:
    """`prepared`'s examples in order, each with the discriminator's view of its teacher answer
    (with a discriminator) and the white-box teacher's prompts (with a teacher)."""
    records = [prepared.records[e.id] for e in prepared.examples]
    d_teacher: list[chats.Example | None] = [None] * len(records)
    if m.discriminator is not None:
        d_teacher = teacher_discriminator_inputs(  # type: ignore[assignment]
            m.d_tokenizer, records, config.max_response_tokens
        )
    return [
        TrainingExample(
            example,
            record,
            d,
            tuple(
                chats.encode_prompt(m.tokenizer, c.messages + record.prompt)
                for c in m.teacher_contexts
            ),
        )
        for example, record, d in zip(prepared.examples, records, d_teacher, strict=True)
    ]


@dataclass
class Stage:
    """One stage's run: data, plan, run folder, accelerator, models, and what a resume keeps."""

    name: str
    config: cfg.GADConfig
    run_dir: Path
    accelerator: Any
    examples: list[TrainingExample]
    plan: list[list[int]]
    models: Models
    start_step: int
    metrics: MetricsLog
    health: Health
    reward: Reward | None = None
    """The GAD stage's reward (`rewards.choose`); None in the warmup and SODA."""
    replay: list[dict[str, Any]] = field(default_factory=list)
    """The discriminator's replay pool of past student samples (`d_replay_size`)."""
    selection: Selection = field(default_factory=Selection)
    g_steps: range = range(0)
    """Warmup: the steps that train the generator (`warmup_generator` aside)."""
    d_steps: range = range(0)
    """Warmup: the steps that train the discriminator (`warmup_discriminator` aside)."""


@dataclass(frozen=True)
class Sampled:
    """A GAD step's samples on this process, prompt-major (prompt p's N samples adjacent)."""

    indices: list[int]
    """The step's examples, as indices into `Stage.examples` (the replay pool keeps them)."""
    examples: list[TrainingExample]
    groups: list[list[Completion]]
    """N completions per example."""
    students: list[chats.Example]
    """[P*N] prompt + sampled ids, as the policy sees them."""


@dataclass(frozen=True)
class Signal:
    """What the policy update descends: group advantages, or the teacher's log-probs."""

    advantage_b: torch.Tensor | None
    """[P*N] group advantages of the shaped rewards (None for the white box)."""
    teacher_logp: list[torch.Tensor] | None
    """White box: the teacher's log-probs of each sample's tokens, [L_i] each (else None)."""
    row: dict[str, float]
    """The reward's stats for the step's metrics."""


class Reward(Protocol):
    """The reward of the GAD stage, chosen once at setup (`rewards.choose`)."""

    show: tuple[str, ...]
    """The stats the progress bar shows."""

    def score(self, stage: Stage, step: int, sampled: Sampled, timer: PhaseTimer) -> Signal:
        """The step's signal for the policy update (a reward that learns, learns here too)."""
        ...


@dataclass(frozen=True)
class StageInit:
    """Where a stage's models come from (a resumed stage reads its latest checkpoint instead)."""

    generator: str
    """The generator's folder or built-in name."""
    discriminator: str | None = None
    """Build a fresh discriminator (scalar head) on this model."""
    discriminator_folder: str | None = None
    """Load a trained discriminator or reward model from this folder."""
    d_trainable: bool = True
    """The discriminator learns (False: a frozen scorer)."""
    reference: str | None = None
    """The frozen reference policy of the KL term."""
    optimizers: Path | None = None
    """The warmup's optimizer states, continued unless `reset_optimizers`."""
    generator_adapter: Path | None = None
    """LoRA: the generator's adapter to continue (the warmup's), on the base `config.model`."""
    discriminator_adapter: Path | None = None
    """LoRA: the discriminator's adapter and head to continue (the warmup's)."""
    reward_model: str | None = None
    """The frozen reward model mixed into the discriminator's reward (`reward_mix_alpha`)."""
    teacher: bool = False
    """Load the white-box teacher (`teacher_model`, under its `teacher_context`)."""


def local_examples(stage: Stage, step: int) -> tuple[list[int], list[TrainingExample], int]:
    """This process's example indices of a step (a contiguous slice), its examples, and the
    slice's offset in the global batch."""
    acc = stage.accelerator
    mine, offset = engine.local_slice(stage.plan[step], acc.process_index, acc.num_processes)
    return mine, [stage.examples[i] for i in mine], offset
