"""`cfg.derive` and the configs it joins: label -> collect / generate / judge, stage -> chat client.

`derive` copies every field two dataclasses share by name, so a shared field that means
something else on the other side (another type or default) would be copied silently. These tests
make every such difference a listed decision with its reason.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from gad.api import chat, label
from gad.config import load as cfg

INTENDED = {
    (cfg.LabelConfig, cfg.CollectConfig): {},
    (cfg.LabelConfig, cfg.GenerateConfig): {
        "prompts": "`gad generate` defaults to a built-in evaluation set; label needs the user's "
        "prompts and hands the student its own validated prompt file",
    },
    (cfg.LabelConfig, cfg.JudgeConfig): {
        "backend": "label's judge is the teacher (`judge_backend` None = the teacher's backend, "
        "local by default); `gad judge` defaults to an API judge",
        "temperature": "label's temperature samples the teacher; its judge is greedy "
        "(`label.judge_config` sets 0)",
        "generation_batch_size": "label runs all its local models with one batch size, the "
        "judge too; `gad judge` alone batches fewer of its long rating prompts",
        "max_prompt_tokens": "a rating prompt holds a question, a reference and an answer: "
        "`label.judge_config` keeps the judge's own, larger limit",
    },
}
"""Per (source, target): the shared fields whose type or default differ, and why."""


def default(f: dataclasses.Field) -> object:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def shared_differences(source: type, target: type) -> dict[str, str]:
    """Shared fields whose type or default differ: name -> what differs."""
    source_types, target_types = typing.get_type_hints(source), typing.get_type_hints(target)
    target_fields = {f.name: f for f in dataclasses.fields(target)}
    out = {}
    for f in dataclasses.fields(source):
        other = target_fields.get(f.name)
        if other is None:
            continue
        if source_types[f.name] != target_types[f.name]:
            out[f.name] = f"type {source_types[f.name]} vs {target_types[f.name]}"
        elif default(f) != default(other):
            out[f.name] = f"default {default(f)!r} vs {default(other)!r}"
    return out


@pytest.mark.parametrize("pair", list(INTENDED), ids=lambda p: f"{p[0].__name__}-{p[1].__name__}")
def test_shared_fields_agree_or_differ_on_purpose(pair):
    found = shared_differences(*pair)
    assert set(found) == set(INTENDED[pair]), found


@pytest.mark.parametrize("stage", [cfg.CollectConfig, cfg.JudgeConfig])
def test_chat_settings_come_whole_from_each_stage(stage):
    """Every chat setting is a field of the stage of the same type: `derive` leaves none at
    its placeholder default."""
    settings_types = typing.get_type_hints(chat.ChatSettings)
    stage_types = typing.get_type_hints(stage)
    for name, tp in settings_types.items():
        assert stage_types.get(name) == tp, name
    values = stage()
    settings = cfg.derive(chat.ChatSettings, values)
    assert all(getattr(settings, n) == getattr(values, n) for n in settings_types)


def test_derive_copies_shared_fields_and_overrides_win():
    source = cfg.LabelConfig(temperature=0.3, top_p=0.9, seed=7, k=2, exclude="held.jsonl")
    derived = cfg.derive(cfg.CollectConfig, source, n=5, output="x.jsonl")
    assert (derived.temperature, derived.top_p, derived.seed) == (0.3, 0.9, 7)
    assert (derived.n, derived.output, derived.exclude) == (5, "x.jsonl", "held.jsonl")
    assert derived.retry_failed is cfg.CollectConfig.retry_failed  # not in the source: default
    with pytest.raises(TypeError, match="no field"):
        cfg.derive(cfg.CollectConfig, source, k=3)


def every_field_changed() -> cfg.LabelConfig:
    """A LabelConfig whose every field differs from its default (so a copy shows)."""
    return cfg.LabelConfig(
        prompts="p.jsonl",
        output_dir="out",
        task="open",
        extractor="choice",
        min_vote_share=0.7,
        good_score=8.0,
        k=3,
        student_k=2,
        backend="openai",
        teacher="t-model",
        student="s-model",
        base_url="http://127.0.0.1:1/v1",
        api_key_env="MY_KEY",
        judge_backend="local",
        judge_model="j-model",
        temperature=0.5,
        student_temperature=0.6,
        top_p=0.9,
        max_response_tokens=100,
        max_prompt_tokens=300,
        concurrency=3,
        max_retries=2,
        request_timeout=9.0,
        generation_batch_size=5,
        dtype="bfloat16",
        seed=11,
        ground_truth="truth.jsonl",
        limit=4,
        skip_invalid=True,
        exclude="held.jsonl",
    )


def test_label_builds_the_same_configs_as_its_former_hand_copies():
    config, prompts, out = every_field_changed(), Path("out/prompts.jsonl"), Path("out")
    unchanged = [
        f.name for f in dataclasses.fields(config) if getattr(config, f.name) == default(f)
    ]
    assert unchanged == []
    assert label.collect_config(config, prompts, out) == cfg.CollectConfig(
        prompts=str(prompts),
        output=str(out / "teacher.jsonl"),
        backend=config.backend,
        model=config.teacher,
        base_url=config.base_url,
        api_key_env=config.api_key_env,
        n=config.k,
        temperature=config.temperature,
        top_p=config.top_p,
        max_response_tokens=config.max_response_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        concurrency=config.concurrency,
        max_retries=config.max_retries,
        request_timeout=config.request_timeout,
        generation_batch_size=config.generation_batch_size,
        dtype=config.dtype,
        seed=config.seed,
    )
    assert label.generate_config(config, prompts, out) == cfg.GenerateConfig(
        model=config.student or "",
        prompts=str(prompts),
        output=str(out / "student.jsonl"),
        n=config.student_k,
        temperature=config.student_temperature,
        top_p=config.top_p,
        max_response_tokens=config.max_response_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        generation_batch_size=config.generation_batch_size,
        dtype=config.dtype,
        seed=config.seed,
    )
    assert label.judge_config(config) == cfg.JudgeConfig(
        backend=config.judge_backend or config.backend,
        model=config.judge_model or config.teacher,
        base_url=config.base_url,
        api_key_env=config.api_key_env,
        cache_dir=str(Path(config.output_dir) / "judge"),
        temperature=0.0,
        max_response_tokens=config.max_response_tokens,
        concurrency=config.concurrency,
        max_retries=config.max_retries,
        request_timeout=config.request_timeout,
        generation_batch_size=config.generation_batch_size,
        dtype=config.dtype,
        seed=config.seed,
    )
    defaults = cfg.LabelConfig()
    assert label.generate_config(defaults, prompts, out).n == defaults.k  # student_k None
    assert label.judge_config(defaults).model == defaults.teacher
