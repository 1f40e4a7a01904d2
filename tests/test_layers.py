"""The package's layout, kept by a test: the sub-packages are the layers, and the plan is read
from the tree itself, not from a hand-kept list.

Each sub-package of `gad` says its layer in the first words of its docstring ("Layer 2, ...");
the modules at the top (`cli`, `demo`, `__main__`) sit above them all. A module may import its
own layer and the ones below, anywhere in the file (imports inside functions and under
`if TYPE_CHECKING:` count: a lazy import is still a dependency). No module takes part in an
import circle, inside a layer or across one. No trainer imports another trainer, and no module
or function outgrows what one person reads in one go.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gad"
TOP_LAYER = 5
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# The trainers: each owns a stage's step; none may import another's module.
TRAINERS = {
    "gad.train.sft": "sft",
    "gad.train.reward": "reward",
    **{f"gad.methods.{p.stem}": "gad" for p in (SRC / "methods").glob("*.py")},
}


def package_layer(package: Path) -> int:
    """The layer a sub-package's docstring declares ("Layer N, ...")."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    found = re.match(r"Layer (\d+)\b", doc)
    assert found, f"{package.name}/__init__.py: its docstring must start with 'Layer N, <job>'"
    return int(found[1])


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def layers(src: Path = SRC) -> dict[str, int]:
    """Every module's layer: its package's, or the top layer for `gad`'s own modules."""
    by_package = {p.name: package_layer(p) for p in src.iterdir() if (p / "__init__.py").exists()}
    found = {}
    for name in modules(src):
        package = name.split(".")[1] if "." in name else ""
        found[name] = by_package.get(package, TOP_LAYER)
    found["gad"] = 0
    return found


def gad_imports(path: Path, known: set[str]) -> set[str]:
    """The `gad` modules a file imports, anywhere in it. `from gad.pkg import mod` names the
    module when `mod` is one, else the package's `__init__`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gad" or node.module.startswith("gad."):
                for alias in node.names:
                    inner = f"{node.module}.{alias.name}"
                    found.add(inner if inner in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gad.")}
    return found - {"gad"}


def graph(src: Path = SRC) -> dict[str, set[str]]:
    mods = modules(src)
    return {name: gad_imports(path, set(mods)) for name, path in mods.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (strongly connected parts of more than one module, or a module that
    imports itself), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in edges.get(v, ()):
                found.append(sorted(part))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


MODULES = modules()
LAYERS = layers()
GRAPH = graph()


def test_every_package_declares_its_layer_and_no_module_is_loose():
    packages = [p for p in SRC.iterdir() if p.is_dir() and p.name not in ("assets", "__pycache__")]
    assert all((p / "__init__.py").exists() for p in packages), packages
    loose = [
        n
        for n, path in MODULES.items()
        if n.count(".") == 1 and path.parent == SRC and path.stem not in ("cli", "demo", "__main__")
    ]
    assert not loose, f"put these in the package of their layer: {loose}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_go_down(name: str):
    mine = LAYERS[name]
    upward = {other: LAYERS[other] for other in GRAPH[name] if LAYERS.get(other, 0) > mine}
    assert not upward, f"{name} (layer {mine}) imports from above: {upward}"


def test_no_import_circles():
    assert circles(GRAPH) == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n in TRAINERS))
def test_no_trainer_imports_another(name: str):
    own = TRAINERS[name]
    others = {n for n in GRAPH[name] if TRAINERS.get(n, own) != own}
    assert not others, f"trainer {name} imports another trainer: {others}"


def test_the_checker_sees_upward_imports_and_circles(tmp_path):
    """The tests above can fail: an upward import inside a function and a circle inside one
    layer (as `precision` and `models` once were) are both caught."""
    src = tmp_path / "gad"
    (src / "low").mkdir(parents=True)
    (src / "high").mkdir()
    (src / "__init__.py").write_text("")
    (src / "low" / "__init__.py").write_text('"""Layer 1, low."""\n')
    (src / "high" / "__init__.py").write_text('"""Layer 2, high."""\n')
    (src / "low" / "a.py").write_text("def f():\n    from gad.high import c\n")
    (src / "low" / "b.py").write_text("def g():\n    from gad.low.a import f\n")
    (src / "high" / "c.py").write_text("from gad.low import b\n")
    edges, found = graph(src), layers(src)
    assert edges["gad.low.a"] == {"gad.high.c"}
    assert found["gad.high.c"] > found["gad.low.a"]
    assert circles(edges) == [["gad.high.c", "gad.low.a", "gad.low.b"]]
    (src / "high" / "c.py").write_text("")
    (src / "low" / "b.py").write_text("from gad.low import a\n")
    (src / "low" / "a.py").write_text("def f():\n    from gad.low.b import g\n")
    assert circles(graph(src)) == [["gad.low.a", "gad.low.b"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_function_sizes(name: str):
    text = MODULES[name].read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{name}: over {MAX_MODULE_LINES} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
