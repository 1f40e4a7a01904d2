"""Typed run configuration: one frozen dataclass per stage (declared in `train_configs` and
`data_configs`, importable from here), loadable from YAML, overridable, validated by range.

Every field carries a docstring (the string literal under it); `field_docs` reads them so the
CLI can show them as option help. Importing this module must stay cheap: `gad --help` imports
it and must not pull in torch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import sys
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

# The stages' dataclasses are declared in two modules of their own; they are this module's API
# as much as its loaders (`cfg.GADConfig`).
from gad.config.data_configs import (
    CollectConfig,
    EvalConfig,
    GenerateConfig,
    JudgeConfig,
    LabelConfig,
    ReportConfig,
    SplitConfig,
    TasksConfig,
)
from gad.config.setting_types import LIST
from gad.config.train_configs import DemoConfig, GADConfig, RewardConfig, SFTConfig, ToyConfig

EXIT_USER_ERROR = 2
"""A setting, an input or the environment is wrong; the one-line message names it."""
EXIT_SOME_FAILED = 3
"""Some items were produced and some failed; the failed ones are listed (failures file, result
status), and a rerun retries them."""
EXIT_NOTHING_PRODUCED = 4
"""The run produced nothing: every item failed, or a server refused every request (the message
gives the server's words and the setting to change)."""


class UserError(Exception):
    """A problem with the user's input or environment whose message says all there is to say:
    the CLI prints it on one line, without a traceback, and exits with `exit_code`."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, *args: Any, exit_code: int | None = None) -> None:
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


def outcome_code(produced: int, failed: int) -> int:
    """The exit code of a run that produced `produced` items and failed `failed`."""
    if not failed:
        return 0
    return EXIT_SOME_FAILED if produced else EXIT_NOTHING_PRODUCED


class ConfigError(UserError, ValueError):
    """A configuration value or key is invalid; the message names the key and its source."""


C = TypeVar("C")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _joined(key: str, items: list[Any], where: str) -> str:
    """A YAML list of a comma-separated setting as the command line writes it (`[q, v]` is
    `q,v`): peft and LoRA recipes write target modules as lists."""
    for item in items:
        if (
            isinstance(item, bool)
            or not isinstance(item, str | int | float)
            or (isinstance(item, str) and ("," in item or not item.strip()))
        ):
            raise ConfigError(f"{where}: '{key}' must be a list of names or numbers, got {item!r}")
    return ",".join(str(item) for item in items)


def _check_value(key: str, value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp` where lossless (int -> float, list -> tuple), else raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        if LIST in args[1:] and isinstance(value, list):
            value = _joined(key, value, where)
        return _check_value(key, value, args[0], where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(key, value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: bad value for '{key}'")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}: '{key}' must be a list of {len(args)} values")
        return tuple(_check_value(key, v, a, where) for v, a in zip(value, args, strict=True))
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-6" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:
        raise ConfigError(f"{where}: '{key}' has an unsupported type {tp}")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{where}: '{key}' must be {name}, got {type(value).__name__} {value!r}")


# Fields renamed so that one concept has one name (`max_response_tokens`: a response's token
# budget; `micro_batch_size`: sequences per forward/backward pass of one process;
# `generation_batch_size`: sequences generated together). The old spellings are accepted, with
# a warning, for one release (until gad 0.3), in YAML files and on the command line.
RENAMED: dict[str, dict[str, str]] = {
    "CollectConfig": {"max_tokens": "max_response_tokens", "batch_size": "generation_batch_size"},
    "GenerateConfig": {"max_tokens": "max_response_tokens", "batch_size": "generation_batch_size"},
    "JudgeConfig": {"max_tokens": "max_response_tokens", "batch_size": "generation_batch_size"},
    "LabelConfig": {"max_tokens": "max_response_tokens", "batch_size": "generation_batch_size"},
    "DemoConfig": {"max_tokens": "max_response_tokens"},
    "SFTConfig": {"batch_size": "micro_batch_size"},
    "GADConfig": {"rollout_batch_size": "generation_batch_size"},
    "RewardConfig": {"batch_size": "global_batch_size"},
}


def renamed(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` with old field names (`RENAMED`) replaced by the new ones, warning once each;
    both names given at once is an error."""
    names = RENAMED.get(cls.__name__, {})
    out = dict(values)
    for old, new in names.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{where}: '{old}' is the old name of '{new}'; give only '{new}'")
        out[new] = out.pop(old)
        _warn_renamed(where, cls.__name__, old, new)
    return out


@cache
def _warn_renamed(where: str, cls_name: str, old: str, new: str) -> None:
    # Once per (source, name): a config loaded by several stages warns once.
    print(
        f"warning: {where}: '{old}' is now '{new}' ({cls_name}); the old name is accepted "
        "until gad 0.3",
        file=sys.stderr,
    )


def build(cls: type[C], values: dict[str, Any], where: str) -> C:
    """Make a `cls` from `values`, naming `where` and the key in any error."""
    hints = typing.get_type_hints(cls, include_extras=True)
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    checked = {}
    for key, value in values.items():
        if key in RENAMED.get(cls.__name__, {}):
            new = RENAMED[cls.__name__][key]
            raise ConfigError(f"{where}: '{key}' is now '{new}' ({cls.__name__})")
        if not isinstance(key, str) or key not in hints or key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key {str(key)!r} for {cls.__name__}{hint}")
        checked[key] = _check_value(key, value, hints[key], where)
        check_range(cls, key, checked[key], where)
    return cls(**checked)


def load(
    cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> C:
    """Defaults, then the YAML file's values, then `overrides` (the command line)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: no such config file") from err
        except IsADirectoryError as err:
            raise ConfigError(f"{path}: is a directory, not a config file") from err
        except OSError as err:
            raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from err
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                f"{err.start}); re-save it as UTF-8"
            ) from err
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
        except RecursionError as err:
            raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of field: value")
        loaded = renamed(cls, loaded, str(path))
        build(cls, loaded, str(path))  # errors name the file
        values.update(loaded)
    overrides = renamed(cls, overrides or {}, "command line")
    build(cls, overrides, "command line")
    values.update(overrides)
    return build(cls, values, str(path) if path else "config")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict for YAML (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def save(config: Any, path: str | Path, notes: dict[str, str] | None = None) -> None:
    """Write the resolved config as YAML with each field's docstring as a comment above it, and
    `notes[key]` (how a value was resolved, e.g. `auto` precision) as a second comment."""
    docs = field_docs(type(config))
    notes = notes or {}
    lines = [f"# {type(config).__name__}: resolved configuration of this run"]
    for key, value in to_dict(config).items():
        if key in docs:
            lines.append(f"# {docs[key]}")
        if key in notes:
            lines.append(f"# resolved: {notes[key]}")
        lines.append(yaml.safe_dump({key: value}, sort_keys=False, width=1000).rstrip())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- valid ranges


class Range:
    """The valid values of a numeric field: `low`/`high` bounds (None = unbounded), each
    inclusive unless `*_open`. Floats must also be finite. (Not a dataclass: every dataclass
    here is a config class.)"""

    def __init__(
        self,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "finite"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)
"""A probability or share."""
NUCLEUS = Range(0, 1, low_open=True)
"""top_p: 0 would keep no token."""
SEED = Range(0, 2**32 - 1)
"""numpy's seeds are unsigned 32-bit."""
BETA = Range(0, 1, high_open=True)
"""Adam's betas (1 would divide by zero in the bias correction)."""
TEMPERATURE = NON_NEGATIVE
"""Sampling temperature: 0 means greedy (local backends) and is valid for APIs."""

_API = {
    "concurrency": AT_LEAST_1,
    "max_retries": NON_NEGATIVE,
    "request_timeout": POSITIVE,
}
_SAMPLING = {
    "temperature": TEMPERATURE,
    "top_p": NUCLEUS,
    "max_response_tokens": AT_LEAST_1,
    "max_prompt_tokens": AT_LEAST_1,
    "generation_batch_size": AT_LEAST_1,
    "seed": SEED,
    "limit": AT_LEAST_1,
}
_TRAINING = {
    "max_steps": AT_LEAST_1,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "max_prompt_tokens": AT_LEAST_1,
    "max_response_tokens": AT_LEAST_1,
    "seed": SEED,
    "save_every": NON_NEGATIVE,
    "keep_checkpoints": NON_NEGATIVE,
    "lora_rank": NON_NEGATIVE,
    "lora_alpha": POSITIVE,
    "lora_dropout": Range(0, 1, high_open=True),
}

RANGES: dict[type, dict[str, Range]] = {
    CollectConfig: {**_API, **_SAMPLING, "n": AT_LEAST_1},
    SFTConfig: {
        **_TRAINING,
        "epochs": AT_LEAST_1,
        "warmup_steps": NON_NEGATIVE,
        "adam_betas": BETA,
        "micro_batch_size": AT_LEAST_1,
        "grad_accum": AT_LEAST_1,
        "log_every": AT_LEAST_1,
    },
    DemoConfig: {
        "num_train": AT_LEAST_1,
        "num_held_out": AT_LEAST_1,
        "max_response_tokens": AT_LEAST_1,
        "sft_epochs": AT_LEAST_1,
        "lr": POSITIVE,
        "gad_lr": POSITIVE,
        "gad_steps": AT_LEAST_1,
        "n_samples": AT_LEAST_1,
        "batch_prompts": AT_LEAST_1,
        "seed": SEED,
    },
    GADConfig: {
        **_TRAINING,
        "warmup_max_steps": AT_LEAST_1,
        "reward_mix_alpha": UNIT,
        "warmup_epochs": NON_NEGATIVE,
        "warmup_d_only_steps": NON_NEGATIVE,
        "offpolicy_d_epochs": NON_NEGATIVE,
        "soda_beta": POSITIVE,
        "epochs": POSITIVE,
        "batch_prompts": AT_LEAST_1,
        "n_samples": AT_LEAST_1,
        "micro_batch_size": AT_LEAST_1,
        "generation_batch_size": AT_LEAST_1,
        # Log-probs divide the logits by the temperature: greedy (0) is not an option here.
        "temperature": POSITIVE,
        "top_p": NUCLEUS,
        "d_lr": POSITIVE,
        "clip_eps": POSITIVE,
        "kl_coef": NON_NEGATIVE,
        "d_steps": AT_LEAST_1,
        "d_update_every": AT_LEAST_1,
        "d_acc_warn": UNIT,
        "d_acc_warn_steps": AT_LEAST_1,
        "length_warn_ratio": POSITIVE,
        "max_bad_steps": AT_LEAST_1,
        "d_replay_size": NON_NEGATIVE,
        "length_penalty": NON_NEGATIVE,
        "score_clip": POSITIVE,
        "eval_every": NON_NEGATIVE,
        # A factor "either way": below 1 no length would ever be in range.
        "eval_length_range": Range(1),
    },
    GenerateConfig: {**_SAMPLING, "n": AT_LEAST_1},
    SplitConfig: {"fraction": UNIT, "seed": SEED},
    ReportConfig: {},
    ToyConfig: {
        "num_categories": Range(2),
        "teacher_std": POSITIVE,
        "student_mean": Range(),
        "student_std": POSITIVE,
        "steps": AT_LEAST_1,
        "lr": POSITIVE,
        "d_lr": POSITIVE,
        "d_steps": AT_LEAST_1,
        "n_samples": AT_LEAST_1,
        "groups": AT_LEAST_1,
        "seed": SEED,
        "num_seeds": AT_LEAST_1,
    },
    EvalConfig: {"bootstrap_reps": AT_LEAST_1, "seed": SEED},
    JudgeConfig: {
        **_API,
        **{k: v for k, v in _SAMPLING.items() if k != "top_p"},
        "verdict_max_tokens": AT_LEAST_1,
        "attempts": AT_LEAST_1,
        "max_prompt_tokens": AT_LEAST_1,
        "bootstrap": AT_LEAST_1,
        "confidence": Range(0, 1, low_open=True, high_open=True),
    },
    LabelConfig: {
        **_API,
        **_SAMPLING,
        "min_vote_share": UNIT,
        "good_score": Range(1, 10),
        "k": AT_LEAST_1,
        "student_k": NON_NEGATIVE,
        "student_temperature": TEMPERATURE,
    },
    RewardConfig: {
        **_TRAINING,
        "min_label_gap": NON_NEGATIVE,
        # All held out leaves nothing to train on.
        "held_out": Range(0, 1, high_open=True),
        "split_seed": SEED,
        "epochs": AT_LEAST_1,
        "global_batch_size": AT_LEAST_1,
        "micro_batch_size": AT_LEAST_1,
        "eval_every": NON_NEGATIVE,
    },
    TasksConfig: {"size": AT_LEAST_1, "seed": SEED},
}
"""Per config class, the valid range of every numeric field (`build` checks them; a test makes
sure no numeric field is missing here)."""


def check_range(cls: type, key: str, value: Any, where: str) -> None:
    """Raise a ConfigError naming `key`, `value` and the range when `value` is outside it."""
    valid = RANGES.get(cls, {}).get(key)
    if valid is None or value is None or isinstance(value, bool | str):
        return
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, int | float) and item not in valid:
            raise ConfigError(f"{where}: '{key}' must be {valid}, got {value!r}")


# ================================================================ derive
# One stage's config built from another's: `gad label` runs collect, generate and the judge,
# and the chat client takes its settings from whichever stage calls it. Kept in its own block
# (config.py may be split later).


def derive(target_cls: type[C], source: Any, **overrides: Any) -> C:
    """A `target_cls` taking every field it shares by name with the dataclass `source` from
    `source`, `overrides` winning; fields `source` lacks keep their defaults.

    A shared field is copied whatever it means in the target, so the shared fields of configs
    that feed each other agree in name, type and default, or are overridden on purpose (tests
    check both). An override that is no field of `target_cls` is an error, not ignored.
    """
    names = {f.name for f in dataclasses.fields(target_cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{target_cls.__name__} has no field(s) {', '.join(unknown)}")
    own = (f.name for f in dataclasses.fields(source))
    shared = {name: getattr(source, name) for name in own if name in names}
    return target_cls(**{**shared, **overrides})
