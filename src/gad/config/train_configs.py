"""The training stages' settings: one frozen dataclass per stage (`gad sft`, `gad train`,
`gad reward-model`, `gad demo`, `gad toy`). Loading, validation by range and saving are
`config`'s; every class is importable from there too (`cfg.GADConfig`). Pure declarations:
importing this must stay cheap (`gad --help`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gad.config.setting_types import Model, Names, OutputDir, ReadFile, ReadFileOrBundled


@dataclass(frozen=True)
class SFTConfig:
    """`gad sft`: supervised fine-tuning on chat records (the SeqKD baseline, GAD's warmup)."""

    data: ReadFile = ""
    """Chat-record file (JSONL or Parquet); the last assistant turn of each record is the target."""
    model: Model = "smollm2-135m"
    """Student to train: built-in name or Hugging Face folder."""
    output_dir: OutputDir = "runs/sft"
    """Run folder: config, metrics, checkpoints, and the final model in `final/`."""
    epochs: int = 3
    """Passes over the data (paper SeqKD: 3)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the data order still follows `epochs`)."""
    lr: float = 5e-6
    """Learning rate (paper SeqKD: 5e-6)."""
    warmup_steps: int = 0
    """Linear lr warmup steps, then constant."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    micro_batch_size: int = 4
    """Sequences per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (global batch = micro_batch_size x grad_accum x
    processes)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables."""
    max_prompt_tokens: int = 2048
    """Records whose templated prompt is longer are reported and left out, never cut."""
    max_response_tokens: int = 1536
    """Responses are cut to this many tokens (the cut is counted in the summary)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision (weights and optimizer state stay float32). `auto`: bf16 where the
    hardware computes it natively (a GPU from Ampere on; a CPU where a bf16 matmul measures
    faster than float32, probed once per machine), fp16 on older GPUs, else float32 (`no`)."""
    seed: int = 0
    """Seed for data order and initialisation."""
    save_every: int = 50
    """Checkpoint every this many optimizer steps (and always at the end)."""
    save_state: bool = True
    """Write the resumable state (optimizer, RNG) at the end of the run, not only the model
    folder; off saves GBs of disk and some seconds where nobody will resume (demo, benchmarks)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk (0 keeps all)."""
    log_every: int = 1
    """Log metrics every this many optimizer steps."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Tracker beside the JSONL metrics file."""
    resume: bool = False
    """Continue from the latest checkpoint in `output_dir`."""
    skip_invalid: bool = False
    """Skip malformed records (counted in the summary) instead of stopping."""
    exclude: ReadFile | None = None
    """Held-out chat-record file: refuse to run if any record overlaps it (by prompt or id)."""
    lora_rank: int = 0
    """LoRA rank: above 0 the stage trains peft LoRA adapters on a frozen base instead of every
    weight (checkpoints keep the adapters; `final/` is the merged model, the adapter in
    `final/adapter/`). 0 = full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scale α (the adapter's update is multiplied by α / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_target_modules: Names = "all-linear"
    """Modules that get an adapter: `all-linear` (every linear layer but the LM head) or
    comma-separated module names (`q_proj,v_proj`)."""


@dataclass(frozen=True)
class DemoConfig:
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
    num_train: int = 24
    """Prompts (the first of the file) whose teacher answers both methods train on."""
    num_held_out: int = 8
    """The prompts after those, held out: every system answers them for the comparison."""
    max_response_tokens: int = 96
    """Longest answer in tokens: teacher answers, student rollouts and evaluation answers."""
    sft_epochs: int = 2
    """SeqKD epochs over the teacher's answers."""
    lr: float = 5e-5
    """SeqKD and GAD-warmup learning rate (above the paper's 5e-6: the demo takes few steps)."""
    gad_lr: float = 1e-5
    """GAD-stage generator and discriminator learning rate."""
    gad_steps: int = 6
    """GRPO steps of the GAD stage (after a one-epoch warmup)."""
    n_samples: int = 4
    """GAD: student samples per prompt (the GRPO group; paper: 8)."""
    batch_prompts: int = 4
    """Prompts per step of SeqKD and of both GAD stages."""
    seed: int = 0
    """Seed of training and of the evaluation samples."""
    tiny: bool = False
    """Use tiny random-init models instead (a smoke test of the pipeline in about a minute)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision of every training and scoring stage (`auto`: bf16 only where the
    hardware computes it natively, see `gad train --help`)."""


@dataclass(frozen=True)
class GADConfig:
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
    reward_mix_alpha: float | None = None
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
    warmup_epochs: float = 1.0
    """Warmup length in passes over the data (paper: 1); `warmup_max_steps` bounds it."""
    warmup_generator: bool = True
    """Warmup trains the generator with SFT (ablation: off)."""
    warmup_discriminator: bool = True
    """Warmup trains the discriminator (ablation: off)."""
    warmup_d_only_steps: int = 10
    """The first warmup steps train only the discriminator (paper: 10)."""
    offpolicy_d_epochs: float = 2.0
    """`offpolicy`: discriminator epochs on the frozen post-SFT student's samples (paper: 2)."""
    soda_beta: float = 0.1
    """`soda`: DPO's β, the scale of the implicit reward β·log(π/π_ref) (the DPO paper's and
    TRL's usual 0.1); higher keeps the student nearer its starting model."""
    epochs: float = 2.0
    """GAD-stage length in passes over the prompts (paper: 2); `max_steps` bounds it."""
    max_steps: int | None = None
    """Stop the GAD stage (not the warmup: see `warmup_max_steps`) after this many steps."""
    warmup_max_steps: int | None = None
    """Stop the warmup stage after this many steps (None: `warmup_epochs` of the data)."""
    batch_prompts: int = 256
    """Prompts per step, over all processes (paper: 256; one policy update per step)."""
    n_samples: int = 8
    """Student samples per prompt, the GRPO group (paper: 8)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass on one process (memory knob only)."""
    generation_batch_size: int = 64
    """Sequences generated together on one process."""
    per_prompt_seeds: bool = False
    """Seed every prompt's samples from (seed, step, prompt) so they do not depend on batching or
    process count (slower: one generate call per prompt). Used by the multi-process test."""
    temperature: float = 0.8
    """Sampling temperature of the rollouts; log-probs use the same temperature (as verl)."""
    top_p: float = 1.0
    """Nucleus threshold of the rollouts."""
    max_prompt_tokens: int = 2048
    """Records with longer templated prompts are reported and left out (paper: 2048)."""
    max_response_tokens: int = 1536
    """Longest sampled response; teacher answers are cut to the same length (paper: 1536)."""
    lr: float = 1e-6
    """Generator learning rate in both stages (paper: 1e-6; 5e-6 with a Qwen2.5 teacher)."""
    d_lr: float = 1e-6
    """Discriminator learning rate (paper: 1e-6)."""
    weight_decay: float = 0.01
    """AdamW weight decay of both models."""
    max_grad_norm: float = 0.2
    """Gradient clipping by global norm, both models (reference scripts: 0.2)."""
    clip_eps: float = 0.2
    """PPO ratio clip ε."""
    kl_coef: float = 0.001
    """β of the k3 KL penalty to the frozen post-warmup student (paper: 0.001); 0 skips the
    reference model entirely."""
    d_loss: Literal["bt", "ce"] = "bt"
    """Discriminator loss: Bradley–Terry (Eq. 3) or the cross-entropy ablation (Eq. 4)."""
    d_steps: int = 1
    """Discriminator updates per GAD step (paper: 1)."""
    d_update_every: int = 1
    """The discriminator updates on every k-th GAD step only and just scores on the others
    (paper: 1): k generator steps per discriminator step keep a fast discriminator from
    running away from the student."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision (weights and optimizer state stay float32). `auto`: bf16 where the
    hardware computes it natively (a GPU from Ampere on; a CPU where a bf16 matmul measures
    faster than float32, probed once per machine), fp16 on older GPUs, else float32 (`no`)."""
    seed: int = 0
    """Seed for data order, sampling and the discriminator head."""
    save_every: int = 50
    """Checkpoint every this many steps, and at the end of each stage (paper: 50)."""
    save_state: bool = True
    """Write the resumable state (optimizer, RNG) at the end of the run, not only the model
    folder; off saves GBs of disk and some seconds where nobody will resume (demo, benchmarks)."""
    save_final: bool = True
    """Write each stage's `final/` model folders; off only where nothing reads them (speed
    benchmarks, which time the steps alone)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept per stage (0 keeps all)."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Tracker beside the JSONL metrics file."""
    resume: bool = False
    """Continue each stage from its latest checkpoint."""
    skip_invalid: bool = False
    """Skip malformed records (counted) instead of stopping."""
    exclude: ReadFile | None = None
    """Held-out chat-record file: refuse to run if any record overlaps it (by prompt or id)."""
    d_acc_warn: float = 0.95
    """Warn when discriminator accuracy stays above this for `d_acc_warn_steps` steps."""
    d_acc_warn_steps: int = 20
    """Window of the discriminator-accuracy warning."""
    length_warn_ratio: float = 2.0
    """Warn when mean response length exceeds this multiple of its post-warmup value."""
    max_bad_steps: int = 3
    """Consecutive non-finite steps (skipped) after which the run stops with a checkpoint."""
    reset_optimizers: bool = False
    """Start the GAD stage's AdamW states afresh instead of continuing the warmup's (the
    reference continues them; a fresh Adam moves every weight by about ±lr at first)."""
    d_replay_size: int = 0
    """Replay pool (Persistent Negatives, SPEC §5): the discriminator's update also sees pairs
    of teacher answers and past student samples, drawn from a pool of the last this many
    samples per process (as many as the step's own); GRPO stays on-policy. 0 = off."""
    length_penalty: float = 0.0
    """λ of the length-corrected reward `score - λ·log(1 + response tokens)` (PRISM); 0 = off."""
    score_clip: float | None = None
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
    eval_every: int = 0
    """GAD stage: evaluate on `eval_data` every this many steps (and at step 0) and keep the
    best step's model in `gad/best/` (`gad/selection.json` says which and why). 0 = off."""
    eval_data: ReadFile | None = None
    """Held-out teacher chat records for `eval_every` (prompts not in `data`)."""
    eval_length_range: float = 1.5
    """Model selection only considers steps whose held-out mean length stays within this
    factor of the post-warmup length (either way): the paper's guard against length hacking."""
    lora_rank: int = 0
    """LoRA rank: above 0 the stage trains peft LoRA adapters on a frozen base instead of every
    weight (checkpoints keep the adapters; `final/` is the merged model, the adapter in
    `final/adapter/`). 0 = full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scale α (the adapter's update is multiplied by α / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_target_modules: Names = "all-linear"
    """Modules that get an adapter: `all-linear` (every linear layer but the LM head) or
    comma-separated module names (`q_proj,v_proj`)."""
    single_base: bool = False
    """One frozen base in memory holds every role as a LoRA adapter: the generator, the
    discriminator (its own adapter and a scalar head) and the reference (the generator's adapter
    as it entered the GAD stage). Needs lora_rank > 0 and the discriminator on the student's
    own model."""


@dataclass(frozen=True)
class ToyConfig:
    """`gad toy`: the paper's Figure 5 toy, SeqKD (mode covering) vs GAD (mode seeking)."""

    output_dir: OutputDir = "runs/toy"
    """Folder for the figure (toy.png) and the numbers (toy.json)."""
    num_categories: int = 10
    """Number of categories 0..K-1 of the discrete distributions."""
    teacher_modes: Names = "2,7"
    """Comma-separated centres of the teacher's Gaussian modes (two: with three modes on 10
    categories even exact reverse-KL descent ends near uniform, see docs/benchmarks.md)."""
    teacher_weights: Names = "0.5,0.5"
    """Comma-separated mixture weights of the teacher's modes (normalised to sum to 1)."""
    teacher_std: float = 0.5
    """Std of every teacher mode (before discretisation)."""
    student_mean: float = 3.0
    """Initial mean of the student Gaussian (between the teacher modes, as SPEC advises)."""
    student_std: float = 1.0
    """Initial std of the student Gaussian (moderate; from 1.5 reverse KL itself goes uniform)."""
    steps: int = 300
    """Student updates for SeqKD, GAD and both exact-KL references."""
    lr: float = 0.05
    """Adam learning rate of the student (mean and log-std), for every method."""
    d_lr: float = 0.5
    """Adam learning rate of GAD's discriminator (one score per category)."""
    d_steps: int = 5
    """Discriminator updates per student update in GAD (on the same batch)."""
    n_samples: int = 8
    """N: student samples per group ("prompt"); advantages are normalised within a group."""
    groups: int = 16
    """Groups per step, each with one teacher sample (SeqKD's batch is these teacher samples)."""
    seed: int = 0
    """First random seed; seeds seed .. seed + num_seeds - 1 are run."""
    num_seeds: int = 3
    """How many seeds to run SeqKD and GAD with."""


@dataclass(frozen=True)
class RewardConfig:
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
    min_label_gap: float = 0.0
    """BT: a pair needs labels differing by more than this (e.g. 1 for judge scores)."""
    held_out: float = 0.1
    """Share of prompts (split by prompt content) held out to measure pairwise accuracy."""
    split_seed: int = 0
    """Seed of the held-out split."""
    epochs: int = 2
    """Passes over the training pairs (BT) or responses (BCE)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    lr: float = 1e-5
    """Learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (none on biases and norms)."""
    global_batch_size: int = 8
    """Per optimizer step, over all processes: prompts with all their pairs (BT), or responses
    (BCE)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass on one process (memory knob only; BT keeps a
    prompt's responses together, so one prompt with more responses makes a larger pass)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables."""
    max_prompt_tokens: int = 2048
    """Records whose templated prompt is longer are reported and left out, never cut."""
    max_response_tokens: int = 1536
    """Responses are cut to this many tokens (scored at their last kept token, as in RL)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision (weights and optimizer state stay float32). `auto`: bf16 where the
    hardware computes it natively (a GPU from Ampere on; a CPU where a bf16 matmul measures
    faster than float32, probed once per machine), fp16 on older GPUs, else float32 (`no`)."""
    seed: int = 0
    """Seed of the head's initialisation and the data order."""
    eval_every: int = 0
    """Measure held-out accuracy every this many steps (0: only before and after training)."""
    save_every: int = 50
    """Checkpoint every this many optimizer steps (and always at the end)."""
    save_state: bool = True
    """Write the resumable state (optimizer, RNG) at the end of the run, not only the model
    folder; off saves disk and time where nobody will resume (benchmarks)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk (0 keeps all)."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Tracker beside the JSONL metrics file."""
    resume: bool = False
    """Continue from the latest checkpoint in `output_dir`."""
    lora_rank: int = 0
    """LoRA rank: above 0 the stage trains peft LoRA adapters on a frozen base instead of every
    weight (checkpoints keep the adapters; `final/` is the merged model, the adapter in
    `final/adapter/`). 0 = full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scale α (the adapter's update is multiplied by α / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_target_modules: Names = "all-linear"
    """Modules that get an adapter: `all-linear` (every linear layer but the LM head) or
    comma-separated module names (`q_proj,v_proj`)."""
