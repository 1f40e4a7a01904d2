"""What a GAD stage holds while it runs: its models, its data and plan, and the state a
resumed run must get back (health counters, replay pool, model selection)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gad.config import load as cfg
from gad.core.tracking import MetricsLog
from gad.data import chats
from gad.methods.health import Health
from gad.models import mixture
from gad.train import engine
from gad.train.rollout import TransformersRollout


@dataclass
class Models:
    """Everything a stage trains or reads, already wrapped by accelerate."""

    generator: Any
    discriminator: Any
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


@dataclass
class Selection:
    """Held-out evaluations of the GAD stage and the best step so far (saved for resume)."""

    evals: list[dict[str, Any]] = field(default_factory=list)
    base_length: float | None = None
    best_step: int | None = None
    best_value: float | None = None


@dataclass
class Stage:
    """One stage's run: data, plan, run folder, accelerator, models, and what a resume keeps."""

    name: str
    config: cfg.GADConfig
    run_dir: Path
    accelerator: Any
    examples: list[chats.Example]
    plan: list[list[int]]
    models: Models
    start_step: int
    metrics: MetricsLog
    health: Health
    records: dict[str, chats.Record] = field(default_factory=dict)
    """The records behind `examples`, by id (their prompts and text, for re-encoding)."""
    d_teacher: list[chats.Example] = field(default_factory=list)
    """The teacher answers as the discriminator sees them, aligned with `examples`."""
    teacher_prompts: list[list[list[int]]] = field(default_factory=list)
    """`method=whitebox`: per example, the teacher's prompt ids under each of its hidden
    contexts (context + prompt), in `teacher_mixture`'s order."""
    teacher_mixture: list[mixture.Component] = field(default_factory=list)
    """`method=whitebox`: the teacher's hidden contexts and their prior weights."""
    replay: list[dict[str, Any]] = field(default_factory=list)
    """The discriminator's replay pool of past student samples (`d_replay_size`)."""
    selection: Selection = field(default_factory=Selection)
    sft_steps: int = 0
    """Warmup: the steps that train the generator (`method=offpolicy`: the first ones)."""


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


def frozen_reward(config: cfg.GADConfig) -> bool:
    """The discriminator slot holds the frozen `reward_model` (reward distillation) rather than
    a discriminator that learns; with `reward_mix_alpha` the reward model is mixed in instead."""
    return bool(config.reward_model) and config.reward_mix_alpha is None


def local_prompts(stage: Stage, step: int) -> tuple[list[int], list[chats.Example], int]:
    """This process's example indices of a step (a contiguous slice), its prompts, and the
    slice's offset in the global batch."""
    acc = stage.accelerator
    mine, offset = engine.local_slice(stage.plan[step], acc.process_index, acc.num_processes)
    return mine, [stage.examples[i] for i in mine], offset
