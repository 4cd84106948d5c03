"""No import circles in edgekit (each package, and the whole): the graph of its modules' imports, module-level and inside
functions alike (a function-level import is a circle deferred, not removed), read with ast."""

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

from conftest import ROOT


def _modules(pkg_dir: Path) -> Dict[str, Path]:
    """dotted module name -> file, for every module under pkg_dir (packages by their __init__)."""
    out = {}
    for f in sorted(pkg_dir.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph(pkg_dir: Path) -> Dict[str, Set[str]]:
    """module -> the modules of the same package it imports anywhere in its body.

    `from edgekit.convert import onnx` names the submodule edgekit.convert.onnx; `from
    edgekit.convert import convert` (not a module) names the package edgekit.convert itself;
    `import a.b.c` and relative imports resolve to the deepest module of the package they name."""
    mods = _modules(pkg_dir)
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, f in mods.items():
        here = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in mods else origin for a in node.names]
            for name in names:
                while name not in mods and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in mods and name != mod:
                    graph[mod].add(name)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[Dict[str, List[str]]]:
    """The strongly connected components of more than one module, each as its edges inside it."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    out: List[Dict[str, List[str]]] = []

    def visit(v: str) -> None:       # Tarjan's algorithm; a package has a few dozen modules at most
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append({m: sorted(graph[m] & comp) for m in sorted(comp)})

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(comp: Dict[str, List[str]]) -> str:
    short = lambda m: m.rsplit(".", 1)[-1]  # noqa: E731
    return "{" + ", ".join(f"{short(m)} -> {'/'.join(map(short, deps))}" for m, deps in comp.items()) + "}"


def test_the_cycle_finder_finds_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    found = cycles(g)
    assert found == [{"a": ["b"], "b": ["c"], "c": ["a"]}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_and_from_package_imports():
    g = import_graph(ROOT / "edgekit" / "convert")
    assert "edgekit.convert.pipeline" in g["edgekit.convert"]          # from edgekit.convert.pipeline import ...
    assert "edgekit.convert.onnx" in g["edgekit.convert.rescue"]    # in a function: from edgekit.convert import onnx
    assert "edgekit.convert.sources" in g["edgekit.convert.pipeline"]


@pytest.mark.parametrize("package", ["convert", "cli", "runtime", "serve", "deploy", "optimize", "."])
def test_no_import_circle(package):
    found = cycles(import_graph((ROOT / "edgekit" / package).resolve()))
    assert not found, f"import circles in edgekit/{package}: " + "; ".join(map(_describe, found))
