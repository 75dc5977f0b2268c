"""Regional compile: ``torch.compile`` each instance of a model's repeated block classes."""

from __future__ import annotations

from typing import Any, Final

from torch import nn

from diffcaps import checks
from diffcaps.compile._config import RegionalCompileConfig
from diffcaps.errors import CompileError
from diffcaps.protocols import SupportsRepeatedBlocks, require
from diffcaps.slots import InstanceSlot

__all__ = ["active", "disable", "enable"]

_SLOT: Final = InstanceSlot("regional_compile", RegionalCompileConfig)
_COMPILED: Final = "_compiled_call_impl"
"""Where ``nn.Module.compile()`` keeps the compiled call; clearing it is how torch's own tests undo it."""


def _blocks(model: SupportsRepeatedBlocks) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    module, service = require(model, "repeated_blocks")
    return module, service.find(module, "repeated_blocks")


def enable(model: SupportsRepeatedBlocks, config: RegionalCompileConfig | None = None) -> list[str]:
    """Compile every instance of the declared repeated blocks in place; returns their names.

    Blocks of one class share their compiled code (the compile cache is keyed by the code
    object), so cold start is about one block's compile per class instead of the whole
    model's. Enabling again recompiles with the new config.
    """
    config = RegionalCompileConfig() if config is None else config
    checks.instance(config, RegionalCompileConfig, "config", CompileError)
    module, blocks = _blocks(model)
    options: dict[str, Any] = {"backend": config.backend, "fullgraph": config.fullgraph, "dynamic": config.dynamic}
    if config.mode is not None:
        options["mode"] = config.mode
    if config.options is not None:
        options["options"] = dict(config.options)
    for _, block in blocks:
        block.compile(**options)
    _SLOT.set(module, config)
    return [name for name, _ in blocks]


def disable(model: SupportsRepeatedBlocks) -> None:
    """Run the repeated blocks eagerly again (nothing happens if they are not compiled)."""
    module, blocks = _blocks(model)
    for _, block in blocks:
        setattr(block, _COMPILED, None)  # torch has no public inverse of Module.compile()
    _SLOT.clear(module)


def active(model: SupportsRepeatedBlocks) -> RegionalCompileConfig | None:
    """The config the repeated blocks are compiled with, or ``None`` when they run eagerly."""
    module, blocks = _blocks(model)
    if any(getattr(block, _COMPILED, None) is None for _, block in blocks):
        return None
    return _SLOT.get(module)
