import gzip
import re
import subprocess
import sys

import pytest

from gad.config import load as cfg
from gad.config.ranges import range_of


def test_yaml_then_overrides_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-5\nepochs: 2\nadam_betas: [0.8, 0.95]\nreport_to: tensorboard\n")
    loaded = cfg.load(cfg.SFTConfig, path, {"epochs": 5, "model": "my/folder"})
    assert loaded.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string; it must still be a float
    assert loaded.epochs == 5  # the command line wins over the file
    assert loaded.adam_betas == (0.8, 0.95)
    assert loaded.model == "my/folder"
    assert loaded.micro_batch_size == cfg.SFTConfig().micro_batch_size  # untouched default

    cfg.save(loaded, tmp_path / "resolved.yaml")
    assert cfg.load(cfg.SFTConfig, tmp_path / "resolved.yaml") == loaded


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-5\nlearning_rate: 3\n")
    with pytest.raises(cfg.ConfigError, match=r"run.yaml:2: unknown key 'learning_rate'"):
        cfg.load(cfg.SFTConfig, path)
    with pytest.raises(cfg.ConfigError, match=r"unknown key 'lrr'.*did you mean 'lr'"):
        cfg.load(cfg.SFTConfig, None, {"lrr": 1.0})
    # Old spellings are gone (0.x): the error names the key and its successor.
    path.write_text("batch_size: 3\n")
    with pytest.raises(
        cfg.ConfigError,
        match=r"run.yaml:1: unknown key 'batch_size' for "
        r"SFTConfig \(did you mean 'micro_batch_size'\?\)$",
    ):
        cfg.load(cfg.SFTConfig, path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", "three", r"'epochs' must be int, got str"),
        ("epochs", 1.5, r"'epochs' must be int, got float"),
        ("resume", "yes", r"'resume' must be bool"),
        (
            "mixed_precision",
            "fp8",
            r"'mixed_precision' must be one of \['auto', 'no', 'bf16', 'fp16'\]",
        ),
        ("adam_betas", [0.9], r"'adam_betas' must be a list of 2 values"),
        ("lr", "fast", r"'lr' must be float"),
    ],
)
def test_bad_type_names_key(tmp_path, key, value, message):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(cfg.SFTConfig, path)


def test_every_field_has_a_docstring():
    import dataclasses

    classes = [c for c in vars(cfg).values() if dataclasses.is_dataclass(c)]
    assert len(classes) >= 6
    for cls in classes:
        assert cls.__dataclass_params__.frozen, cls.__name__
        docs = cfg.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_configs_are_frozen():
    with pytest.raises(dataclasses_error()):
        cfg.SFTConfig().lr = 1.0  # type: ignore[misc]


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_cli_help_lists_commands_without_importing_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from gad.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(r.output)\n"
        "assert 'torch' not in sys.modules, 'gad --help imported torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for command in ("collect", "sft"):
        assert command in out.stdout


def test_cli_bad_override_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from gad.cli import app

    config = tmp_path / "run.yaml"
    config.write_text("epochs: 2\nbogus: 1\n")
    result = CliRunner().invoke(app, ["sft", "data.jsonl", "--config", str(config)])
    assert result.exit_code != 0
    assert "unknown key 'bogus'" in result.output


# ---------------------------------------------------------------- valid ranges


def _numeric_fields(cls):
    """(name, base type, is a tuple) of every int/float field, optional or not."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        tp, args = hints[f.name], typing.get_args(hints[f.name])
        is_tuple = typing.get_origin(tp) is tuple
        members = [a for a in args if a is not type(None)] if args else [tp]
        if typing.get_origin(tp) is typing.Literal:
            continue
        numeric = [a for a in members if a in (int, float)]
        if numeric:
            found.append((f.name, numeric[0], is_tuple))
    return found


def _invalid_value(valid: cfg.Range, kind: type):
    """A value of type `kind` outside `valid`, or None when every value is inside."""
    if valid.low is not None:
        return kind(valid.low) if valid.low_open else kind(valid.low) - 1
    if valid.high is not None:
        return kind(valid.high) if valid.high_open else kind(valid.high) + 1
    return float("nan") if kind is float else None


def test_every_numeric_field_declares_a_range_that_is_enforced(tmp_path):
    """A numeric field declared without a range (`ranges.py`) fails here, as does a range that
    a value outside it gets through (from YAML, named with its line, or the command line)."""
    import typing

    import yaml

    checked = 0
    for cls in cfg.CONFIGS:
        cfg.build(cls, cfg.to_dict(cls()), "defaults")  # every default is inside its range
        hints = typing.get_type_hints(cls, include_extras=True)
        for name, kind, is_tuple in _numeric_fields(cls):
            valid = range_of(hints[name])
            assert valid is not None, f"{cls.__name__}.{name}: no range declared"
            bad = _invalid_value(valid, kind)
            assert bad is not None, f"{cls.__name__}.{name}: its range {valid} excludes nothing"
            value = [bad] * len(getattr(cls(), name)) if is_tuple else bad
            message = rf"'{name}' must be {re.escape(str(valid))}, got "
            with pytest.raises(cfg.ConfigError, match="command line: " + message):
                cfg.load(cls, None, {name: value})
            path = tmp_path / f"{cls.__name__}.{name}.yaml"
            path.write_text(f"# {name} out of range\n" + yaml.safe_dump({name: value}))
            with pytest.raises(cfg.ConfigError, match=re.escape(str(path)) + ":2: " + message):
                cfg.load(cls, path)
            checked += 1
    assert checked >= 130  # 136 when written: the walk did reach every class


def test_shared_settings_are_declared_once():
    """A setting two stages share comes from one part: one docstring, one range, and only a
    stage's own default where it needs one."""
    from gad.config import parts

    for part in (parts.Optimiser, parts.LoRA, parts.Checkpoints, parts.TokenLimits):
        for cls in (cfg.SFTConfig, cfg.GADConfig, cfg.RewardConfig):
            assert issubclass(cls, part), (cls.__name__, part.__name__)
            for name, doc in cfg.field_docs(part).items():
                assert cfg.field_docs(cls)[name] == doc, (cls.__name__, name)
    assert issubclass(cfg.CollectConfig, cfg.ChatSettings)
    assert issubclass(cfg.JudgeConfig, cfg.ChatSettings)
    assert cfg.GADConfig().adam_betas == cfg.SFTConfig().adam_betas == (0.9, 0.999)
    assert (cfg.SFTConfig().lr, cfg.GADConfig().lr, cfg.RewardConfig().lr) == (5e-6, 1e-6, 1e-5)
    # The reading order: the stage's own settings, then each part's.
    assert cfg.field_order(cfg.SFTConfig)[:3] == ("data", "model", "output_dir")
    assert list(cfg.to_dict(cfg.SFTConfig())) == list(cfg.field_order(cfg.SFTConfig))


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (cfg.SFTConfig, {"micro_batch_size": 0}, r"'micro_batch_size' must be >= 1, got 0"),
        (cfg.SFTConfig, {"lr": -1e-5}, r"'lr' must be > 0, got -1e-05"),
        (cfg.GADConfig, {"temperature": 0}, r"'temperature' must be > 0, got 0.0"),
        (cfg.CollectConfig, {"top_p": 1.5}, r"'top_p' must be in \(0, 1\], got 1.5"),
        (cfg.SFTConfig, {"lr": "inf"}, r"'lr' must be > 0, got inf"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(cls, values, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(cls, None, values)


def test_unreadable_config_files_are_named(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"nope.yaml: no such config file"):
        cfg.load(cfg.SFTConfig, tmp_path / "nope.yaml")
    with pytest.raises(cfg.ConfigError, match=r"is a directory"):
        cfg.load(cfg.SFTConfig, tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model: caf\xe9\n")
    with pytest.raises(cfg.ConfigError, match=r"latin.yaml: not UTF-8 text \(byte 0xe9"):
        cfg.load(cfg.SFTConfig, latin)
    odd = tmp_path / "odd.yaml"
    odd.write_text("1: 2\n")
    with pytest.raises(cfg.ConfigError, match=r"odd.yaml:1: unknown key '1'"):
        cfg.load(cfg.SFTConfig, odd)


# ---------------------------------------------------------------- the CLI's error boundary


def gad_cli(*args, cwd=None):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gad", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def _bad_inputs(tmp_path):
    """(name, args, what the one-line message must say) of user errors of every kind."""
    good = '{"messages": [{"role": "user", "content": "hi"}]}\n'
    (tmp_path / "good.jsonl").write_text(good)
    (tmp_path / "latin1.jsonl").write_bytes(good.replace("hi", "caf\xe9").encode("latin-1"))
    (tmp_path / "gz.jsonl").write_bytes(gzip.compress(good.encode()))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + bytes(range(200)))
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "record.jsonl").write_text(good + '{"messages": [{"role": "user"}]}\n')
    (tmp_path / "share.jsonl").write_text('{"conversations": [{"from": "bot", "value": "x"}]}\n')
    (tmp_path / "neg.yaml").write_text("lr: -0.1\n")
    (tmp_path / "zero.yaml").write_text("micro_batch_size: 0\n")
    (tmp_path / "notyaml.yaml").write_text("lr: [1, \n")
    (tmp_path / "a_file").write_text("x")
    return [
        ("missing", ["split", "nope.jsonl"], "nope.jsonl: no such file"),
        ("latin1", ["split", "latin1.jsonl"], "latin1.jsonl:1: not UTF-8 text (byte 0xe9"),
        ("gzip", ["split", "gz.jsonl"], "gz.jsonl: is gzip-compressed"),
        ("parquet", ["split", "bad.parquet"], "bad.parquet: not a readable Parquet file"),
        ("directory", ["split", "folder.jsonl"], "prompts: folder.jsonl: is a folder, not a file"),
        ("record", ["split", "record.jsonl"], "record.jsonl:2: field 'messages[0].content'"),
        ("sharegpt", ["split", "share.jsonl"], "share.jsonl:1: field 'conversations[0].from'"),
        ("range-cli", ["split", "good.jsonl", "--fraction", "-1"], "'fraction' must be in [0"),
        ("neg-lr", ["sft", "good.jsonl", "--config", "neg.yaml"], "neg.yaml:1: 'lr' must be > 0"),
        (
            "batch-0",
            ["sft", "good.jsonl", "--config", "zero.yaml"],
            "'micro_batch_size' must be >= 1",
        ),
        ("yaml", ["sft", "good.jsonl", "--config", "notyaml.yaml"], "notyaml.yaml: not valid YAML"),
        ("no-config", ["toy", "--config", "none.yaml"], "none.yaml: no such config file"),
        ("unwritable", ["split", "good.jsonl", "--output-dir", "a_file/out"], "a_file"),
        ("sft-no-answer", ["sft", "good.jsonl", "--model", "tiny"], "good.jsonl:1: field"),
    ]


def test_user_errors_are_one_line_without_traceback(tmp_path):
    for name, args, expected in _bad_inputs(tmp_path):
        done = gad_cli(*args, cwd=tmp_path)
        assert done.returncode == 2, (name, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (name, done.stderr[-2000:])
        lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, (name, done.stderr)
        assert expected in lines[0], (name, lines[0])


def test_a_bug_in_gad_keeps_its_traceback(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gad import cli
    from gad.data import evalsets

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(evalsets, "split", broken)
    (tmp_path / "good.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = CliRunner().invoke(cli.app, ["split", str(tmp_path / "good.jsonl")])
    assert isinstance(result.exception, KeyError)  # not turned into a one-line message
