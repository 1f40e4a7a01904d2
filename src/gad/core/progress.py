"""The one progress bar: the training loops' (steps, with the latest stats) and the API
commands' (`collect`, `judge`, and `label` through them).

rich, on stderr. It shows only where stderr is a terminal: a log
file or CI gets no bar lines, only the summary the command prints at the end, even where
FORCE_COLOR makes rich treat the file as a terminal for colours (TTY_COMPATIBLE=0 turns it off).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    """Counts finished items toward `total`, or with no total (None) only counts them; a
    note (such as the failures so far, or a training step's latest stats) follows the count.
    `enabled=False` silences it (in a multi-process run, every process but the main one)."""

    def __init__(
        self,
        name: str,
        total: int | None,
        unit: str,
        enabled: bool = True,
        console: Console | None = None,
        start: int = 0,
    ):
        console = console or Console(stderr=True)
        isatty = getattr(console.file, "isatty", None)
        self.shown = enabled and console.is_terminal and isatty is not None and isatty()
        """Whether the bar is drawn at all (a terminal, and the caller did not turn it off)."""
        if total is None:
            columns = [TextColumn(f"[bold]{name}[/]"), TextColumn(f"{{task.completed}} {unit}")]
            columns += [TimeElapsedColumn()]
        else:
            columns = [TextColumn(f"[bold]{name}[/]"), BarColumn()]
            columns += [TextColumn(f"{{task.completed}}/{{task.total}} {unit}")]
            columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        self.progress = Progress(
            *columns, TextColumn("{task.fields[note]}"), console=console, disable=not self.shown
        )
        self.task = self.progress.add_task(name, total=total, completed=start, note="")
        self.progress.start()

    def advance(self, note: str | None = None) -> None:
        """One more item done; `note` replaces the text after the count when given."""
        fields = {} if note is None else {"note": note}
        self.progress.update(self.task, advance=1, **fields)

    def update(self, completed: int, note: str = "") -> None:
        """`completed` items done in all (a resumed run starts past 0)."""
        self.progress.update(self.task, completed=completed, note=note)

    def close(self) -> None:
        self.progress.stop()
