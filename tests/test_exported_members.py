"""Each public namespace's ``__all__`` matches what it actually exports."""

from __future__ import annotations

import importlib

import pytest

NAMESPACES = ["diffcaps", "diffcaps.io", "diffcaps.errors", "diffcaps.protocols", "diffcaps.models.flux"]


@pytest.mark.parametrize("name", NAMESPACES)
def test_all_lists_public_names(name: str) -> None:
    module = importlib.import_module(name)
    def defined_here(value: object) -> bool:
        origin = getattr(value, "__module__", "") or ""
        return origin == name or origin.startswith(f"{name}._") or origin.startswith(f"{name}.model")

    public = {n for n, v in vars(module).items() if not n.startswith("_") and defined_here(v)}
    declared = set(module.__all__)
    assert declared <= set(vars(module)), f"{name}.__all__ names missing objects: {declared - set(vars(module))}"
    assert public <= declared | {"annotations"}, f"{name} exports names not in __all__: {public - declared}"


def test_import_diffcaps_does_not_import_heavy_dependencies() -> None:
    import subprocess
    import sys

    code = "import sys, diffcaps.models.flux; print(','.join(m for m in ('peft', 'diffusers', 'transformers', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_import_diffcaps_does_not_import_dynamo() -> None:
    import subprocess
    import sys

    code = "import sys, diffcaps.models.flux; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"  # torch.compile machinery costs ~1.5 s to import; features load it on use
