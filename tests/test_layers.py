"""The package's layout, kept by a test: layers import only downward, no trainer imports
another trainer, and no module or function outgrows what one person reads in one go.

Layers (README, "How it is built"): base -> data and models -> engine, rollout, chat client
-> stages -> evaluation and report -> CLI. A module may import its own layer and the ones
below. Imports under `if TYPE_CHECKING:` count too: a type from a higher layer is a design
smell as much as a call into it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gad"

LAYERS: dict[str, int] = {
    # 0 base: configuration, run bookkeeping, pure losses
    "__init__": 0,
    "config": 0,
    "train_configs": 0,
    "setting_types": 0,
    "data_configs": 0,
    "tracking": 0,
    "losses": 0,
    "mixture": 0,
    "checkpoint": 0,
    # 1 data and models
    "data": 1,
    "dataset": 1,
    "evalsets": 1,
    "preflight": 1,
    "labels": 1,
    "tasks": 1,
    "models": 1,
    "packages": 1,
    "discriminator": 1,
    "lora": 1,
    "precision": 1,
    "journal": 1,
    "answers": 1,
    # 2 engine, rollout, chat client
    "engine": 2,
    "rollout": 2,
    "samples": 2,
    "chat": 2,
    "api_errors": 2,
    # 3 stages
    "sft": 3,
    "gad": 3,
    "gad_state": 3,
    "gad_stage": 3,
    "gad_models": 3,
    "whitebox": 3,
    "soda": 3,
    "health": 3,
    "selection": 3,
    "reward": 3,
    "teacher": 3,
    "judge": 3,
    "rating": 3,
    "label": 3,
    "toy": 3,
    # 4 evaluation and report
    "evaluate": 4,
    "eval_run": 4,
    "report": 4,
    # 5 CLI
    "demo": 5,
    "cli": 5,
    "__main__": 5,
}
LAYER_NAMES = ("base", "data/models", "engine", "stages", "evaluation", "CLI")

# The trainers: modules of one may not import modules of another.
TRAINERS: dict[str, str] = {
    "sft": "sft",
    "gad": "gad",
    "gad_state": "gad",
    "gad_stage": "gad",
    "gad_models": "gad",
    "whitebox": "gad",
    "soda": "gad",
    "health": "gad",
    "selection": "gad",
    "reward": "reward",
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def modules() -> list[Path]:
    return sorted(SRC.glob("*.py"))


def gad_imports(path: Path) -> set[str]:
    """The `gad` modules a file imports, anywhere in it (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "gad":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("gad."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gad.")}
    return found


def test_every_module_has_a_layer():
    missing = [p.stem for p in modules() if p.stem not in LAYERS]
    assert not missing, f"add to LAYERS (and README's layer list): {missing}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_imports_only_go_down(path: Path):
    mine = LAYERS[path.stem]
    upward = {
        name: LAYER_NAMES[LAYERS[name]]
        for name in gad_imports(path)
        if name in LAYERS and LAYERS[name] > mine
    }
    assert not upward, f"{path.stem} ({LAYER_NAMES[mine]}) imports from above: {upward}"


@pytest.mark.parametrize("path", [p for p in modules() if p.stem in TRAINERS], ids=lambda p: p.stem)
def test_no_trainer_imports_another(path: Path):
    own = TRAINERS[path.stem]
    others = {n for n in gad_imports(path) if TRAINERS.get(n, own) != own}
    assert not others, f"trainer {path.stem} imports another trainer: {others}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test above can fail: a data-layer file importing a stage is caught."""
    bad = tmp_path / "data.py"
    bad.write_text("def f():\n    from gad import sft\n    from gad.gad import update_d\n")
    assert gad_imports(bad) == {"sft", "gad"}
    assert all(LAYERS[n] > LAYERS["data"] for n in gad_imports(bad))


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_module_and_function_sizes(path: Path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: over {MAX_MODULE_LINES}"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_gad_method_fits_in_an_afternoon():
    assert len((SRC / "gad.py").read_text().splitlines()) <= 400
