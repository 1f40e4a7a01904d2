"""Issue 24: every command checks every path it reads and every folder it writes, and the rules
between its settings, before the first model loads. The settings under test are found from
their declared kinds (`gad.setting_types`) over every registered command, not listed here."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import typing

import pytest
from typer.testing import CliRunner

from gad.cli import COMMANDS, app
from gad.config.setting_types import LIST, kinds

READS = ("read", "read_dir", "prompt_set", "model")
WRITES = ("write_dir", "write_file")


def path_settings(names: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(command, field, kind) of every path-valued setting of every command."""
    found = []
    for command, cls in COMMANDS.items():
        hints = typing.get_type_hints(cls, include_extras=True)
        for field in dataclasses.fields(cls):
            for kind in kinds(hints[field.name]):
                if kind is not LIST and kind.name in names:
                    found.append((command, field.name, kind.name))
    return found


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def base_args(command: str, tmp_path) -> list[str]:
    """A command line whose every required file exists (so the setting under test is what
    fails), and whose models are local (so a model setting is a path, not an API name)."""
    chat = tmp_path / "chat.jsonl"
    record = {"id": "a", "messages": [{"role": "user", "content": "q"}]}
    chat.write_text(json.dumps(record) + "\n")
    cls = COMMANDS[command]
    hints = typing.get_type_hints(cls, include_extras=True)
    args = []
    for field in dataclasses.fields(cls):
        required = [k for k in kinds(hints[field.name]) if k.name == "read" and not k.empty_ok]
        if required and field.default == "" and LIST not in kinds(hints[field.name]):
            args += [flag(field.name), str(chat)]
        if field.name in ("backend", "judge_backend"):
            args += [flag(field.name), "local"]
    return args


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Loading any model (or its tokenizer) raises: a command that gets that far failed the
    test, whatever it would have said later."""
    import transformers

    from gad.models import discriminator, store

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for owner, name in [
        (store, "load"),
        (store, "resolve"),
        (store, "load_tokenizer"),
        (discriminator, "load"),
        (discriminator, "build"),
        (transformers.AutoModelForCausalLM, "from_pretrained"),
        (transformers.AutoModelForSequenceClassification, "from_pretrained"),
        (transformers.AutoTokenizer, "from_pretrained"),
    ]:
        monkeypatch.setattr(owner, name, refuse)


def run(args: list[str]) -> tuple[int, str, float]:
    started = time.monotonic()
    result = CliRunner().invoke(app, args)
    return result.exit_code, " ".join(result.output.split()), time.monotonic() - started


def test_the_walk_finds_the_settings_of_every_kind():
    reads, writes = path_settings(READS), path_settings(WRITES)
    assert {c for c, _, _ in reads} >= {"collect", "sft", "train", "eval", "judge", "label"}
    assert ("train", "eval_data", "read") in reads and ("eval", "reference", "read") in reads
    assert ("train", "teacher_context", "read") in reads and ("report", "runs", "read_dir") in reads
    assert ("train", "reward_model", "model") in reads and (
        "label",
        "judge_model",
        "model",
    ) in reads
    assert len(reads) >= 35 and len(writes) >= 14


@pytest.mark.parametrize(("command", "field", "kind"), path_settings(READS), ids=lambda x: str(x))
def test_a_missing_input_is_named_before_any_model_loads(tmp_path, command, field, kind):
    missing = str(tmp_path / f"missing-{field}")
    code, output, seconds = run([command, *base_args(command, tmp_path), flag(field), missing])
    assert code == 2, output
    assert f"{field}: {missing}:" in output and ("no such" in output), output
    assert "Traceback" not in output and seconds < 10


@pytest.mark.parametrize(("command", "field", "kind"), path_settings(WRITES), ids=lambda x: str(x))
def test_an_output_blocked_by_a_file_is_named_before_any_model_loads(
    tmp_path, command, field, kind
):
    # CI runs as root, where permissions stop nothing: a file where a folder must go does.
    blocker = tmp_path / "blocker"
    blocker.write_text("in the way")
    target = str(blocker / ("out" if kind == "write_dir" else "out.jsonl"))
    code, output, seconds = run([command, *base_args(command, tmp_path), flag(field), target])
    assert code == 2, output
    assert f"{field}: {target}: cannot be made: {blocker} is a file" in output, output
    assert seconds < 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eval-every", "1"], "eval_every needs eval_data"),
        (["--method", "whitebox"], "method=whitebox needs teacher_model"),
        (["--method", "reward-distill"], "method=reward-distill needs reward_model"),
        (["--single-base"], "single_base needs LoRA"),
    ],
)
def test_rules_between_train_settings_fail_before_any_model_loads(tmp_path, args, message):
    code, output, _ = run(["train", *base_args("train", tmp_path), *args])
    assert code == 2 and message in output, output


def test_a_required_input_left_empty_is_named(tmp_path):
    code, output, _ = run(["eval"])
    assert code == 2 and "'answers' is required" in output, output


def test_a_typo_in_eval_data_fails_in_seconds_imports_included_without_torch(tmp_path):
    """The issue's first case, as a user runs it: no warmup first; torch is never imported."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    code = (
        "import sys\nfrom gad.cli import app\ntry:\n    app()\nfinally:\n"
        "    print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, "train", str(data), "--eval-every", "1", "--eval-data",
         str(tmp_path / "held_out.jsonl"), "--output-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=60,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert f"eval_data: {tmp_path / 'held_out.jsonl'}: no such file" in done.stderr
    assert "no torch" in done.stderr and seconds < 10, (seconds, done.stderr)
    assert not (tmp_path / "run").exists()  # nothing written either


def test_engine_settings_that_cannot_apply_fail_before_any_model(tmp_path):
    """A vLLM setting the transformers loop would ignore, or `--engine vllm` where vLLM is not
    installed, stops in the check before any work, not after the models loaded."""
    import importlib.util

    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    ignored = [
        "train",
        str(data),
        "--engine",
        "transformers",
        "--vllm-sleep",
        "--output-dir",
        str(tmp_path / "r"),
    ]
    result = CliRunner().invoke(app, ignored)
    assert result.exit_code == 2 and "vllm_sleep applies to the vllm engine only" in result.output
    assert not (tmp_path / "r").exists()
    if importlib.util.find_spec("vllm") is None:
        plain = ["train", str(data), "--engine", "vllm", "--output-dir", str(tmp_path / "r")]
        result = CliRunner().invoke(app, plain)
        assert result.exit_code == 2 and "make setup-vllm" in result.output
