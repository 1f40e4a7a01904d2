"""The `gad` command line. Every stage command takes `--config run.yaml` plus one option per
config field (overriding the file). Heavy modules are imported inside the commands so that
`gad --help` stays fast and never imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import os
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import typer

from gad.config import load as cfg

# A distillation toolkit that runs offline: never let a library reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

app = typer.Typer(
    help="Black-box on-policy distillation of LLMs: GAD, SeqKD and reward distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _option_type(tp: Any) -> Any:
    """The Python type typer should parse a config field's option as (None = not given)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return _option_type(args[0])
    if origin is typing.Literal:
        return str
    if origin is tuple:
        return typing.Tuple[tuple(args)]  # noqa: UP006 (typer parses typing.Tuple)
    return tp


def _quiet_libraries(verbose: bool = False) -> None:
    """Our own progress and summaries say what happens; silence per-file load/save chatter and
    the HTTP library's line per request (`--verbose` shows them: 200,000 lines for a large
    collection would bury the progress bar)."""
    import logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("gad").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str, code: int = cfg.EXIT_USER_ERROR) -> typer.Exit:
    typer.secho(f"error: {' '.join(message.split())}", err=True, fg="red")
    return typer.Exit(code=code)


def _os_error(err: OSError) -> str:
    """One line for an environment error: the path, what the system said, and a hint."""
    what = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        what += " (the disk is full: free space or choose another output folder)"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what += " (choose a folder you can write to)"
    return f"{err.filename}: {what}" if err.filename else what


@contextlib.contextmanager
def error_boundary() -> Iterator[None]:
    """Where every command ends: a problem with the user's input or environment (UserError, or
    an OSError such as a missing path, no permission, a full disk) is one line on stderr and
    exit code 2 (or the error's own, `cfg.UserError.exit_code`); anything else is a bug in gad
    and keeps its traceback."""
    try:
        yield
    except cfg.UserError as err:
        raise _fail(str(err), err.exit_code) from err
    except OSError as err:
        raise _fail(_os_error(err)) from err
    except KeyboardInterrupt as err:
        typer.secho("interrupted", err=True, fg="red")
        raise typer.Exit(code=130) from err


COMMANDS: dict[str, type] = {}
"""Every stage command's config class, by command name (the preflight test walks them)."""


def _run_options() -> list[inspect.Parameter]:
    """The options of every stage command that are no config field."""
    config_file = typer.Option(None, "--config", help="YAML file of field: value.")
    verbose = typer.Option(
        False, "--verbose", help="Also log every HTTP request and library message."
    )
    keyword = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("config_file", keyword, default=config_file, annotation=Optional[Path]),  # noqa: UP045
        inspect.Parameter("verbose", keyword, default=verbose, annotation=bool),
    ]


def stage_command(
    name: str, config_cls: type, *, positional: str | None = None
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register `run(config)` as a command with `--config` and one option per field.

    `positional` names a field that may also be given as the command's first argument.
    """

    def register(run: Callable[[Any], None]) -> Callable[[Any], None]:
        hints = typing.get_type_hints(config_cls)
        docs = cfg.field_docs(config_cls)
        params = []
        if positional:
            params.append(
                inspect.Parameter(
                    "positional_value",
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=typer.Argument(
                        None,
                        help=docs.get(positional),
                        metavar=positional.upper(),
                        show_default=False,
                    ),
                    annotation=Optional[str],  # noqa: UP045 (typer needs a runtime type)
                )
            )
        params += _run_options()
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        for field in (fields[name] for name in cfg.field_order(config_cls)):
            tp = _option_type(hints[field.name])
            flag = "--" + field.name.replace("_", "-")
            decl = f"{flag}/--no-{flag[2:]}" if tp is bool else flag
            default = field.default if field.default is not dataclasses.MISSING else None
            help_text = docs.get(field.name, "")
            if default not in (None, ""):
                help_text += f" [default: {default}]"
            params.append(
                inspect.Parameter(
                    field.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option(None, decl, help=help_text, show_default=False),
                    annotation=Optional[tp],  # noqa: UP045
                )
            )

        def command(**kwargs: Any) -> None:
            config_file = kwargs.pop("config_file")
            verbose = kwargs.pop("verbose")
            overrides = {k: v for k, v in kwargs.items() if v is not None}
            given = overrides.pop("positional_value", None)
            if given is not None:
                overrides[positional] = given
            with error_boundary():
                config = cfg.load(config_cls, config_file, overrides)
                from gad.data import preflight

                preflight.check(config)  # every path and rule, before any model is loaded
                _quiet_libraries(verbose)
                run(config)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = run.__doc__
        app.command(name)(command)
        COMMANDS[name] = config_cls
        return run

    return register


def _exit_with(code: int) -> None:
    """End a run that went through with its outcome (README, "Exit codes")."""
    if code:
        raise typer.Exit(code=code)


@stage_command("collect", cfg.CollectConfig, positional="prompts")
def collect(config: cfg.CollectConfig) -> None:
    """Collect teacher answers to a prompt file (OpenAI-compatible API or local model)."""
    from gad.api import teacher

    summary = teacher.collect(config)
    _exit_with(cfg.outcome_code(summary.done + summary.already_done, summary.failed))


@stage_command("sft", cfg.SFTConfig, positional="data")
def sft(config: cfg.SFTConfig) -> None:
    """Supervised fine-tuning on chat records: the SeqKD baseline and GAD's generator warmup."""
    from gad.train import sft as sft_module

    sft_module.train(config)


@stage_command("train", cfg.GADConfig, positional="data")
def train(config: cfg.GADConfig) -> None:
    """GAD: warmup, then on-policy GRPO against a discriminator that keeps learning."""
    from gad.methods import stage as gad_stage

    gad_stage.train(config)


@stage_command("label", cfg.LabelConfig, positional="prompts")
def label(config: cfg.LabelConfig) -> None:
    """Reward distillation, step 1: teacher and student answers, labelled by the teacher's
    majority vote (verifiable tasks) or its 1-10 judgement (open-ended)."""
    from gad.api import label as label_module

    summary = label_module.run(config)
    _exit_with(cfg.outcome_code(summary.labelled_prompts, summary.missing_responses))


@stage_command("reward-model", cfg.RewardConfig, positional="data")
def reward_model(config: cfg.RewardConfig) -> None:
    """Reward distillation, step 2: train a scalar-head reward model on `gad label` output
    (Bradley–Terry on within-prompt pairs, or pointwise BCE)."""
    from gad.train import reward

    reward.train(config)


@stage_command("tasks", cfg.TasksConfig, positional="source")
def tasks(config: cfg.TasksConfig) -> None:
    """Verifiable prompts generated offline with a fixed seed (reasoning-gym); the ground truth
    is written to a separate file that only evaluation reads."""
    from gad.data import tasks as tasks_module

    prompts, truth = tasks_module.run(config)
    typer.echo(f"{config.size} prompts -> {prompts}; ground truth -> {truth}")


@stage_command("generate", cfg.GenerateConfig, positional="model")
def generate(config: cfg.GenerateConfig) -> None:
    """A local model (a student) answers a prompt set; resumable like `gad collect`."""
    from gad.api import teacher
    from gad.data import evalsets

    summary = teacher.collect(evalsets.generation_job(config))
    _exit_with(cfg.outcome_code(summary.done + summary.already_done, summary.failed))


@stage_command("split", cfg.SplitConfig, positional="prompts")
def split(config: cfg.SplitConfig) -> None:
    """Split a prompt file into train and held-out parts (deterministic, by prompt content)."""
    from gad.data import chats, evalsets

    records = evalsets.records_of(config.prompts, "prompts").records
    train_part, held = evalsets.split(records, config.fraction, config.seed)
    out = Path(config.output_dir)
    chats.write_records(out / "train.jsonl", train_part)
    chats.write_records(out / "held_out.jsonl", held)
    cfg.save(config, out / "split.config.yaml")
    typer.echo(
        f"{len(train_part)} train -> {out / 'train.jsonl'}, "
        f"{len(held)} held out -> {out / 'held_out.jsonl'} "
        "(pass --exclude of the held-out file to collect/sft/train)"
    )


@stage_command("eval", cfg.EvalConfig, positional="answers")
def evaluate(config: cfg.EvalConfig) -> None:
    """Judge-free metrics of a system's answers (ROUGE-L, n-gram F1, length; lab metrics)."""
    from rich.console import Console
    from rich.table import Table

    from gad.eval import run as eval_run
    from gad.eval.report import format_cell

    result = eval_run.run_eval(config)
    table = Table(title=f"{result['name']}: {result['records']} answers")
    table.add_column("metric")
    table.add_column("value [95% CI] (n = records behind it)", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, format_cell(value))
    Console().print(table)
    typer.echo(f"lengths in {result['length_unit']}")
    if config.reference:
        typer.echo(
            f"matched to the reference by id: {result['matched']}; answers without a reference: "
            f"{result['unmatched_answers']}; references without an answer: "
            f"{result['unmatched_references']}"
        )
    typer.echo(f"results: {result['output']}")


@stage_command("judge", cfg.JudgeConfig, positional="answers")
def judge(config: cfg.JudgeConfig) -> None:
    """LLM judge (API or local model): scores vs. its own reference, or pairwise A vs. B."""
    from gad.api import judge as judge_module

    summary = judge_module.judge(config)["summary"]
    _exit_with(cfg.outcome_code(summary["scored"], summary["questions"] - summary["scored"]))


@stage_command("report", cfg.ReportConfig)
def report(config: cfg.ReportConfig) -> None:
    """Markdown report with training curves and a comparison table of evaluated systems."""
    from gad.eval import report as report_module

    def paths(text: str) -> list[str]:
        return [p.strip() for p in text.split(",") if p.strip()]

    path = report_module.write_report(
        paths(config.runs), paths(config.results), config.output_dir, config.title
    )
    typer.echo(f"report: {path}")


@stage_command("toy", cfg.ToyConfig)
def toy(config: cfg.ToyConfig) -> None:
    """The paper's Figure 5 toy: SeqKD covers a two-mode teacher, GAD seeks one mode."""
    from gad.methods import toy as toy_module

    toy_module.run(config)


@stage_command("demo", cfg.DemoConfig)
def demo(config: cfg.DemoConfig) -> None:
    """The quick start: teacher answers, SeqKD and GAD, held-out comparison, report."""
    from gad import demo as demo_module

    demo_module.run(config)


@app.command("models")
def models() -> None:
    """List the built-in offline models and whether their packages are installed."""
    from gad.models import store as models_module

    with error_boundary():
        models_module.print_builtins()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
