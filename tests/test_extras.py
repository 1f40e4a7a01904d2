"""No optional extra can crash a core command: what core commands import is a core dependency,
and each command that needs an extra names the `pip install` line that fixes it."""

import os
import sys
from pathlib import Path

import pytest

from gad.config import load as cfg
from gad.data import chats

ROOT = Path(__file__).resolve().parents[1]


def test_plots_rouge_and_gguf_are_core_dependencies():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    # gad toy / gad report (matplotlib), gad eval (rouge-score), built-in models (gguf).
    assert {"matplotlib", "rouge-score", "gguf"} <= core
    assert "hypothesis" in " ".join(project["optional-dependencies"]["dev"])
    # One progress library: rich (tqdm went with issue 22).
    assert "rich" in core and "tqdm" not in core


def test_every_suggested_extra_exists_and_installs_something():
    """Each `gad[name]` that an error message, the README, the docs or the Makefile suggests is
    an extra of pyproject.toml, and no extra is an empty alias."""
    import re

    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert all(extras.values()), [name for name, deps in extras.items() if not deps]
    files = [ROOT / "README.md", ROOT / "Makefile", *(ROOT / "docs").glob("*.md")]
    files += (ROOT / "src").rglob("*.py")
    suggested = {
        (path.name, name)
        for path in files
        for group in re.findall(r"gad\[([a-z_,{}]+)\]", path.read_text(encoding="utf-8"))
        for name in group.split(",")
    }
    assert ("loop.py", "{report_to}") in suggested  # the scan finds the tracker's line
    unknown = {(f, n) for f, n in suggested if n not in extras and n != "{report_to}"}
    assert not unknown


def test_missing_tracker_names_the_install_line(tmp_path, monkeypatch):
    import importlib.util

    from gad.train import loop

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(cfg.UserError, match=r"pip install 'gad\[wandb\]'"):
        loop.make_accelerator("no", "wandb", tmp_path)


def test_missing_pyarrow_names_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(chats.DataError, match=r"d.parquet: reading Parquet needs `pip install"):
        chats.read_records(tmp_path / "d.parquet")


def test_missing_reasoning_gym_names_the_install_line(monkeypatch):
    from gad.data import tasks

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(cfg.UserError, match=r"pip install 'gad\[reasoning\]'"):
        tasks.reasoning_gym_items("basic_arithmetic", 2, 0, {})


def test_quick_start_targets_use_the_project_venv(tmp_path):
    """`make demo` / `make test` / `make lint` make (once) and use a virtual environment, so
    they work where the system Python refuses pip installs (PEP 668)."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "v"
    # Under `make test` (CI) this runs as a sub-make: drop the parent's flags, and its
    # "Entering directory" lines, so the dry run prints the recipe alone.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo", "test", "lint", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"python3 -m venv {venv}")
    python = f"{venv}/bin/python"
    for command in ('-m pip install -q "torch==2.13.0"', "-m gad demo", "-m pytest", "-m ruff"):
        assert any(f"{python} {command}" in line for line in lines), command
    assert not any(line.startswith(("pip ", "ruff ", "gad ")) for line in lines)
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()
