"""``enable`` / ``disable`` gradient checkpointing on a model's declared blocks."""

from __future__ import annotations

from typing import Any, Final

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffcaps._blocks import matching_modules
from diffcaps.checkpointing._service import GradientCheckpointing
from diffcaps.hooks import Forward, Hook, add_hook, get_hook, remove_hook
from diffcaps.protocols import SupportsGradientCheckpointing, require

__all__ = ["disable", "enable", "is_enabled"]

HOOK_NAME: Final = "gradient_checkpointing"


class CheckpointHook(Hook):
    """Runs the block under non-reentrant activation checkpointing while grad is enabled."""

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)


def _blocks(model: SupportsGradientCheckpointing) -> list[nn.Module]:
    service = require(model, "gradient_checkpointing", GradientCheckpointing)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return [module for _, module in matching_modules(model, service.blocks, "gradient_checkpointing")]


def enable(model: SupportsGradientCheckpointing) -> None:
    """Recompute the declared blocks' activations in backward instead of storing them.

    Only while grad is enabled; inference under ``torch.no_grad()`` runs as before.
    Enabling twice is harmless.
    """
    for block in _blocks(model):
        if get_hook(block, HOOK_NAME) is None:
            add_hook(block, HOOK_NAME, CheckpointHook())


def disable(model: SupportsGradientCheckpointing) -> None:
    """Store activations again; the blocks' forwards are restored exactly."""
    for block in _blocks(model):
        if get_hook(block, HOOK_NAME) is not None:
            remove_hook(block, HOOK_NAME)


def is_enabled(model: SupportsGradientCheckpointing) -> bool:
    """Whether the declared blocks run under checkpointing."""
    return all(get_hook(block, HOOK_NAME) is not None for block in _blocks(model))
