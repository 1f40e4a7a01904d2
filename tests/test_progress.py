"""The API commands' progress bar: on a terminal only, never in logs or CI, silenced on request."""

import io
import sys

import pytest
from fake_openai import FakeOpenAI
from rich.console import Console
from test_collect import KEY, KEY_ENV, make_config, write_prompts
from test_judge import config as judge_config
from test_judge import parts, write_answers

from gad.api import judge, teacher
from gad.core.progress import Bar


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def drawn(file: io.StringIO, enabled: bool, total: int | None) -> str:
    bar = Bar("work", total, "rec", enabled, Console(file=file, force_terminal=True, width=100))
    for i in range(3):
        bar.advance(note=f"failed={i}")
    bar.close()
    return file.getvalue()


def test_bar_draws_only_on_a_terminal_and_when_enabled():
    assert "3/5 rec" in drawn(Terminal(), True, 5) and "failed=2" in drawn(Terminal(), True, 5)
    assert "3 rec" in drawn(Terminal(), True, None)
    assert drawn(Terminal(), False, 5) == ""
    # rich calls a file a terminal under FORCE_COLOR (here: force_terminal); a file is still no
    # place for a bar.
    assert drawn(io.StringIO(), True, 5) == ""


@pytest.fixture
def api_keys(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("GAD_TEST_JUDGE_KEY", "sk-test-judge")


@pytest.mark.parametrize("tty", [True, False])
def test_collect_bar_only_on_a_terminal(tmp_path, monkeypatch, api_keys, tty):
    monkeypatch.setenv("FORCE_COLOR", "1")
    stderr = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    write_prompts(tmp_path / "prompts.jsonl", 4)
    with FakeOpenAI() as server:
        config = make_config(tmp_path, server)
        teacher.collect(config, progress=True)
        assert ("collect (openai)" in stderr.getvalue() and "4/4 rec" in stderr.getvalue()) == tty
        stderr.seek(0)
        stderr.truncate()
        teacher.collect(
            make_config(tmp_path, server, output=str(tmp_path / "b.jsonl")), progress=False
        )
    assert stderr.getvalue() == ""


@pytest.mark.parametrize("tty", [True, False])
def test_judge_bar_only_on_a_terminal(tmp_path, monkeypatch, api_keys, tty):
    monkeypatch.setenv("FORCE_COLOR", "1")
    stderr = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    answers = write_answers(tmp_path / "a.jsonl", {"q1": "c", "q2": "d"})
    with FakeOpenAI(responder=lambda r: "R" if parts(r) is None else "8 6") as server:
        judge.judge(judge_config(tmp_path, answers, server), quiet=False)
        # Two references and two ratings.
        assert ("judge" in stderr.getvalue() and "4 req" in stderr.getvalue()) == tty
        stderr.seek(0)
        stderr.truncate()
        cache = str(tmp_path / "cache2")
        judge.judge(judge_config(tmp_path, answers, server, cache_dir=cache), quiet=True)
    assert stderr.getvalue() == ""
