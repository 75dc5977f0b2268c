"""``enable`` / ``disable`` / ``active``: gradient checkpointing on a model's declared blocks."""

from __future__ import annotations

from typing import Any, Final

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffcaps import checks
from diffcaps.checkpointing._config import CheckpointingConfig
from diffcaps.errors import CheckpointingError
from diffcaps.hooks import Forward, Hook, add_hook, get_hook, remove_hook
from diffcaps.protocols import SupportsGradientCheckpointing, require

__all__ = ["active", "disable", "enable"]

HOOK_NAME: Final = "gradient_checkpointing"


class CheckpointHook(Hook):
    """Runs the block under non-reentrant activation checkpointing while grad is enabled."""

    def __init__(self, config: CheckpointingConfig) -> None:
        self.config = config

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)


def _blocks(model: SupportsGradientCheckpointing) -> list[nn.Module]:
    module, service = require(model, "gradient_checkpointing")
    return [block for _, block in service.blocks.find(module, "gradient_checkpointing")]


def enable(model: SupportsGradientCheckpointing, config: CheckpointingConfig | None = None) -> None:
    """Recompute the declared blocks' activations in backward instead of storing them.

    Only while grad is enabled; inference under ``torch.no_grad()`` runs as before.
    Enabling again replaces the config in force.
    """
    config = CheckpointingConfig() if config is None else config
    checks.instance(config, CheckpointingConfig, "config", CheckpointingError)
    for block in _blocks(model):
        if get_hook(block, HOOK_NAME) is not None:
            remove_hook(block, HOOK_NAME)
        add_hook(block, HOOK_NAME, CheckpointHook(config))


def disable(model: SupportsGradientCheckpointing) -> None:
    """Store activations again; the blocks' forwards are restored exactly (nothing happens if off)."""
    for block in _blocks(model):
        if get_hook(block, HOOK_NAME) is not None:
            remove_hook(block, HOOK_NAME)


def active(model: SupportsGradientCheckpointing) -> CheckpointingConfig | None:
    """The config in force, or ``None`` when the declared blocks run without checkpointing."""
    hooks = [get_hook(block, HOOK_NAME) for block in _blocks(model)]
    first = hooks[0]
    if isinstance(first, CheckpointHook) and all(hook is not None for hook in hooks):
        return first.config
    return None
