"""Imports flow one way (DESIGN.md): no module of diffcaps imports itself through others.

Every import counts, those inside functions too (a lazy import hides a cycle from import time,
not from the design); only ``if TYPE_CHECKING:`` blocks are left out. Features that refuse each
other ask ``slots.holding`` instead of importing each other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import diffcaps

_ROOT = Path(diffcaps.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, known: set[str]) -> Iterator[str]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            for branch in node.orelse:
                yield from _imported(branch, known)
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None \
                and node.module.split(".")[0] == "diffcaps":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield submodule if submodule in known else node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "diffcaps")
        yield from _imported(node, known)


def _packages(name: str) -> Iterator[str]:
    # importing diffcaps.lora.spec first runs diffcaps/lora/__init__.py (and diffcaps/__init__.py)
    parts = name.split(".")
    yield from (".".join(parts[:end]) for end in range(1, len(parts)))


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in _ROOT.rglob("*.py")}
    known = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        own = {name, *_packages(name)}  # a module's own packages are already running when it runs
        targets = set(_imported(ast.parse(path.read_text()), known))
        targets |= {package for target in targets for package in _packages(target)}
        graph[name] = {target for target in targets if target in known and target not in own}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    path: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_module_imports_itself_through_others() -> None:
    cycles = [" -> ".join(cycle) for cycle in _cycles(_graph())]
    assert cycles == []


def test_the_check_sees_lazy_imports_and_skips_type_checking_blocks() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from diffcaps.model import Model\n"
        "def f():\n    from diffcaps import lora\n"
        "from diffcaps.io import read_header\n"
    )
    known = {"diffcaps.model", "diffcaps.lora", "diffcaps.io"}
    assert sorted(_imported(tree, known)) == ["diffcaps.io", "diffcaps.lora"]
    assert list(_packages("diffcaps.lora.spec")) == ["diffcaps", "diffcaps.lora"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
