"""How much code a newcomer reads to follow one function: every function and class of `gad`
reachable from it by direct calls (`f(...)`, `module.f(...)`), with its lines, per module.

    python benchmarks/reading_path.py methods.gad gad_step      # this tree (sub-packages)
    python benchmarks/reading_path.py gad gad_step --src OLD/src/gad   # a flat tree before
    python benchmarks/reading_path.py gad adversarial.step_fn --src OLD/src/gad   # a closure

A static, name-based approximation: calls through attributes of objects (`m.rollout.generate`)
and library code are not followed. Prints one JSON line: total lines, files, lines per module.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gad"


def index(src: Path) -> tuple[dict, dict]:
    """Top-level definitions by (module, name), and each module's `gad` imports by alias.
    Modules are named by their path under the package (`methods.gad`, or `gad` in a flat tree),
    sub-packages included."""
    paths = {
        ".".join(p.relative_to(src).with_suffix("").parts): p for p in sorted(src.rglob("*.py"))
    }
    defs: dict[tuple[str, str], ast.AST] = {}
    imports: dict[str, dict[str, object]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text())
        imports[module] = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                defs[(module, node.name)] = node
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("gad"):
                continue
            package = node.module[4:]  # "" for `from gad import x`
            for a in node.names:
                inner = f"{package}.{a.name}" if package else a.name
                if inner in paths:  # a module: `from gad.methods import gad`
                    imports[module][a.asname or a.name] = inner
                elif package:  # a name: `from gad.methods.gad import gad_step`
                    imports[module][a.asname or a.name] = (package, a.name)
    return defs, imports


def callee(module: str, call: ast.Call, defs: dict, imports: dict) -> tuple[str, str] | None:
    fn, names = call.func, imports[module]
    if isinstance(fn, ast.Name):
        if (module, fn.id) in defs:
            return module, fn.id
        target = names.get(fn.id)
        return target if isinstance(target, tuple) else None
    if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
        other = names.get(fn.value.id)
        if isinstance(other, str) and (other, fn.attr) in defs:
            return other, fn.attr
    return None


def reachable(src: Path, module: str, name: str) -> dict[str, int]:
    """Lines per module of every definition reachable from `module.name` (`outer.inner` for a
    nested function)."""
    defs, imports = index(src)
    outer, _, inner = name.partition(".")
    start = defs[(module, outer)]
    if inner:
        start = next(n for n in ast.walk(start) if getattr(n, "name", None) == inner)
    seen: dict[tuple[str, int], int] = {}
    todo = [(module, start)]
    while todo:
        mod, node = todo.pop()
        if (mod, node.lineno) in seen:
            continue
        seen[(mod, node.lineno)] = node.end_lineno - node.lineno + 1
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            target = callee(mod, call, defs, imports)
            if target in defs:
                todo.append((target[0], defs[target]))
    per_module: dict[str, int] = {}
    for (mod, _), lines in seen.items():
        per_module[mod] = per_module.get(mod, 0) + lines
    return dict(sorted(per_module.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("module")
    parser.add_argument("function", help="name, or outer.inner for a nested function")
    parser.add_argument("--src", type=Path, default=SRC, help="the package folder to read")
    args = parser.parse_args()
    per_module = reachable(args.src, args.module, args.function)
    total = sum(per_module.values())
    print(json.dumps({"lines": total, "files": len(per_module), "per_module": per_module}))


if __name__ == "__main__":
    main()
