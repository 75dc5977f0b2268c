"""``enable`` / ``disable`` / ``active`` / ``backend``: which kernel a model's attention modules run."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

from torch import nn

from diffcaps import checks, parallel
from diffcaps.attention._backends import BackendName, kernel_for, missing
from diffcaps.attention._config import AttentionConfig
from diffcaps.errors import AttentionError
from diffcaps.layers import set_attention_kernel
from diffcaps.protocols import SupportsAttention, require, supports_context_parallel, unwrap_compiled
from diffcaps.slots import InstanceSlot

__all__ = ["active", "backend", "disable", "enable"]

_SLOT: InstanceSlot[AttentionConfig] = InstanceSlot("attention", AttentionConfig)


def _attention_modules(model: SupportsAttention) -> list[nn.Module]:
    module, service = require(model, "attention")
    return [found for _, found in service.modules.find(module, "attention")]


def _context_parallel_on(module: nn.Module) -> bool:
    return supports_context_parallel(module) and parallel.active(module) is not None


def enable(model: SupportsAttention, config: AttentionConfig | None = None) -> None:
    """Run every declared attention module through ``config.backend``.

    A backend the model does not declare, or whose package or device is missing, is refused
    with an :class:`~diffcaps.errors.AttentionError` (saying what to install) before anything
    changes; so is one other than ``sdpa``/``math`` while context parallelism is enabled.
    Enabling again replaces the backend in force.
    """
    config = AttentionConfig() if config is None else config
    checks.instance(config, AttentionConfig, "config", AttentionError)
    module, service = require(model, "attention")
    name = config.backend
    if name not in service.backends:
        raise AttentionError(f"{type(module).__name__} does not declare the {name!r} attention backend; "
                             f"it declares {', '.join(service.backends)}")
    lacking = missing(name)
    if lacking is not None:
        raise AttentionError(f"the {name!r} attention backend cannot run: {lacking}")
    kernel = kernel_for(name)
    if kernel is not None and not kernel.context_parallel and _context_parallel_on(module):
        raise AttentionError(f"context parallelism is enabled, and its ring attention cannot run the {name!r} "
                             "backend (it needs each block's log-sum-exp: only 'sdpa' and 'math' run with it); "
                             "call diffcaps.parallel.disable(model) first")
    for found in _attention_modules(model):
        set_attention_kernel(found, kernel)
    _SLOT.set(module, config)


def disable(model: SupportsAttention) -> None:
    """Run the default (``sdpa``) again on every declared attention module (nothing happens if off)."""
    module, _ = require(model, "attention")
    for found in _attention_modules(model):
        set_attention_kernel(found, None)
    _SLOT.clear(module)


def active(model: SupportsAttention) -> AttentionConfig | None:
    """The config in force, or ``None`` when the model runs the default; never raises."""
    module = unwrap_compiled(model)
    return _SLOT.get(module) if isinstance(module, nn.Module) else None


@contextmanager
def backend(model: SupportsAttention, name: BackendName) -> Generator[None]:
    """Run ``name`` inside the ``with`` block, then what was in force before (checked as ``enable`` does)."""
    previous = active(model)
    enable(model, AttentionConfig(backend=name))
    try:
        yield
    finally:
        if previous is None:
            disable(model)
        else:
            enable(model, previous)
