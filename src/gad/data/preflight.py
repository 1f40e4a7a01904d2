"""Every input a command will read, every folder it will write, and every rule between its
settings, checked before any work: a typo in the last file a run reads must cost a second, not
the hours of warmup before the run reaches it.

What to check comes from the config fields' declared kinds (`gad.setting_types`), not from a
list kept here: a path field added with its kind is checked without touching this module. The
CLI calls `check(config)` after loading the settings and before running the command; nothing
here imports torch or opens a model. Each problem is one line naming the setting and the path.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gad.config import load as cfg
from gad.config import rules
from gad.config.setting_types import LIST, Kind, kinds
from gad.data.evalsets import BUILTIN_SETS
from gad.models.packages import BUILTIN_MODELS


def check(config: Any) -> None:
    """Raise a `cfg.ConfigError` naming the setting and the path of the first problem."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    for name in cfg.field_order(type(config)):  # the stage's own paths first, as --help
        found = kinds(hints[name])
        for kind in found:
            if kind is not LIST:
                _check_field(config, name, getattr(config, name), kind, LIST in found)
    rules.check(config)


def _check_field(config: Any, name: str, value: str | None, kind: Kind, many: bool) -> None:
    if value is None:
        return
    if value == "":
        if kind.name == "read" and not kind.empty_ok and not many:
            raise cfg.ConfigError(f"'{name}' is required: give the file to read")
        return
    if kind.name == "model" and not _local(config, kind):
        return  # an API model's name, not a path
    for item in [v.strip() for v in value.split(",") if v.strip()] if many else [value]:
        CHECKS[kind.name](name, Path(item).expanduser(), item)


def _local(config: Any, kind: Kind) -> bool:
    if kind.backend is None:
        return True
    backend = getattr(config, kind.backend, None) or getattr(config, "backend", None)
    return backend == "local"


def _read_file(name: str, path: Path, text: str) -> None:
    if path.is_dir():
        raise cfg.ConfigError(f"{name}: {text}: is a folder, not a file")
    if not path.is_file():
        raise cfg.ConfigError(f"{name}: {text}: no such file")


def _read_dir(name: str, path: Path, text: str) -> None:
    if not path.is_dir():
        raise cfg.ConfigError(f"{name}: {text}: no such folder")


def _prompt_set(name: str, path: Path, text: str) -> None:
    if text not in BUILTIN_SETS and not path.is_file():
        raise cfg.ConfigError(
            f"{name}: {text}: no such file, and not a built-in set ({', '.join(BUILTIN_SETS)})"
        )


def _model(name: str, path: Path, text: str) -> None:
    if text in BUILTIN_MODELS:
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise cfg.ConfigError(
                f"{name}: {text}: not a Hugging Face model folder (no config.json)"
            )
        return
    what = "is a file, not a model folder" if path.exists() else "no such folder"
    raise cfg.ConfigError(
        f"{name}: {text}: {what}, and not a built-in model ({', '.join(BUILTIN_MODELS)})"
    )


def _write_dir(name: str, path: Path, text: str, target: Path | None = None) -> None:
    """The folder exists as a folder we may write into, or can be made: every existing part of
    its path is a folder (a file in the way stops even root). `target`: the path the setting
    names, when that is a file inside `path`."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        named = target or path
        where = "is a file" if existing == named else f"cannot be made: {existing} is a file"
        raise cfg.ConfigError(f"{name}: {text}: {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise cfg.ConfigError(f"{name}: {text}: {existing} is not writable")


def _write_file(name: str, path: Path, text: str) -> None:
    if path.is_dir():
        raise cfg.ConfigError(f"{name}: {text}: is a folder, not a file")
    _write_dir(name, path.parent, text, path)


CHECKS: dict[str, Callable[[str, Path, str], None]] = {
    "read": _read_file,
    "read_dir": _read_dir,
    "prompt_set": _prompt_set,
    "model": _model,
    "write_dir": _write_dir,
    "write_file": _write_file,
}
