"""The training stages' settings: one frozen dataclass per stage (`gad sft`, `gad train`,
`gad reward-model`, `gad demo`, `gad toy`). Loading, validation by range and saving are
`config`'s; every class is importable from there too (`cfg.GADConfig`). Pure declarations:
importing this must stay cheap (`gad --help`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from gad.config.parts import (
    Checkpoints,
    Engine,
    Inputs,
    LoRA,
    Optimiser,
    Precision,
    TokenLimits,
)
from gad.config.ranges import (
    FINITE,
    Count,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    Range,
    Seed,
    Share,
    ShareBelow1,
    TopP,
)
from gad.config.setting_types import Model, Names, OutputDir, ReadFile, ReadFileOrBundled


@dataclass(frozen=True)
class SFTConfig(Optimiser, TokenLimits, Precision, Checkpoints, Inputs, LoRA):
    """`gad sft`: supervised fine-tuning on chat records (the SeqKD baseline, GAD's warmup)."""

    data: ReadFile = ""
    """Chat-record file (JSONL or Parquet); the last assistant turn of each record is the target."""
    model: Model = "smollm2-135m"
    """Student to train: built-in name or Hugging Face folder."""
    output_dir: OutputDir = "runs/sft"
    """Run folder: config, metrics, checkpoints, and the final model in `final/`."""
    epochs: Count = 3
    """Passes over the data (paper SeqKD: 3)."""
    max_steps: Count | None = None
    """Stop after this many optimizer steps (the data order still follows `epochs`)."""
    warmup_steps: NonNegativeInt = 0
    """Linear lr warmup steps, then constant."""
    micro_batch_size: Count = 4
    """Sequences per micro-batch on each process."""
    grad_accum: Count = 1
    """Micro-batches accumulated per optimizer step (global batch = micro_batch_size x grad_accum x
    processes)."""
    seed: Seed = 0
    """Seed for data order and initialisation."""
    log_every: Count = 1
    """Log metrics every this many optimizer steps."""


@dataclass(frozen=True)
class DemoConfig(Precision):
    """`gad demo`: the quick start. A local teacher answers bundled prompts; the student is
    trained with SeqKD and with GAD on the same answers; the untouched student and both trained
    students answer held-out prompts and are compared; a report is written.

    Sizes are chosen so the whole run fits in 20 minutes on a 2-core CPU: a smoke test of the
    pipeline, not a result (the report says so)."""

    output_dir: OutputDir = "runs/demo"
    """Folder for every stage's output and the report."""
    teacher: Model = "qwen2.5-coder-0.5b"
    """Local teacher model (built-in name or HF folder)."""
    student: Model = "smollm2-135m"
    """Student model (built-in name or HF folder)."""
    prompts: ReadFileOrBundled = ""
    """Prompt file; empty uses the 40 prompts bundled with gad (written for it, CC0)."""
    num_train: Count = 24
    """Prompts (the first of the file) whose teacher answers both methods train on."""
    num_held_out: Count = 8
    """The prompts after those, held out: every system answers them for the comparison."""
    max_response_tokens: Count = 96
    """Longest answer in tokens: teacher answers, student rollouts and evaluation answers."""
    sft_epochs: Count = 2
    """SeqKD epochs over the teacher's answers."""
    lr: PositiveFloat = 5e-5
    """SeqKD and GAD-warmup learning rate (above the paper's 5e-6: the demo takes few steps)."""
    gad_lr: PositiveFloat = 1e-5
    """GAD-stage generator and discriminator learning rate."""
    gad_steps: Count = 6
    """GRPO steps of the GAD stage (after a one-epoch warmup)."""
    n_samples: Count = 4
    """GAD: student samples per prompt (the GRPO group; paper: 8)."""
    batch_prompts: Count = 4
    """Prompts per step of SeqKD and of both GAD stages."""
    seed: Seed = 0
    """Seed of training and of the evaluation samples."""
    tiny: bool = False
    """Use tiny random-init models instead (a smoke test of the pipeline in about a minute)."""


@dataclass(frozen=True)
class GADConfig(Optimiser, TokenLimits, Precision, Checkpoints, Inputs, LoRA, Engine):
    """`gad train`: GAD warmup (generator SFT + discriminator) then the adversarial GRPO stage.

    Defaults are the paper's (SPEC §3); the CPU-sized runs of the demo override the sizes.
    """

    data: ReadFile = ""
    """Teacher chat records (prompt + teacher answer), e.g. the output of `gad collect`."""
    model: Model = "smollm2-135m"
    """Student (generator) to start from: built-in name or HF folder."""
    discriminator: Model | None = None
    """Causal-LM folder/name the discriminator starts from; None = the student's own weights.
    It may have its own tokenizer: both sides reach it as text, re-encoded with its tokenizer."""
    reward_model: Model | None = None
    """A trained scalar-head model used as a frozen reward in place of the discriminator (no D
    warmup, no D updates): the reward-distillation mode."""
    reward_mix_alpha: Share | None = None
    """Combined reward α·D + (1-α)·R: D the online discriminator (still trained), R the frozen
    `reward_model`, each z-scored within its prompt's group first. None = no mixing."""
    output_dir: OutputDir = "runs/gad"
    """Run folder; the stages write `warmup/` and `gad/` inside it."""
    stage: Literal["warmup", "gad", "all"] = "all"
    """Which stage to run; `gad` starts from `warmup/final` when it exists."""
    method: Literal["gad", "offpolicy", "reward-distill", "whitebox", "soda"] = "gad"
    """`gad`: the discriminator learns online. `offpolicy` (paper Fig. 6): SeqKD warmup, then
    the discriminator trains on the frozen student's samples, then RL against it frozen.
    `reward-distill` (SPEC §4): `data` is `gad label` output; SFT on the teacher responses
    labelled good, then RL against the frozen `reward_model`. `whitebox` (not black-box: the
    ceiling a black-box method is measured against): SFT warmup, then on-policy distillation
    with the local `teacher_model`'s exact log-probs as per-token reward, no discriminator.
    `soda` (SPEC §5): one snapshot of the starting `model`'s answers, then DPO with the teacher's
    answer as chosen and the snapshot answer as rejected; no warmup, rollouts or discriminator."""
    warmup_epochs: NonNegativeFloat = 1.0
    """Warmup length in passes over the data (paper: 1); `warmup_max_steps` bounds it."""
    warmup_generator: bool = True
    """Warmup trains the generator with SFT (ablation: off)."""
    warmup_discriminator: bool = True
    """Warmup trains the discriminator (ablation: off)."""
    warmup_d_only_steps: NonNegativeInt = 10
    """The first warmup steps train only the discriminator (paper: 10)."""
    offpolicy_d_epochs: NonNegativeFloat = 2.0
    """`offpolicy`: discriminator epochs on the frozen post-SFT student's samples (paper: 2)."""
    soda_beta: PositiveFloat = 0.1
    """`soda`: DPO's β, the scale of the implicit reward β·log(π/π_ref) (the DPO paper's and
    TRL's usual 0.1); higher keeps the student nearer its starting model."""
    epochs: PositiveFloat = 2.0
    """GAD-stage length in passes over the prompts (paper: 2); `max_steps` bounds it."""
    max_steps: Count | None = None
    """Stop the GAD stage (not the warmup: see `warmup_max_steps`) after this many steps."""
    warmup_max_steps: Count | None = None
    """Stop the warmup stage after this many steps (None: `warmup_epochs` of the data)."""
    batch_prompts: Count = 256
    """Prompts per step, over all processes (paper: 256; one policy update per step)."""
    n_samples: Count = 8
    """Student samples per prompt, the GRPO group (paper: 8)."""
    micro_batch_size: Count = 8
    """Sequences per forward/backward pass on one process (memory knob only)."""
    generation_batch_size: Count = 64
    """Sequences generated together on one process."""
    per_prompt_seeds: bool = False
    """Seed every prompt's samples from (seed, step, prompt) so they do not depend on batching or
    process count (slower: one generate call per prompt). Used by the multi-process test."""
    # Log-probs divide the logits by the temperature: greedy (0) is not an option here.
    temperature: PositiveFloat = 0.8
    """Sampling temperature of the rollouts; log-probs use the same temperature (as verl)."""
    top_p: TopP = 1.0
    """Nucleus threshold of the rollouts."""
    d_lr: PositiveFloat = 1e-6
    """Discriminator learning rate (paper: 1e-6)."""
    clip_eps: PositiveFloat = 0.2
    """PPO ratio clip ε."""
    kl_coef: NonNegativeFloat = 0.001
    """β of the k3 KL penalty to the frozen post-warmup student (paper: 0.001); 0 skips the
    reference model entirely."""
    d_loss: Literal["bt", "ce"] = "bt"
    """Discriminator loss: Bradley–Terry (Eq. 3) or the cross-entropy ablation (Eq. 4)."""
    d_steps: Count = 1
    """Discriminator updates per GAD step (paper: 1)."""
    d_update_every: Count = 1
    """The discriminator updates on every k-th GAD step only and just scores on the others
    (paper: 1): k generator steps per discriminator step keep a fast discriminator from
    running away from the student."""
    seed: Seed = 0
    """Seed for data order, sampling and the discriminator head."""
    save_final: bool = True
    """Write each stage's `final/` model folders; off only where nothing reads them (speed
    benchmarks, which time the steps alone)."""
    d_acc_warn: Share = 0.95
    """Warn when discriminator accuracy stays above this for `d_acc_warn_steps` steps."""
    d_acc_warn_steps: Count = 20
    """Window of the discriminator-accuracy warning."""
    length_warn_ratio: PositiveFloat = 2.0
    """Warn when mean response length exceeds this multiple of its post-warmup value."""
    max_bad_steps: Count = 3
    """Consecutive non-finite steps (skipped) after which the run stops with a checkpoint."""
    reset_optimizers: bool = False
    """Start the GAD stage's AdamW states afresh instead of continuing the warmup's (the
    reference continues them; a fresh Adam moves every weight by about ±lr at first)."""
    d_replay_size: NonNegativeInt = 0
    """Replay pool (Persistent Negatives, SPEC §5): the discriminator's update also sees pairs
    of teacher answers and past student samples, drawn from a pool of the last this many
    samples per process (as many as the step's own); GRPO stays on-policy. 0 = off."""
    length_penalty: NonNegativeFloat = 0.0
    """λ of the length-corrected reward `score - λ·log(1 + response tokens)` (PRISM); 0 = off."""
    score_clip: PositiveFloat | None = None
    """Clip discriminator scores to [-c, c] before they become rewards (PRISM); None = off."""
    loss_agg: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"
    """Policy-loss aggregation: per sequence then over sequences (the paper's Eq. 7), or over
    all tokens of the batch (verl's default, which the reference scripts run)."""
    teacher_model: Model | None = None
    """A local teacher sharing the student's tokenizer (built-in name or folder): the reward of
    `method=whitebox`, and the exact reverse KL of the held-out evaluation."""
    teacher_context: ReadFile | None = None
    """JSON file of chat messages the local teacher sees before every prompt and the student
    never does (a hidden system prompt, demonstrations): context distillation."""
    eval_every: NonNegativeInt = 0
    """GAD stage: evaluate on `eval_data` every this many steps (and at step 0) and keep the
    best step's model in `gad/best/` (`gad/selection.json` says which and why). 0 = off."""
    eval_data: ReadFile | None = None
    """Held-out teacher chat records for `eval_every` (prompts not in `data`)."""
    # A factor "either way": below 1 no length would ever be in range.
    eval_length_range: Annotated[float, Range(1)] = 1.5
    """Model selection only considers steps whose held-out mean length stays within this
    factor of the post-warmup length (either way): the paper's guard against length hacking."""
    single_base: bool = False
    """One frozen base in memory holds every role as a LoRA adapter: the generator, the
    discriminator (its own adapter and a scalar head) and the reference (the generator's adapter
    as it entered the GAD stage). Needs lora_rank > 0 and the discriminator on the student's
    own model."""
    # The parts' settings with GAD's own defaults: the paper's lr, the reference scripts' clip.
    lr: PositiveFloat = 1e-6
    max_grad_norm: NonNegativeFloat = 0.2


@dataclass(frozen=True)
class ToyConfig:
    """`gad toy`: the paper's Figure 5 toy, SeqKD (mode covering) vs GAD (mode seeking)."""

    output_dir: OutputDir = "runs/toy"
    """Folder for the figure (toy.png) and the numbers (toy.json)."""
    num_categories: Annotated[int, Range(2)] = 10
    """Number of categories 0..K-1 of the discrete distributions."""
    teacher_modes: Names = "2,7"
    """Comma-separated centres of the teacher's Gaussian modes (two: with three modes on 10
    categories even exact reverse-KL descent ends near uniform, see docs/benchmarks.md)."""
    teacher_weights: Names = "0.5,0.5"
    """Comma-separated mixture weights of the teacher's modes (normalised to sum to 1)."""
    teacher_std: PositiveFloat = 0.5
    """Std of every teacher mode (before discretisation)."""
    student_mean: Annotated[float, FINITE] = 3.0
    """Initial mean of the student Gaussian (between the teacher modes, as SPEC advises)."""
    student_std: PositiveFloat = 1.0
    """Initial std of the student Gaussian (moderate; from 1.5 reverse KL itself goes uniform)."""
    steps: Count = 300
    """Student updates for SeqKD, GAD and both exact-KL references."""
    lr: PositiveFloat = 0.05
    """Adam learning rate of the student (mean and log-std), for every method."""
    d_lr: PositiveFloat = 0.5
    """Adam learning rate of GAD's discriminator (one score per category)."""
    d_steps: Count = 5
    """Discriminator updates per student update in GAD (on the same batch)."""
    n_samples: Count = 8
    """N: student samples per group ("prompt"); advantages are normalised within a group."""
    groups: Count = 16
    """Groups per step, each with one teacher sample (SeqKD's batch is these teacher samples)."""
    seed: Seed = 0
    """First random seed; seeds seed .. seed + num_seeds - 1 are run."""
    num_seeds: Count = 3
    """How many seeds to run SeqKD and GAD with."""


@dataclass(frozen=True)
class RewardConfig(Optimiser, TokenLimits, Precision, Checkpoints, LoRA):
    """`gad reward-model`: a scalar-head reward model (the discriminator's architecture) trained
    on `gad label` output, teacher and student responses alike."""

    data: ReadFile = ""
    """Labelled records: the `labels.jsonl` of `gad label`."""
    model: Model = "smollm2-135m"
    """Backbone the reward model starts from (built-in name or folder); use the student's
    tokenizer family, since RL scores the student's token ids."""
    output_dir: OutputDir = "runs/reward"
    """Run folder: config, metrics, checkpoints, summary and the model in `final/`."""
    loss: Literal["bt", "bce"] = "bt"
    """`bt`: Bradley–Terry on within-prompt pairs (higher label preferred); `bce`: pointwise
    binary cross-entropy on good / not good."""
    sources: Literal["both", "teacher", "student"] = "both"
    """Whose responses to train on (the method uses both, against distribution shift)."""
    min_label_gap: NonNegativeFloat = 0.0
    """BT: a pair needs labels differing by more than this (e.g. 1 for judge scores)."""
    # All held out leaves nothing to train on.
    held_out: ShareBelow1 = 0.1
    """Share of prompts (split by prompt content) held out to measure pairwise accuracy."""
    split_seed: Seed = 0
    """Seed of the held-out split."""
    epochs: Count = 2
    """Passes over the training pairs (BT) or responses (BCE)."""
    max_steps: Count | None = None
    """Stop after this many optimizer steps."""
    global_batch_size: Count = 8
    """Per optimizer step, over all processes: prompts with all their pairs (BT), or responses
    (BCE)."""
    micro_batch_size: Count = 8
    """Sequences per forward/backward pass on one process (memory knob only; BT keeps a
    prompt's responses together, so one prompt with more responses makes a larger pass)."""
    seed: Seed = 0
    """Seed of the head's initialisation and the data order."""
    eval_every: NonNegativeInt = 0
    """Measure held-out accuracy every this many steps (0: only before and after training)."""
    # The optimiser's learning rate with the reward model's own default.
    lr: PositiveFloat = 1e-5
