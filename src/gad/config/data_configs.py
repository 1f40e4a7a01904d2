"""The data and evaluation stages' settings: one frozen dataclass per stage (`gad collect`,
`gad generate`, `gad split`, `gad report`, `gad eval`, `gad judge`, `gad label`, `gad tasks`).
Loading, validation by range and saving are `config`'s; every class is importable from there
too (`cfg.CollectConfig`). Pure declarations: importing this must stay cheap (`gad --help`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from gad.config.parts import (
    ApiClient,
    ChatSettings,
    Inputs,
    LocalGeneration,
    Sampling,
    TokenLimits,
)
from gad.config.ranges import Count, NonNegativeInt, Range, Seed, Share, Temperature
from gad.config.setting_types import (
    JudgeModel,
    LocalModel,
    Model,
    OutputDir,
    OutputFile,
    PromptSet,
    ReadDirs,
    ReadFile,
    ReadFiles,
)


@dataclass(frozen=True)
class CollectConfig(ChatSettings, Sampling, Inputs):
    """`gad collect`: a teacher answers a prompt file; results are journaled exactly once."""

    prompts: ReadFile = ""
    """Chat-record file (JSONL or Parquet) whose prompts the teacher answers."""
    output: OutputFile = "runs/collect/teacher.jsonl"
    """Output JSONL of chat records (prompt + teacher answer). Also the resume journal."""
    n: Count = 1
    """Samples per prompt (the paper's training set uses 1; reward distillation uses several)."""
    retry_failed: bool = True
    """On restart, retry the prompts recorded in the failures file of an earlier run."""
    limit: Count | None = None
    """Only the first `limit` prompts of the file (for quick trials)."""


@dataclass(frozen=True)
class GenerateConfig(Sampling, TokenLimits, LocalGeneration):
    """`gad generate`: a local model (a student) answers a prompt set, resumably."""

    model: Model = "smollm2-135m"
    """Model that answers: built-in name, HF folder, or a run's checkpoint/final folder."""
    prompts: PromptSet = "mt-bench"
    """Built-in set (`mt-bench`, `self-instruct`) or a chat-record file."""
    output: OutputFile = "runs/generate/answers.jsonl"
    """Output JSONL of chat records with finish reason and token count in `meta`; the journal."""
    n: Count = 1
    """Samples per prompt."""
    limit: Count | None = None
    """Only the first `limit` prompts of the set."""


@dataclass(frozen=True)
class SplitConfig:
    """`gad split`: a deterministic held-out split of a prompt file (by prompt content)."""

    prompts: ReadFile = ""
    """Chat-record file to split."""
    output_dir: OutputDir = "data"
    """Folder for `train.jsonl` and `held_out.jsonl`."""
    fraction: Share = 0.1
    """Share of prompts held out for evaluation."""
    seed: Seed = 0
    """Seed of the split (the same seed always gives the same split)."""


@dataclass(frozen=True)
class ReportConfig:
    """`gad report`: Markdown report and PNG plots from runs and evaluation results."""

    runs: ReadDirs = ""
    """Comma-separated run folders (SFT runs, or GAD runs with warmup/ and gad/ inside)."""
    results: ReadFiles = ""
    """Comma-separated result files of `gad eval` / `gad judge` (one JSON per system)."""
    output_dir: OutputDir = "runs/report"
    """Folder for report.md and its PNGs."""
    title: str = "gad report"
    """Heading of the report."""


@dataclass(frozen=True)
class EvalConfig:
    """`gad eval`: judge-free (and, with local models, lab) metrics of one system's answers."""

    answers: ReadFile = ""
    """The system's answers: chat records from `gad generate` or `gad collect`."""
    name: str = ""
    """System name in the results and the report (default: the answers file's stem)."""
    reference: ReadFile | None = None
    """Teacher answers to the same prompts (chat records) for ROUGE-L and n-gram F1."""
    teacher_model: Model | None = None
    """Local teacher (built-in name or folder): its mean per-token log-likelihood of the answers."""
    student_model: Model | None = None
    """The model that wrote the answers; with `teacher_model`, a reverse-KL(student||teacher)
    estimate from these samples (unbiased only for samples at temperature 1)."""
    output: OutputFile | None = None
    """Result JSON (default: `<answers>.eval.json`)."""
    metric: Literal["text", "accuracy"] = "text"
    """`text`: the metrics above; `accuracy`: also the share of answers whose extracted final
    answer equals the ground truth (needs `ground_truth`)."""
    ground_truth: ReadFile | None = None
    """Accuracy: truth file of `{"id", "answer"}` lines (`gad tasks` writes one)."""
    extractor: Literal["number", "choice", "boxed"] = "number"
    """Accuracy: how the final answer is read, as in `gad label`."""
    bootstrap_reps: Count = 1000
    """Bootstrap resamples for the 95% confidence intervals."""
    seed: Seed = 0
    """Bootstrap seed."""


@dataclass(frozen=True)
class JudgeConfig(ChatSettings):
    """`gad judge`: an LLM judge rates answers against its own reference, or two systems."""

    answers: ReadFile = ""
    """Chat-record file of the candidate's answers (`gad generate` / `gad collect` output)."""
    baseline: ReadFile | None = None
    """Pairwise mode: chat-record file of a second system (B) compared with `answers` (A)."""
    questions: ReadFile | None = None
    """Optional chat-record file fixing which prompt ids are judged (default: all answered)."""
    output: OutputFile = "runs/judge/results.json"
    """Results JSON: per-question scores, verdict texts and status, and the summary."""
    cache_dir: OutputDir = "runs/judge/cache"
    """Folder of the judgement cache (`judge_cache.jsonl`); shared by runs, safe to keep."""
    temperature: Temperature = 0.0
    """Judge sampling temperature (0 = greedy for the local backend)."""
    verdict_max_tokens: Count = 512
    """Maximum tokens of a verdict (two scores and a short explanation)."""
    attempts: Count = 3
    """Requests per verdict, in all, before an unparsable verdict is recorded as failed."""
    retry_failed: bool = False
    """Ask again the verdicts cached as failed (unparsable) by an earlier run."""
    bootstrap: Count = 1000
    """Bootstrap resamples (over questions) for the confidence intervals."""
    confidence: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.95
    """Confidence level of the percentile-bootstrap intervals."""
    limit: Count | None = None
    """Only the first `limit` questions (for quick trials)."""
    backend: Literal["openai", "local"] = "openai"
    model: LocalModel = "gpt-4o"
    generation_batch_size: Count = 8
    # A rating prompt holds a question, a reference and an answer.
    max_prompt_tokens: Count = 4096


@dataclass(frozen=True)
class LabelConfig(ApiClient, LocalGeneration, TokenLimits, Sampling, Inputs):
    """`gad label`: teacher and student responses per prompt, labelled with the teacher's
    judgement (majority vote on verifiable tasks, 1-10 judge scores on open-ended ones)."""

    prompts: ReadFile = ""
    """Chat-record file of the prompts to label."""
    output_dir: OutputDir = "runs/label"
    """Folder for the collected responses, `labels.jsonl`, `set_aside.jsonl`, `summary.json`."""
    task: Literal["verifiable", "open"] = "verifiable"
    """`verifiable`: a final answer is extracted and checked against the teacher's majority vote;
    `open`: the teacher rates every response 1-10 as a judge."""
    extractor: Literal["number", "choice", "boxed"] = "number"
    """Verifiable: how the final answer is read (last number / multiple-choice letter /
    `\\boxed{}` content)."""
    min_vote_share: Share = 0.5
    """Verifiable: prompts whose top answer holds less than this share of the teacher's samples
    (abstentions count) are set aside and counted."""
    good_score: Annotated[float, Range(1, 10)] = 7.0
    """Open: judge scores at or above this mark a response as good (the SFT warmup's data)."""
    k: Count = 4
    """Teacher samples per prompt (the vote), and student samples unless `student_k` is set."""
    student_k: NonNegativeInt | None = None
    """Student samples per prompt (None = `k`; 0 = no student responses)."""
    backend: Literal["openai", "local"] = "local"
    """Teacher backend: an OpenAI-compatible API or a local model."""
    teacher: LocalModel = "qwen2.5-coder-0.5b"
    """Teacher: API model name (openai backend) or built-in name / HF folder (local backend)."""
    student: Model | None = "smollm2-135m"
    """Local student whose samples are labelled too (built-in name or folder); None = none."""
    judge_backend: Literal["openai", "local"] | None = None
    """Open: the judge's backend (None = the teacher's)."""
    judge_model: JudgeModel | None = None
    """Open: the judge model (None = the teacher)."""
    student_temperature: Temperature = 0.8
    """Student sampling temperature."""
    ground_truth: ReadFile | None = None
    """Verifiable: truth file (`gad tasks` writes one) read after labelling, only to report the
    pseudo-labels' accuracy; never used to label."""
    limit: Count | None = None
    """Only the first `limit` prompts (for quick trials)."""


@dataclass(frozen=True)
class TasksConfig:
    """`gad tasks`: verifiable prompt sets generated offline with a fixed seed; the ground truth
    goes to a separate file that only evaluation reads."""

    source: Literal["reasoning-gym"] = "reasoning-gym"
    """Task generator: the `reasoning-gym` package (gad's `reasoning` extra)."""
    dataset: str = "basic_arithmetic"
    """Dataset name of the generator (e.g. basic_arithmetic, chain_sum, gsm_symbolic)."""
    size: Count = 200
    """Number of prompts."""
    seed: Seed = 0
    """Generator seed. reasoning-gym seeds item i with seed + i, so seeds closer than `size`
    share items: split one set with `gad split` for disjoint train/test prompts."""
    options: str = ""
    """The dataset's own settings as a YAML mapping, e.g. "{min_terms: 2, max_terms: 3}"."""
    instruction: str = ""
    """Text appended to every question (e.g. how to state the final answer)."""
    output: OutputFile = "data/tasks.jsonl"
    """Prompt records; the ground truth goes to `<output stem>.truth.jsonl` beside it."""
