"""Regional compile: ``torch.compile`` each instance of a model's repeated block classes."""

from __future__ import annotations

from typing import Any

from torch import nn

from diffcaps._blocks import matching_modules
from diffcaps._service import ModuleTypes
from diffcaps.protocols import SupportsRepeatedBlocks, require

__all__ = ["compile_repeated_blocks", "compiled_blocks", "uncompile_repeated_blocks"]


def _blocks(model: SupportsRepeatedBlocks) -> list[tuple[str, nn.Module]]:
    service = require(model, "repeated_blocks", ModuleTypes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return matching_modules(model, service, "repeated_blocks")


def compile_repeated_blocks(model: SupportsRepeatedBlocks, **compile_kwargs: Any) -> list[str]:
    """Compile every instance of the declared repeated blocks in place; returns their names.

    Blocks of one class share their compiled code (the compile cache is keyed by the code
    object), so cold start is about one block's compile per class instead of the whole
    model's. ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, …).
    """
    blocks = _blocks(model)
    for _, block in blocks:
        block.compile(**compile_kwargs)
    return [name for name, _ in blocks]


def uncompile_repeated_blocks(model: SupportsRepeatedBlocks) -> None:
    """Run the repeated blocks eagerly again."""
    for _, block in _blocks(model):
        block._compiled_call_impl = None


def compiled_blocks(model: SupportsRepeatedBlocks) -> list[str]:
    """Names of the repeated blocks that are compiled now."""
    return [name for name, block in _blocks(model) if block._compiled_call_impl is not None]
