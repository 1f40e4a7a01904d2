"""Typed run configuration: one frozen dataclass per stage (declared in `train_configs` and
`data_configs`, composed of the shared `parts`, importable from here), loadable from YAML,
overridable, validated by the range each numeric field declares (`ranges`).

Every field carries a docstring (the string literal under it, in the stage or in the part that
declares it); `field_docs` reads them so the CLI can show them as option help. Importing this
module must stay cheap: `gad --help` imports it and must not pull in torch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
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
from gad.config.parts import ChatSettings
from gad.config.ranges import Range, range_of
from gad.config.setting_types import LIST
from gad.config.train_configs import DemoConfig, GADConfig, RewardConfig, SFTConfig, ToyConfig

CONFIGS: tuple[type, ...] = (
    CollectConfig,
    SFTConfig,
    DemoConfig,
    GADConfig,
    GenerateConfig,
    SplitConfig,
    ReportConfig,
    ToyConfig,
    EvalConfig,
    JudgeConfig,
    LabelConfig,
    RewardConfig,
    TasksConfig,
)
"""Every stage's config class."""
__all__ = ["CONFIGS", "ChatSettings", "Range"]

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
    """The attribute docstrings of a dataclass, by field name, in `field_order`: each from the
    class that declares the field with a docstring (the stage, or the part it inherits)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return {name: docs[name] for name in field_order(cls) if name in docs}


def _own_docs(cls: type) -> dict[str, str]:
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


@cache
def field_order(cls: type) -> tuple[str, ...]:
    """The fields of a config class as a reader meets them (the CLI's options, a saved config):
    the stage's own first, then each part's in the order the class lists its parts (Python's
    own order puts the parts first)."""
    parts = [base for base in cls.__bases__ if dataclasses.is_dataclass(base)]
    inherited = {name for part in parts for name in field_order(part)}
    order = [f.name for f in dataclasses.fields(cls) if f.name not in inherited]
    for part in parts:
        order += [name for name in field_order(part) if name not in order]
    return tuple(order)


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
        value = _check_value(key, value, args[0], where)
        valid = range_of(tp)
        if valid is not None and value not in valid:
            raise ConfigError(f"{where}: '{key}' must be {valid}, got {value!r}")
        return value
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


def build(
    cls: type[C], values: dict[str, Any], where: str, lines: dict[str, int] | None = None
) -> C:
    """Make a `cls` from `values`, naming `where` (and the key's line in it, from `lines`) and
    the key in any error: a wrong type, a value outside the field's range, an unknown key."""
    hints = typing.get_type_hints(cls, include_extras=True)
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    checked = {}
    for key, value in values.items():
        line = (lines or {}).get(str(key))
        at = f"{where}:{line}" if line else where
        if not isinstance(key, str) or key not in hints or key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{at}: unknown key {str(key)!r} for {cls.__name__}{hint}")
        checked[key] = _check_value(key, value, hints[key], at)
    return cls(**checked)


def _key_lines(text: str) -> dict[str, int]:
    """The line of every top-level key of a YAML mapping that `yaml.safe_load` has read."""
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value}


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
        build(cls, loaded, str(path), _key_lines(text))  # errors name the file and line
        values.update(loaded)
    overrides = overrides or {}
    build(cls, overrides, "command line")
    values.update(overrides)
    return build(cls, values, str(path) if path else "config")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict for YAML (tuples become lists), in `field_order`."""
    values = dataclasses.asdict(config)
    return {
        k: list(values[k]) if isinstance(values[k], tuple) else values[k]
        for k in field_order(type(config))
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
