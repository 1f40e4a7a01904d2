"""Choosing the generation engine (`engine: auto | transformers | vllm`) and the rules of its
settings: these run without vLLM installed (the engine itself is tested in test_vllm.py)."""

import pytest
import torch

from gad.config import load as cfg
from gad.config import rules
from gad.config.parts import Engine
from gad.train import engines, vllm_rollout


def test_auto_on_a_cpu_keeps_the_transformers_loop_and_says_which_settings_go_unused():
    engine, reason = engines.choose("auto", torch.device("cpu"))
    assert engine == "transformers" and "cpu: vLLM's start-up outweighs" in reason
    engine, reason = engines.choose("auto", torch.device("cpu"), Engine(vllm_gpu_memory=0.5))
    assert engine == "transformers" and reason.endswith("; vllm_gpu_memory unused")
    assert engines.choose("transformers", torch.device("cpu"))[0] == "transformers"


def test_a_vllm_setting_with_the_transformers_engine_is_refused_by_name():
    config = cfg.GADConfig(data="d.jsonl", engine="transformers", vllm_tensor_parallel=2)
    with pytest.raises(cfg.ConfigError, match="vllm_tensor_parallel applies to the vllm engine"):
        rules.check(config)
    rules.check(cfg.GADConfig(data="d.jsonl", engine="auto", vllm_tensor_parallel=2))
    collect = cfg.CollectConfig(engine="transformers", vllm_sleep=True)  # a command that generates
    with pytest.raises(cfg.ConfigError, match="vllm_sleep applies to the vllm engine"):
        rules.check(collect)


@pytest.mark.skipif(vllm_rollout.available(), reason="vLLM is installed here")
def test_vllm_missing_is_one_line_with_the_install_command():
    with pytest.raises(vllm_rollout.EngineError, match="make setup-vllm"):
        engines.choose("vllm", torch.device("cpu"))
    with pytest.raises(vllm_rollout.EngineError, match=r'pip install "gad\[vllm\]"'):
        vllm_rollout.VLLMRollout("/nowhere", tokenizer=None)
    # In the settings check of every command that generates, before any work.
    with pytest.raises(cfg.ConfigError, match="engine: vllm is not installed; .*make setup-vllm"):
        rules.check(cfg.CollectConfig(engine="vllm"))
