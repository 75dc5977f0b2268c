"""The package layout rules that keep a new model folder self-contained, checked on the source.

- Nothing imports another package's private module (``diffcaps.lora._load`` from outside
  ``diffcaps.lora``): a package's ``__init__`` or ``spec`` is its door.
- A feature package never imports a model folder, and a model folder never imports another.
- Only ``diffcaps.interop`` may import diffusers (it is the test oracle everywhere else).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "diffcaps"
MODULES = sorted(SRC.rglob("*.py"))


def _owner(parts: tuple[str, ...]) -> tuple[str, ...]:
    """The unit that owns a module: ``("models", "flux")`` for a model folder, else the package."""
    if parts[:1] == ("models",) and len(parts) > 2:
        return parts[:2]
    return parts[:1] if len(parts) > 1 else ()


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def _here(path: Path) -> tuple[str, ...]:
    return path.relative_to(SRC).with_suffix("").parts


def test_the_walk_finds_the_source() -> None:
    assert len(MODULES) > 50 and any(p.name == "model.py" for p in MODULES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_of_another_packages_private_module(path: Path) -> None:
    owner = _owner(_here(path))
    wrong = []
    for line, name in _imports(path):
        parts = tuple(name.split("."))
        if parts[0] != "diffcaps" or len(parts) < 2:
            continue
        target = parts[1:]
        private_at = next((i for i, part in enumerate(target) if part.startswith("_")), None)
        if private_at is None or private_at == 0:
            continue  # public, or a core private module of diffcaps itself
        if _owner(target[: private_at + 1]) != owner:
            wrong.append(f"line {line}: {name}")
    assert not wrong, f"{path.relative_to(SRC)} reaches into another package's private module: {wrong}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_model_folders_stay_apart_and_features_name_no_model(path: Path) -> None:
    here = _here(path)
    for line, name in _imports(path):
        parts = tuple(name.split("."))
        if parts[:2] != ("diffcaps", "models") or len(parts) < 3:
            continue
        if not (SRC / "models" / parts[2]).is_dir():
            continue  # a name from the model registry (diffcaps.models' __init__), not a model folder
        if here[:1] == ("models",) and len(here) > 2:
            assert parts[2] == here[1], (
                f"{path.relative_to(SRC)} line {line} imports another model folder: {name}")
        else:
            assert here[:1] in (("models",), ("cli",), ("demo",), ("interop",)), (
                f"{path.relative_to(SRC)} line {line}: a feature package imports a model folder ({name})")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_only_interop_imports_diffusers(path: Path) -> None:
    if _here(path)[:1] == ("interop",):
        return
    hits = [line for line, name in _imports(path) if name.split(".")[0] == "diffusers"]
    assert not hits, f"{path.relative_to(SRC)} imports diffusers at lines {hits}"
