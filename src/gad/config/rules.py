"""The rules between a stage's settings (one setting needs or excludes another), in one place:
the check before any work (`gad.data.preflight`) runs them, and so does `gad train` itself for
callers that skip the CLI. A single value's type and range are checked on loading instead.

Importing this must stay cheap (`gad --help`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

from gad.config.data_configs import EvalConfig
from gad.config.load import ConfigError
from gad.config.parts import VLLM_INSTALL, Engine
from gad.config.train_configs import GADConfig


def check(config: Any) -> None:
    """Raise a `ConfigError` naming the settings of the first rule `config` breaks."""
    if isinstance(config, Engine):
        engine_rules(config)
    for rule in RULES.get(type(config), ()):
        rule(config)


def vllm_settings_set(config: Engine) -> list[str]:
    """The `vllm_*` settings of `config` that differ from their defaults."""
    return [
        f.name
        for f in dataclasses.fields(Engine)
        if f.name.startswith("vllm_") and getattr(config, f.name) != f.default
    ]


def engine_rules(config: Engine) -> None:
    """`engine: vllm` where vLLM is not installed, and a `vllm_*` setting where the transformers
    loop generates (it would be silently ignored)."""
    if config.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"engine: vllm is not installed; {VLLM_INSTALL}")
    if config.engine == "transformers" and (names := vllm_settings_set(config)):
        raise ConfigError(
            f"{names[0]} applies to the vllm engine only, and engine is transformers: drop "
            "it, or set engine to vllm or auto"
        )


def gad_rules(config: GADConfig) -> None:
    """`gad train`'s settings that need or exclude each other: they fail before the first
    model, not after the warmup."""
    problems = [
        (config.eval_every and not config.eval_data, "eval_every needs eval_data: held-out "
         "teacher chat records (`gad split` the prompts, `gad collect` the held-out part)"),
        (config.method == "whitebox" and not config.teacher_model,
         "method=whitebox needs teacher_model (a local model)"),
        (config.method == "reward-distill" and not config.reward_model,
         "method=reward-distill needs reward_model: train one with `gad reward-model LABELS "
         "--output-dir runs/rm` and pass --reward-model runs/rm/final"),
        (config.reward_model and config.method == "offpolicy",
         "reward_model and method=offpolicy exclude each other"),
        (config.reward_mix_alpha is not None
         and (config.method != "gad" or not config.reward_model),
         "reward_mix_alpha needs method=gad and a reward_model"),
        (config.single_base and config.lora_rank <= 0,
         "single_base needs LoRA: set lora_rank above 0 (e.g. 16)"),
        (config.single_base and config.discriminator not in (None, config.model),
         f"single_base: the discriminator shares the student's base, so discriminator "
         f"({config.discriminator}) must be unset or the student's model ({config.model})"),
    ]  # fmt: skip
    for failed, message in problems:
        if failed:
            raise ConfigError(message)


def _eval_rules(config: EvalConfig) -> None:
    if config.metric == "accuracy" and not config.ground_truth:
        raise ConfigError("metric 'accuracy' needs 'ground_truth' (a truth file)")


RULES: dict[type, tuple[Callable[[Any], None], ...]] = {
    GADConfig: (gad_rules,),
    EvalConfig: (_eval_rules,),
}
"""Per config class, the checks of settings that need or exclude each other."""
