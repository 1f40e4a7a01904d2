"""Issue 24: list-valued settings take YAML lists (and comma-separated text), and each step
limit bounds the stage it names, as the run's first lines and its config say."""

import pytest

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.methods import stage as gad_stage
from tests.test_gad import gad_config, teacher_file  # noqa: F401


def test_a_yaml_list_is_a_list_setting(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora_rank: 8\nlora_target_modules: [q_proj, v_proj]\n")
    for cls in (cfg.SFTConfig, cfg.GADConfig, cfg.RewardConfig):
        assert cfg.load(cls, path).lora_target_modules == "q_proj,v_proj"
        overridden = cfg.load(cls, path, {"lora_target_modules": "k_proj,o_proj"})
        assert overridden.lora_target_modules == "k_proj,o_proj"
    toy = tmp_path / "toy.yaml"
    toy.write_text("teacher_modes: [2, 7.5]\nteacher_weights: [0.3, 0.7]\n")
    loaded = cfg.load(cfg.ToyConfig, toy)
    assert (loaded.teacher_modes, loaded.teacher_weights) == ("2,7.5", "0.3,0.7")
    report = tmp_path / "report.yaml"
    report.write_text("runs: [runs/a, runs/b]\nresults: [a.json]\n")
    assert cfg.load(cfg.ReportConfig, report).runs == "runs/a,runs/b"


@pytest.mark.parametrize("bad", ["[q_proj, {a: 1}]", "[q_proj, 'a,b']", "[true]", "[q_proj, '']"])
def test_a_list_with_something_else_in_it_is_named(tmp_path, bad):
    path = tmp_path / "run.yaml"
    path.write_text(f"lora_target_modules: {bad}\n")
    with pytest.raises(cfg.ConfigError, match=r"run.yaml:1: 'lora_target_modules' must be a list"):
        cfg.load(cfg.SFTConfig, path)


def test_help_says_which_stage_each_limit_bounds():
    docs = cfg.field_docs(cfg.GADConfig)
    assert "GAD stage (not the warmup" in docs["max_steps"]
    assert docs["warmup_max_steps"].startswith("Stop the warmup stage")


def test_warmup_max_steps_bounds_the_warmup_and_max_steps_the_gad_stage(
    tiny_dir,
    teacher_file,  # noqa: F811
    tmp_path,
    capfd,
):
    out = tmp_path / "run"
    # 16 records in batches of 4: the warmup's plan is 4 steps; the GAD stage's 400.
    config = gad_config(
        tiny_dir, teacher_file, out, warmup_epochs=1.0, warmup_max_steps=1, max_steps=2
    )
    gad_stage.train(config)
    assert [r["step"] for r in read_metrics(out / "warmup")] == [1]
    assert [r["step"] for r in read_metrics(out / "gad")] == [1, 2]
    err = " ".join(capfd.readouterr().err.split())
    warmup_line = "warmup stage: 1 steps planned (4 from warmup_epochs, cut by warmup_max_steps=1)"
    gad_line = "gad stage: 2 steps planned (400 from epochs, cut by max_steps=2)"
    assert warmup_line in err and gad_line in err
    saved = (out / "config.yaml").read_text()
    assert f"# planned: {warmup_line}" in saved and f"# planned: {gad_line}" in saved
    assert cfg.load(cfg.GADConfig, out / "config.yaml").warmup_max_steps == 1
