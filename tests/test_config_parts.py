"""Configs built from shared parts: `gad label` hands its collection, its student's samples and
its judge the parts it shares with them (`parts.values`), and the chat client's settings are a
part the chatting stages are made of, so no field is copied by name alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gad.api import chat, label
from gad.config import load as cfg


def default(f: dataclasses.Field) -> object:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def test_the_chatting_stages_are_chat_settings():
    """`chat.connect` takes the stage's config itself: every chat setting is one of its fields,
    declared once."""
    assert chat.ChatSettings is cfg.ChatSettings
    for stage in (cfg.CollectConfig, cfg.JudgeConfig):
        assert issubclass(stage, chat.ChatSettings)
        assert (
            cfg.field_docs(stage)["concurrency"] == cfg.field_docs(chat.ChatSettings)["concurrency"]
        )


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
        engine="vllm",
        vllm_gpu_memory=0.5,
        vllm_cpu_kv_cache_gib=2.0,
        vllm_compile=True,
        vllm_sleep=True,
        vllm_tensor_parallel=2,
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
        engine=config.engine,
        vllm_gpu_memory=config.vllm_gpu_memory,
        vllm_cpu_kv_cache_gib=config.vllm_cpu_kv_cache_gib,
        vllm_compile=config.vllm_compile,
        vllm_sleep=config.vllm_sleep,
        vllm_tensor_parallel=config.vllm_tensor_parallel,
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
        engine=config.engine,
        vllm_gpu_memory=config.vllm_gpu_memory,
        vllm_cpu_kv_cache_gib=config.vllm_cpu_kv_cache_gib,
        vllm_compile=config.vllm_compile,
        vllm_sleep=config.vllm_sleep,
        vllm_tensor_parallel=config.vllm_tensor_parallel,
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
        engine=config.engine,
        vllm_gpu_memory=config.vllm_gpu_memory,
        vllm_cpu_kv_cache_gib=config.vllm_cpu_kv_cache_gib,
        vllm_compile=config.vllm_compile,
        vllm_sleep=config.vllm_sleep,
        vllm_tensor_parallel=config.vllm_tensor_parallel,
        dtype=config.dtype,
        seed=config.seed,
    )
    defaults = cfg.LabelConfig()
    assert label.generate_config(defaults, prompts, out).n == defaults.k  # student_k None
    assert label.judge_config(defaults).model == defaults.teacher
