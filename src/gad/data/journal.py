"""Append-only JSON-lines journals: what makes `gad collect` and the judge's cache exactly once.

A journal is a JSONL file of finished work, one JSON object with an `"id"` per line. Every line
is written with write + flush + fsync before the next is started (`append_jsonl`), so a
process killed at any moment leaves complete lines plus at most one torn last line. On start
(`Journal.load`) that torn line is cut off (and logged), and the ids already present are known:
the caller skips them, so killing and rerunning loses and duplicates nothing. For an id written
twice the last line wins. A journal that one process appends to is locked (`busy`), since two
writers would duplicate work; a file another journal's lock already covers (collect's failures
file, under the output's lock) is opened without one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from gad.config.load import UserError

log = logging.getLogger(__name__)


def append_jsonl(f: Any, obj: dict[str, Any]) -> None:
    """Append one line and make it durable before returning (a journal write)."""
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


class JournalError(UserError, RuntimeError):
    """A journal cannot be used: damaged before its last line, or locked by another run."""


def read(
    path: Path, pick: Callable[[dict[str, Any]], Any], error: type[Exception] = JournalError
) -> tuple[list[Any], int]:
    """`pick(obj)` of every line of a JSONL journal, and how many torn-tail bytes were cut.

    Only the end of the file may be damaged (a write cut short by a kill or a crash): a last
    line without a newline, or trailing lines that are not JSON objects with an id. Those are
    truncated away in place. Damage followed by good lines is not a torn write, so it stops the
    run (`error`) instead of silently losing records.
    """
    if not path.exists():
        return [], 0
    picked: list[Any] = []
    good_end = pos = 0
    first_bad: int | None = None
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            pos += len(line)
            obj = None
            if line.endswith(b"\n"):
                if not line.strip():
                    if first_bad is None:
                        good_end = pos
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    pass
            if isinstance(obj, dict) and "id" in obj:
                if first_bad is not None:
                    raise error(
                        f"{path}:{first_bad}: not a valid JSON record, but complete records "
                        f"follow it; fix or remove that line by hand (only a torn last line "
                        f"is repaired automatically)"
                    )
                picked.append(pick(obj))
                good_end = pos
            elif first_bad is None:
                first_bad = line_no
    cut = pos - good_end
    if cut:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
        log.warning(
            "%s: cut a half-written last line (%d bytes) left by an interrupted run", path, cut
        )
    return picked, cut


def write_atomically(path: Path, lines: Iterable[dict[str, Any]]) -> None:
    """Replace `path` by `lines` so that a kill leaves either the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for obj in lines:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _whole(obj: dict[str, Any]) -> dict[str, Any]:
    return obj


class Journal:
    """One journal file: `load` what earlier runs finished, `append` what this run finishes.

    With `busy` (the end of the error message, e.g. "another `gad collect` is writing this
    output") the file is opened and locked at once and stays locked until `close`; without, it
    is opened on the first `append`. `error` is the exception the caller's users see.
    """

    def __init__(
        self, path: str | Path, *, busy: str | None = None, error: type[Exception] = JournalError
    ) -> None:
        self.path = Path(path)
        self.error = error
        self.lines = 0  # entries `load` read; an id written twice counts twice
        self.repaired = 0  # bytes of a torn last line that `load` cut off
        self._f: IO[str] | None = None
        if busy is not None:
            self._f = open(self.path, "a", encoding="utf-8")
            try:
                _lock(self._f, f"{self.path}: {busy}", error)
            except BaseException:
                self._f.close()
                raise

    def load(self, pick: Callable[[dict[str, Any]], Any] = _whole) -> dict[str, Any]:
        """`pick(entry)` by id of every entry on disk (the last entry of an id wins, in the
        position of its first); a torn last line is cut off first."""
        picked, self.repaired = read(self.path, lambda obj: (str(obj["id"]), pick(obj)), self.error)
        self.lines = len(picked)
        return dict(picked)

    def append(self, entry: dict[str, Any]) -> None:
        """Write one entry durably (flushed and fsynced) before returning."""
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        append_jsonl(self._f, entry)

    def rewrite(self, entries: Iterable[dict[str, Any]]) -> None:
        """Replace the file by `entries` atomically (compaction); later appends go to the new
        file. Only for an unlocked journal: the lock is held on the file being replaced."""
        self._close_file()
        write_atomically(self.path, entries)

    def close(self) -> None:
        self._close_file()

    def _close_file(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(f: IO[str], message: str, error: type[Exception]) -> None:
    """Hold an exclusive lock on the open journal: two runs appending would duplicate work."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, run one process per journal
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        raise error(message) from err
