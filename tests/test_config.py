import subprocess
import sys

import pytest

from gad import config as cfg


def test_yaml_then_overrides_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-5\nepochs: 2\nadam_betas: [0.8, 0.95]\nreport_to: tensorboard\n")
    loaded = cfg.load(cfg.SFTConfig, path, {"epochs": 5, "model": "my/folder"})
    assert loaded.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string; it must still be a float
    assert loaded.epochs == 5  # the command line wins over the file
    assert loaded.adam_betas == (0.8, 0.95)
    assert loaded.model == "my/folder"
    assert loaded.batch_size == cfg.SFTConfig().batch_size  # untouched default

    cfg.save(loaded, tmp_path / "resolved.yaml")
    assert cfg.load(cfg.SFTConfig, tmp_path / "resolved.yaml") == loaded


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-5\nlearning_rate: 3\n")
    with pytest.raises(cfg.ConfigError, match=r"run.yaml: unknown key 'learning_rate'"):
        cfg.load(cfg.SFTConfig, path)
    with pytest.raises(cfg.ConfigError, match=r"unknown key 'lrr'.*did you mean 'lr'"):
        cfg.load(cfg.SFTConfig, None, {"lrr": 1.0})


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
