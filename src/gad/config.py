"""Typed run configuration: one frozen dataclass per stage, loadable from YAML, overridable.

Every field carries a docstring (the string literal under it); `field_docs` reads them so the
CLI can show them as option help. Importing this module must stay cheap: `gad --help` imports
it and must not pull in torch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


class UserError(Exception):
    """A problem with the user's input or environment whose message says all there is to say:
    the CLI prints it on one line, without a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value or key is invalid; the message names the key and its source."""


@dataclass(frozen=True)
class CollectConfig:
    """`gad collect`: a teacher answers a prompt file; results are journaled exactly once."""

    prompts: str = ""
    """Chat-record file (JSONL or Parquet) whose prompts the teacher answers."""
    output: str = "runs/collect/teacher.jsonl"
    """Output JSONL of chat records (prompt + teacher answer). Also the resume journal."""
    backend: Literal["openai", "local"] = "local"
    """`openai`: any OpenAI-compatible chat-completions endpoint; `local`: a local model."""
    model: str = "qwen2.5-coder-0.5b"
    """API model name (openai backend) or built-in name / HF folder (local backend)."""
    base_url: str | None = None
    """Endpoint of the OpenAI-compatible API; None uses the client default or OPENAI_BASE_URL."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never stored)."""
    n: int = 1
    """Samples per prompt (the paper's training set uses 1; reward distillation uses several)."""
    temperature: float = 0.8
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_tokens: int = 1536
    """Maximum new tokens per answer (paper: 1536)."""
    max_prompt_tokens: int = 2048
    """Local backend: prompts longer than this (after the chat template) are reported, not run."""
    concurrency: int = 8
    """Openai backend: requests in flight at once."""
    max_retries: int = 6
    """Openai backend: retries per request on 429/5xx/timeouts/dropped connections."""
    request_timeout: float = 120.0
    """Openai backend: seconds before one request attempt is abandoned (then retried)."""
    batch_size: int = 16
    """Local backend: prompts generated together in one batch."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Local backend: weight dtype of the teacher."""
    seed: int = 0
    """Seed for local sampling (the API's sampling is not seedable in general)."""
    retry_failed: bool = True
    """On restart, retry the prompts recorded in the failures file of an earlier run."""
    skip_invalid: bool = False
    """Skip malformed input records (counted in the summary) instead of stopping."""
    limit: int | None = None
    """Only the first `limit` prompts of the file (for quick trials)."""
    exclude: str | None = None
    """Held-out chat-record file: refuse to run if any record overlaps it (by prompt or id)."""


@dataclass(frozen=True)
class SFTConfig:
    """`gad sft`: supervised fine-tuning on chat records (the SeqKD baseline, GAD's warmup)."""

    data: str = ""
    """Chat-record file (JSONL or Parquet); the last assistant turn of each record is the target."""
    model: str = "smollm2-135m"
    """Student to train: built-in name or Hugging Face folder."""
    output_dir: str = "runs/sft"
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
    batch_size: int = 4
    """Sequences per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (global batch = batch_size x grad_accum x
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
    exclude: str | None = None
    """Held-out chat-record file: refuse to run if any record overlaps it (by prompt or id)."""


C = TypeVar("C")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _check_value(key: str, value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp` where lossless (int -> float, list -> tuple), else raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(key, value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: bad value for '{key}'")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}: '{key}' must be a list of {len(args)} values")
        return tuple(_check_value(key, v, a, where) for v, a in zip(value, args, strict=True))
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-6" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:
        raise ConfigError(f"{where}: '{key}' has an unsupported type {tp}")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{where}: '{key}' must be {name}, got {type(value).__name__} {value!r}")


def build(cls: type[C], values: dict[str, Any], where: str) -> C:
    """Make a `cls` from `values`, naming `where` and the key in any error."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    checked = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in hints or key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key {str(key)!r} for {cls.__name__}{hint}")
        checked[key] = _check_value(key, value, hints[key], where)
        check_range(cls, key, checked[key], where)
    return cls(**checked)


def load(
    cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> C:
    """Defaults, then the YAML file's values, then `overrides` (the command line)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: no such config file") from err
        except IsADirectoryError as err:
            raise ConfigError(f"{path}: is a directory, not a config file") from err
        except OSError as err:
            raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from err
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                f"{err.start}); re-save it as UTF-8"
            ) from err
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
        except RecursionError as err:
            raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of field: value")
        build(cls, loaded, str(path))  # errors name the file
        values.update(loaded)
    overrides = overrides or {}
    build(cls, overrides, "command line")
    values.update(overrides)
    return build(cls, values, str(path) if path else "config")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict for YAML (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def save(config: Any, path: str | Path, notes: dict[str, str] | None = None) -> None:
    """Write the resolved config as YAML with each field's docstring as a comment above it, and
    `notes[key]` (how a value was resolved, e.g. `auto` precision) as a second comment."""
    docs = field_docs(type(config))
    notes = notes or {}
    lines = [f"# {type(config).__name__}: resolved configuration of this run"]
    for key, value in to_dict(config).items():
        if key in docs:
            lines.append(f"# {docs[key]}")
        if key in notes:
            lines.append(f"# resolved: {notes[key]}")
        lines.append(yaml.safe_dump({key: value}, sort_keys=False, width=1000).rstrip())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class DemoConfig:
    """`gad demo`: the quick start. A local teacher answers bundled prompts; the student is
    trained with SeqKD and with GAD on the same answers; the untouched student and both trained
    students answer held-out prompts and are compared; a report is written.

    Sizes are chosen so the whole run fits in 20 minutes on a 2-core CPU: a smoke test of the
    pipeline, not a result (the report says so)."""

    output_dir: str = "runs/demo"
    """Folder for every stage's output and the report."""
    teacher: str = "qwen2.5-coder-0.5b"
    """Local teacher model (built-in name or HF folder)."""
    student: str = "smollm2-135m"
    """Student model (built-in name or HF folder)."""
    prompts: str = ""
    """Prompt file; empty uses the 40 prompts bundled with gad (written for it, CC0)."""
    num_train: int = 24
    """Prompts (the first of the file) whose teacher answers both methods train on."""
    num_held_out: int = 8
    """The prompts after those, held out: every system answers them for the comparison."""
    max_tokens: int = 96
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

    data: str = ""
    """Teacher chat records (prompt + teacher answer), e.g. the output of `gad collect`."""
    model: str = "smollm2-135m"
    """Student (generator) to start from: built-in name or HF folder."""
    discriminator: str | None = None
    """Causal-LM folder/name the discriminator starts from; None = the student's own weights.
    It may have its own tokenizer: both sides reach it as text, re-encoded with its tokenizer."""
    reward_model: str | None = None
    """A trained scalar-head model used as a frozen reward in place of the discriminator (no D
    warmup, no D updates): the reward-distillation mode."""
    reward_mix_alpha: float | None = None
    """Combined reward α·D + (1-α)·R: D the online discriminator (still trained), R the frozen
    `reward_model`, each z-scored within its prompt's group first. None = no mixing."""
    output_dir: str = "runs/gad"
    """Run folder; the stages write `warmup/` and `gad/` inside it."""
    stage: Literal["warmup", "gad", "all"] = "all"
    """Which stage to run; `gad` starts from `warmup/final` when it exists."""
    method: Literal["gad", "offpolicy", "reward-distill", "whitebox"] = "gad"
    """`gad`: the discriminator learns online. `offpolicy` (paper Fig. 6): SeqKD warmup, then
    the discriminator trains on the frozen student's samples, then RL against it frozen.
    `reward-distill` (SPEC §4): `data` is `gad label` output; SFT on the teacher responses
    labelled good, then RL against the frozen `reward_model`. `whitebox` (not black-box: the
    ceiling a black-box method is measured against): SFT warmup, then on-policy distillation
    with the local `teacher_model`'s exact log-probs as per-token reward, no discriminator."""
    warmup_epochs: float = 1.0
    """Warmup length in passes over the data (paper: 1)."""
    warmup_generator: bool = True
    """Warmup trains the generator with SFT (ablation: off)."""
    warmup_discriminator: bool = True
    """Warmup trains the discriminator (ablation: off)."""
    warmup_d_only_steps: int = 10
    """The first warmup steps train only the discriminator (paper: 10)."""
    offpolicy_d_epochs: float = 2.0
    """`offpolicy`: discriminator epochs on the frozen post-SFT student's samples (paper: 2)."""
    epochs: float = 2.0
    """GAD-stage length in passes over the prompts (paper: 2)."""
    max_steps: int | None = None
    """Stop the GAD stage after this many steps."""
    batch_prompts: int = 256
    """Prompts per step, over all processes (paper: 256; one policy update per step)."""
    n_samples: int = 8
    """Student samples per prompt, the GRPO group (paper: 8)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass on one process (memory knob only)."""
    rollout_batch_size: int = 64
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
    keep_checkpoints: int = 2
    """Most recent checkpoints kept per stage (0 keeps all)."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Tracker beside the JSONL metrics file."""
    resume: bool = False
    """Continue each stage from its latest checkpoint."""
    skip_invalid: bool = False
    """Skip malformed records (counted) instead of stopping."""
    exclude: str | None = None
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
    teacher_model: str | None = None
    """A local teacher sharing the student's tokenizer (built-in name or folder): the reward of
    `method=whitebox`, and the exact reverse KL of the held-out evaluation."""
    teacher_context: str | None = None
    """JSON file of chat messages the local teacher sees before every prompt and the student
    never does (a hidden system prompt, demonstrations): context distillation."""
    eval_every: int = 0
    """GAD stage: evaluate on `eval_data` every this many steps (and at step 0) and keep the
    best step's model in `gad/best/` (`gad/selection.json` says which and why). 0 = off."""
    eval_data: str | None = None
    """Held-out teacher chat records for `eval_every` (prompts not in `data`)."""
    eval_length_range: float = 1.5
    """Model selection only considers steps whose held-out mean length stays within this
    factor of the post-warmup length (either way): the paper's guard against length hacking."""


@dataclass(frozen=True)
class GenerateConfig:
    """`gad generate`: a local model (a student) answers a prompt set, resumably."""

    model: str = "smollm2-135m"
    """Model that answers: built-in name, HF folder, or a run's checkpoint/final folder."""
    prompts: str = "mt-bench"
    """Built-in set (`mt-bench`, `self-instruct`) or a chat-record file."""
    output: str = "runs/generate/answers.jsonl"
    """Output JSONL of chat records with finish reason and token count in `meta`; the journal."""
    n: int = 1
    """Samples per prompt."""
    temperature: float = 0.8
    """Sampling temperature (paper evaluation: 0.8)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_tokens: int = 1536
    """Maximum new tokens per answer (paper evaluation: 1536)."""
    max_prompt_tokens: int = 2048
    """Prompts longer than this (after the chat template) are reported, not run."""
    batch_size: int = 16
    """Prompts generated together in one batch."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype."""
    seed: int = 0
    """Sampling seed."""
    limit: int | None = None
    """Only the first `limit` prompts of the set."""


@dataclass(frozen=True)
class SplitConfig:
    """`gad split`: a deterministic held-out split of a prompt file (by prompt content)."""

    prompts: str = ""
    """Chat-record file to split."""
    output_dir: str = "data"
    """Folder for `train.jsonl` and `held_out.jsonl`."""
    fraction: float = 0.1
    """Share of prompts held out for evaluation."""
    seed: int = 0
    """Seed of the split (the same seed always gives the same split)."""


@dataclass(frozen=True)
class ReportConfig:
    """`gad report`: Markdown report and PNG plots from runs and evaluation results."""

    runs: str = ""
    """Comma-separated run folders (SFT runs, or GAD runs with warmup/ and gad/ inside)."""
    results: str = ""
    """Comma-separated result files of `gad eval` / `gad judge` (one JSON per system)."""
    output_dir: str = "runs/report"
    """Folder for report.md and its PNGs."""
    title: str = "gad report"
    """Heading of the report."""


@dataclass(frozen=True)
class ToyConfig:
    """`gad toy`: the paper's Figure 5 toy, SeqKD (mode covering) vs GAD (mode seeking)."""

    output_dir: str = "runs/toy"
    """Folder for the figure (toy.png) and the numbers (toy.json)."""
    num_categories: int = 10
    """Number of categories 0..K-1 of the discrete distributions."""
    teacher_modes: str = "2,7"
    """Comma-separated centres of the teacher's Gaussian modes (two: with three modes on 10
    categories even exact reverse-KL descent ends near uniform, see docs/benchmarks.md)."""
    teacher_weights: str = "0.5,0.5"
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
class EvalConfig:
    """`gad eval`: judge-free (and, with local models, lab) metrics of one system's answers."""

    answers: str = ""
    """The system's answers: chat records from `gad generate` or `gad collect`."""
    name: str = ""
    """System name in the results and the report (default: the answers file's stem)."""
    reference: str | None = None
    """Teacher answers to the same prompts (chat records) for ROUGE-L and n-gram F1."""
    teacher_model: str | None = None
    """Local teacher (built-in name or folder): its mean per-token log-likelihood of the answers."""
    student_model: str | None = None
    """The model that wrote the answers; with `teacher_model`, a reverse-KL(student||teacher)
    estimate from these samples (unbiased only for samples at temperature 1)."""
    output: str | None = None
    """Result JSON (default: `<answers>.eval.json`)."""
    metric: Literal["text", "accuracy"] = "text"
    """`text`: the metrics above; `accuracy`: also the share of answers whose extracted final
    answer equals the ground truth (needs `ground_truth`)."""
    ground_truth: str | None = None
    """Accuracy: truth file of `{"id", "answer"}` lines (`gad tasks` writes one)."""
    extractor: Literal["number", "choice", "boxed"] = "number"
    """Accuracy: how the final answer is read, as in `gad label`."""
    bootstrap_reps: int = 1000
    """Bootstrap resamples for the 95% confidence intervals."""
    seed: int = 0
    """Bootstrap seed."""


@dataclass(frozen=True)
class JudgeConfig:
    """`gad judge`: an LLM judge rates answers against its own reference, or two systems."""

    answers: str = ""
    """Chat-record file of the candidate's answers (`gad generate` / `gad collect` output)."""
    baseline: str | None = None
    """Pairwise mode: chat-record file of a second system (B) compared with `answers` (A)."""
    questions: str | None = None
    """Optional chat-record file fixing which prompt ids are judged (default: all answered)."""
    output: str = "runs/judge/results.json"
    """Results JSON: per-question scores, verdict texts and status, and the summary."""
    cache_dir: str = "runs/judge/cache"
    """Folder of the judgement cache (`judge_cache.jsonl`); shared by runs, safe to keep."""
    backend: Literal["openai", "local"] = "openai"
    """`openai`: any OpenAI-compatible chat-completions endpoint; `local`: a local model."""
    model: str = "gpt-4o"
    """Judge: API model name (openai backend) or built-in name / HF folder (local backend)."""
    base_url: str | None = None
    """Endpoint of the OpenAI-compatible API; None uses the client default or OPENAI_BASE_URL."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never stored)."""
    temperature: float = 0.0
    """Judge sampling temperature (0 = greedy for the local backend)."""
    max_tokens: int = 1536
    """Maximum tokens of the judge's reference answer."""
    verdict_max_tokens: int = 512
    """Maximum tokens of a verdict (two scores and a short explanation)."""
    attempts: int = 3
    """Requests per verdict, in all, before an unparsable verdict is recorded as failed."""
    retry_failed: bool = False
    """Ask again the verdicts cached as failed (unparsable) by an earlier run."""
    concurrency: int = 8
    """Openai backend: requests in flight at once."""
    max_retries: int = 6
    """Openai backend: the client's retries per request on 429/5xx/timeouts/dropped connections."""
    request_timeout: float = 120.0
    """Openai backend: seconds before one request attempt is abandoned (then retried)."""
    batch_size: int = 8
    """Local backend: prompts generated together in one batch."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Local backend: weight dtype of the judge."""
    max_prompt_tokens: int = 4096
    """Local backend: judge prompts longer than this (after the chat template) are errors."""
    bootstrap: int = 1000
    """Bootstrap resamples (over questions) for the confidence intervals."""
    confidence: float = 0.95
    """Confidence level of the percentile-bootstrap intervals."""
    seed: int = 0
    """Seed of the bootstrap (and of local sampling when temperature > 0)."""
    limit: int | None = None
    """Only the first `limit` questions (for quick trials)."""


@dataclass(frozen=True)
class LabelConfig:
    """`gad label`: teacher and student responses per prompt, labelled with the teacher's
    judgement (majority vote on verifiable tasks, 1-10 judge scores on open-ended ones)."""

    prompts: str = ""
    """Chat-record file of the prompts to label."""
    output_dir: str = "runs/label"
    """Folder for the collected responses, `labels.jsonl`, `set_aside.jsonl`, `summary.json`."""
    task: Literal["verifiable", "open"] = "verifiable"
    """`verifiable`: a final answer is extracted and checked against the teacher's majority vote;
    `open`: the teacher rates every response 1-10 as a judge."""
    extractor: Literal["number", "choice", "boxed"] = "number"
    """Verifiable: how the final answer is read (last number / multiple-choice letter /
    `\\boxed{}` content)."""
    min_vote_share: float = 0.5
    """Verifiable: prompts whose top answer holds less than this share of the teacher's samples
    (abstentions count) are set aside and counted."""
    good_score: float = 7.0
    """Open: judge scores at or above this mark a response as good (the SFT warmup's data)."""
    k: int = 4
    """Teacher samples per prompt (the vote), and student samples unless `student_k` is set."""
    student_k: int | None = None
    """Student samples per prompt (None = `k`; 0 = no student responses)."""
    backend: Literal["openai", "local"] = "local"
    """Teacher backend: an OpenAI-compatible API or a local model."""
    teacher: str = "qwen2.5-coder-0.5b"
    """Teacher: API model name (openai backend) or built-in name / HF folder (local backend)."""
    student: str | None = "smollm2-135m"
    """Local student whose samples are labelled too (built-in name or folder); None = none."""
    base_url: str | None = None
    """Endpoint of the OpenAI-compatible API; None uses the client default or OPENAI_BASE_URL."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never stored)."""
    judge_backend: Literal["openai", "local"] | None = None
    """Open: the judge's backend (None = the teacher's)."""
    judge_model: str | None = None
    """Open: the judge model (None = the teacher)."""
    temperature: float = 0.8
    """Teacher sampling temperature (samples must differ for a vote to mean anything)."""
    student_temperature: float = 0.8
    """Student sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold of both."""
    max_tokens: int = 1536
    """Longest response of teacher and student (and the judge's reference answer)."""
    max_prompt_tokens: int = 2048
    """Local models: prompts longer than this (after the chat template) are reported, not run."""
    concurrency: int = 8
    """Openai backend: requests in flight at once."""
    max_retries: int = 6
    """Openai backend: retries per request on 429/5xx/timeouts/dropped connections."""
    request_timeout: float = 120.0
    """Openai backend: seconds before one request attempt is abandoned (then retried)."""
    batch_size: int = 16
    """Local models: prompts generated together in one batch."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Local models: weight dtype."""
    seed: int = 0
    """Seed of local sampling."""
    ground_truth: str | None = None
    """Verifiable: truth file (`gad tasks` writes one) read after labelling, only to report the
    pseudo-labels' accuracy; never used to label."""
    limit: int | None = None
    """Only the first `limit` prompts (for quick trials)."""
    skip_invalid: bool = False
    """Skip malformed prompt records (counted) instead of stopping."""
    exclude: str | None = None
    """Held-out chat-record file: refuse to run if any prompt overlaps it (by prompt or id)."""


@dataclass(frozen=True)
class RewardConfig:
    """`gad reward-model`: a scalar-head reward model (the discriminator's architecture) trained
    on `gad label` output, teacher and student responses alike."""

    data: str = ""
    """Labelled records: the `labels.jsonl` of `gad label`."""
    model: str = "smollm2-135m"
    """Backbone the reward model starts from (built-in name or folder); use the student's
    tokenizer family, since RL scores the student's token ids."""
    output_dir: str = "runs/reward"
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
    batch_size: int = 8
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


@dataclass(frozen=True)
class TasksConfig:
    """`gad tasks`: verifiable prompt sets generated offline with a fixed seed; the ground truth
    goes to a separate file that only evaluation reads."""

    source: Literal["reasoning-gym"] = "reasoning-gym"
    """Task generator: the `reasoning-gym` package (gad's `reasoning` extra)."""
    dataset: str = "basic_arithmetic"
    """Dataset name of the generator (e.g. basic_arithmetic, chain_sum, gsm_symbolic)."""
    size: int = 200
    """Number of prompts."""
    seed: int = 0
    """Generator seed. reasoning-gym seeds item i with seed + i, so seeds closer than `size`
    share items: split one set with `gad split` for disjoint train/test prompts."""
    options: str = ""
    """The dataset's own settings as a YAML mapping, e.g. "{min_terms: 2, max_terms: 3}"."""
    instruction: str = ""
    """Text appended to every question (e.g. how to state the final answer)."""
    output: str = "data/tasks.jsonl"
    """Prompt records; the ground truth goes to `<output stem>.truth.jsonl` beside it."""


# ---------------------------------------------------------------- valid ranges


class Range:
    """The valid values of a numeric field: `low`/`high` bounds (None = unbounded), each
    inclusive unless `*_open`. Floats must also be finite. (Not a dataclass: every dataclass
    here is a config class.)"""

    def __init__(
        self,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "finite"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)
"""A probability or share."""
NUCLEUS = Range(0, 1, low_open=True)
"""top_p: 0 would keep no token."""
SEED = Range(0, 2**32 - 1)
"""numpy's seeds are unsigned 32-bit."""
BETA = Range(0, 1, high_open=True)
"""Adam's betas (1 would divide by zero in the bias correction)."""
TEMPERATURE = NON_NEGATIVE
"""Sampling temperature: 0 means greedy (local backends) and is valid for APIs."""

_API = {
    "concurrency": AT_LEAST_1,
    "max_retries": NON_NEGATIVE,
    "request_timeout": POSITIVE,
}
_SAMPLING = {
    "temperature": TEMPERATURE,
    "top_p": NUCLEUS,
    "max_tokens": AT_LEAST_1,
    "max_prompt_tokens": AT_LEAST_1,
    "batch_size": AT_LEAST_1,
    "seed": SEED,
    "limit": AT_LEAST_1,
}
_TRAINING = {
    "max_steps": AT_LEAST_1,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "max_prompt_tokens": AT_LEAST_1,
    "max_response_tokens": AT_LEAST_1,
    "seed": SEED,
    "save_every": NON_NEGATIVE,
    "keep_checkpoints": NON_NEGATIVE,
}

RANGES: dict[type, dict[str, Range]] = {
    CollectConfig: {**_API, **_SAMPLING, "n": AT_LEAST_1},
    SFTConfig: {
        **_TRAINING,
        "epochs": AT_LEAST_1,
        "warmup_steps": NON_NEGATIVE,
        "adam_betas": BETA,
        "batch_size": AT_LEAST_1,
        "grad_accum": AT_LEAST_1,
        "log_every": AT_LEAST_1,
    },
    DemoConfig: {
        "num_train": AT_LEAST_1,
        "num_held_out": AT_LEAST_1,
        "max_tokens": AT_LEAST_1,
        "sft_epochs": AT_LEAST_1,
        "lr": POSITIVE,
        "gad_lr": POSITIVE,
        "gad_steps": AT_LEAST_1,
        "n_samples": AT_LEAST_1,
        "batch_prompts": AT_LEAST_1,
        "seed": SEED,
    },
    GADConfig: {
        **_TRAINING,
        "reward_mix_alpha": UNIT,
        "warmup_epochs": NON_NEGATIVE,
        "warmup_d_only_steps": NON_NEGATIVE,
        "offpolicy_d_epochs": NON_NEGATIVE,
        "epochs": POSITIVE,
        "batch_prompts": AT_LEAST_1,
        "n_samples": AT_LEAST_1,
        "micro_batch_size": AT_LEAST_1,
        "rollout_batch_size": AT_LEAST_1,
        # Log-probs divide the logits by the temperature: greedy (0) is not an option here.
        "temperature": POSITIVE,
        "top_p": NUCLEUS,
        "d_lr": POSITIVE,
        "clip_eps": POSITIVE,
        "kl_coef": NON_NEGATIVE,
        "d_steps": AT_LEAST_1,
        "d_acc_warn": UNIT,
        "d_acc_warn_steps": AT_LEAST_1,
        "length_warn_ratio": POSITIVE,
        "max_bad_steps": AT_LEAST_1,
        "d_replay_size": NON_NEGATIVE,
        "length_penalty": NON_NEGATIVE,
        "score_clip": POSITIVE,
        "eval_every": NON_NEGATIVE,
        # A factor "either way": below 1 no length would ever be in range.
        "eval_length_range": Range(1),
    },
    GenerateConfig: {**_SAMPLING, "n": AT_LEAST_1},
    SplitConfig: {"fraction": UNIT, "seed": SEED},
    ReportConfig: {},
    ToyConfig: {
        "num_categories": Range(2),
        "teacher_std": POSITIVE,
        "student_mean": Range(),
        "student_std": POSITIVE,
        "steps": AT_LEAST_1,
        "lr": POSITIVE,
        "d_lr": POSITIVE,
        "d_steps": AT_LEAST_1,
        "n_samples": AT_LEAST_1,
        "groups": AT_LEAST_1,
        "seed": SEED,
        "num_seeds": AT_LEAST_1,
    },
    EvalConfig: {"bootstrap_reps": AT_LEAST_1, "seed": SEED},
    JudgeConfig: {
        **_API,
        **{k: v for k, v in _SAMPLING.items() if k != "top_p"},
        "verdict_max_tokens": AT_LEAST_1,
        "attempts": AT_LEAST_1,
        "max_prompt_tokens": AT_LEAST_1,
        "bootstrap": AT_LEAST_1,
        "confidence": Range(0, 1, low_open=True, high_open=True),
    },
    LabelConfig: {
        **_API,
        **_SAMPLING,
        "min_vote_share": UNIT,
        "good_score": Range(1, 10),
        "k": AT_LEAST_1,
        "student_k": NON_NEGATIVE,
        "student_temperature": TEMPERATURE,
    },
    RewardConfig: {
        **_TRAINING,
        "min_label_gap": NON_NEGATIVE,
        # All held out leaves nothing to train on.
        "held_out": Range(0, 1, high_open=True),
        "split_seed": SEED,
        "epochs": AT_LEAST_1,
        "batch_size": AT_LEAST_1,
        "micro_batch_size": AT_LEAST_1,
        "eval_every": NON_NEGATIVE,
    },
    TasksConfig: {"size": AT_LEAST_1, "seed": SEED},
}
"""Per config class, the valid range of every numeric field (`build` checks them; a test makes
sure no numeric field is missing here)."""


def check_range(cls: type, key: str, value: Any, where: str) -> None:
    """Raise a ConfigError naming `key`, `value` and the range when `value` is outside it."""
    valid = RANGES.get(cls, {}).get(key)
    if valid is None or value is None or isinstance(value, bool | str):
        return
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, int | float) and item not in valid:
            raise ConfigError(f"{where}: '{key}' must be {valid}, got {value!r}")


# ================================================================ derive
# One stage's config built from another's: `gad label` runs collect, generate and the judge,
# and the chat client takes its settings from whichever stage calls it. Kept in its own block
# (config.py may be split later).


def derive(target_cls: type[C], source: Any, **overrides: Any) -> C:
    """A `target_cls` taking every field it shares by name with the dataclass `source` from
    `source`, `overrides` winning; fields `source` lacks keep their defaults.

    A shared field is copied whatever it means in the target, so the shared fields of configs
    that feed each other agree in name, type and default, or are overridden on purpose (tests
    check both). An override that is no field of `target_cls` is an error, not ignored.
    """
    names = {f.name for f in dataclasses.fields(target_cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{target_cls.__name__} has no field(s) {', '.join(unknown)}")
    own = (f.name for f in dataclasses.fields(source))
    shared = {name: getattr(source, name) for name in own if name in names}
    return target_cls(**{**shared, **overrides})
