"""What a setting's text means, beyond its Python type: declared on the config fields with
`Annotated` (`data: ReadFile = ""`), so that loading and the check before any work
(`gad.preflight`) find every path a command reads or writes, and every list, from the
declarations themselves and never from a list kept by hand.

Pure declarations (the config classes import this): importing it must stay cheap.
"""

from __future__ import annotations

from typing import Annotated


class Kind:
    """One meaning of a setting's text. (Not a dataclass: every dataclass the config module
    shows is a config class.)

    `name`: `read` a file read, `model` a built-in name or model folder, `prompt_set` a built-in
    set name or a file, `read_dir` a folder read, `write_dir` a folder written, `write_file` a
    file written, `list` comma-separated values. `backend` (for `model`): the field whose value
    `local` makes this a local model (else an API name), None: always local; a None value of
    that field falls back to `backend`. `empty_ok`: `""` means a default, not a missing setting.
    """

    def __init__(self, name: str, *, backend: str | None = None, empty_ok: bool = False) -> None:
        self.name, self.backend, self.empty_ok = name, backend, empty_ok

    def __repr__(self) -> str:
        return f"Kind({self.name!r})"


LIST = Kind("list")
"""Comma-separated values on the command line; a YAML list is accepted and joined."""

ReadFile = Annotated[str, Kind("read")]
"""A file the command reads."""
ReadFileOrBundled = Annotated[str, Kind("read", empty_ok=True)]
"""A file the command reads; empty uses one that ships with gad."""
ReadFiles = Annotated[str, LIST, Kind("read")]
"""Files the command reads, comma-separated."""
ReadDirs = Annotated[str, LIST, Kind("read_dir")]
"""Folders the command reads, comma-separated."""
PromptSet = Annotated[str, Kind("prompt_set")]
"""A built-in prompt set (`mt-bench`, `self-instruct`) or a chat-record file."""
Model = Annotated[str, Kind("model")]
"""A built-in model name or a Hugging Face folder, loaded locally."""
LocalModel = Annotated[str, Kind("model", backend="backend")]
"""A model folder or built-in name when `backend` is `local`, else the API's model name."""
JudgeModel = Annotated[str, Kind("model", backend="judge_backend")]
"""As `LocalModel`, with the judge's own backend (None: the teacher's)."""
OutputDir = Annotated[str, Kind("write_dir")]
"""A folder the command writes into (made if missing)."""
OutputFile = Annotated[str, Kind("write_file")]
"""A file the command writes (its folder made if missing)."""
Names = Annotated[str, LIST]
"""Names, comma-separated."""


def kinds(tp: object) -> tuple[Kind, ...]:
    """The kinds an annotated field type carries (through `X | None` too)."""
    found: list[Kind] = []
    for arg in (tp, *getattr(tp, "__args__", ())):
        found += [m for m in getattr(arg, "__metadata__", ()) if isinstance(m, Kind)]
    return tuple(dict.fromkeys(found))
