"""``enable``, ``disable``, ``context``, ``reset``, ``stats``: the cache functions, model first."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

import torch
from torch import nn

from diffcaps.cache._config import (
    CacheConfig,
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffcaps.cache._faster import plan_faster_cache
from diffcaps.cache._first_block import plan_first_block_cache
from diffcaps.cache._mag import plan_mag_cache
from diffcaps.cache._pyramid import plan_pyramid_attention_broadcast
from diffcaps.cache._service import CacheSupport
from diffcaps.cache._session import CacheSession
from diffcaps.cache._stats import CacheStats
from diffcaps.cache._targets import Placement
from diffcaps.cache._taylorseer import plan_taylorseer_cache
from diffcaps.errors import CacheError
from diffcaps.hooks import add_hook, remove_hook

if TYPE_CHECKING:
    from diffcaps.protocols import SupportsCache

__all__ = ["calibrated_mag_ratios", "context", "current", "disable", "enable", "reset", "stats"]

_SESSION: Final = "_diffcaps_cache"

_CONFIG_TYPES: Final = (FirstBlockCacheConfig, FasterCacheConfig, PyramidAttentionBroadcastConfig,
                        TaylorSeerCacheConfig, MagCacheConfig)
# caches whose state only makes sense per denoising pass: calls outside a context are an error
_NEED_CONTEXT: Final = (FirstBlockCacheConfig, TaylorSeerCacheConfig)


def _plan(model: nn.Module, support: CacheSupport, config: CacheConfig, session: CacheSession) -> list[Placement]:
    if isinstance(config, FirstBlockCacheConfig):
        return plan_first_block_cache(model, support, config, session)
    if isinstance(config, MagCacheConfig):
        return plan_mag_cache(model, support, config, session)
    if isinstance(config, PyramidAttentionBroadcastConfig):
        return plan_pyramid_attention_broadcast(model, support, config, session)
    if isinstance(config, FasterCacheConfig):
        return plan_faster_cache(model, support, config, session)
    return plan_taylorseer_cache(model, support, config, session)


def _unwrap(model: object) -> object:
    # ``torch.compile(model)`` returns a wrapper; the cache lives on the model inside it
    if type(model).__name__ == "OptimizedModule" and isinstance(model, nn.Module) and "_orig_mod" in model._modules:
        return model._modules["_orig_mod"]
    return model


def _require(model: object) -> CacheSupport:
    from diffcaps.protocols import require

    _, support = require(model, "cache")  # type: ignore[call-overload]
    assert isinstance(support, CacheSupport)
    return support


def _module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise CacheError(f"caches act on torch modules; got a {type(model).__name__}")
    return model


def _session(model: object) -> CacheSession | None:
    session: CacheSession | None = getattr(_unwrap(model), "__dict__", {}).get(_SESSION)
    return session


def _enabled(model: object) -> CacheSession:
    session = _session(model)
    if session is None:
        raise CacheError(f"no cache is enabled on this {type(model).__name__}; call diffcaps.cache.enable first")
    return session


def enable(model: SupportsCache, config: CacheConfig) -> None:
    """Switch on the cache ``config`` describes; the model must not have one already.

    A config that does not fit the model raises :class:`~diffcaps.errors.CacheError` and
    leaves the model untouched. Every function here also takes the ``torch.compile`` wrapper
    of a model and acts on the model inside it.
    """
    support = _require(model)
    module = _module(_unwrap(model))
    existing = _session(module)
    if existing is not None:
        raise CacheError(f"{type(module).__name__} already has {type(existing.config).__name__} enabled; "
                         "call diffcaps.cache.disable(model) before enabling another cache")
    if not isinstance(config, _CONFIG_TYPES):
        raise CacheError(f"{type(config).__name__} is not a cache config; use one of "
                         f"{', '.join(t.__name__ for t in _CONFIG_TYPES)}")
    if config.kind not in support.kinds():
        raise CacheError(f"{type(module).__name__} does not support {config.kind} (its CacheSupport allows "
                         f"{', '.join(support.kinds())})")
    session = CacheSession(config, requires_context=isinstance(config, _NEED_CONTEXT))
    placements = _plan(module, support, config, session)
    try:
        for target, name, hook in placements:
            add_hook(target, name, hook)
            session.placements.append((target, name, hook))
    except BaseException:
        _remove(session)
        raise
    module.__dict__[_SESSION] = session


def _remove(session: CacheSession) -> None:
    while session.placements:
        target, name, _ = session.placements.pop()
        remove_hook(target, name)


def disable(model: SupportsCache) -> CacheConfig | None:
    """Remove the cache and all its state; returns its config (``None`` if none was enabled).

    Afterwards every forward is the model's own again, so outputs equal an uncached model's.
    """
    module = _module(_unwrap(model))
    session = _session(module)
    if session is None:
        return None
    _remove(session)
    del module.__dict__[_SESSION]
    return session.config


def current(model: SupportsCache) -> CacheConfig | None:
    """The config of the enabled cache, or ``None``."""
    session = _session(model)
    return None if session is None else session.config


@contextmanager
def context(model: SupportsCache, name: str, *, timestep: float | torch.Tensor | None = None) -> Iterator[None]:
    """Run the model as denoising pass ``name`` ("cond", "uncond", …): each name keeps its own cache state.

    ``timestep`` is the step's timestep on the scale of the config's timestep ranges (diffusers
    uses the scheduler's 0–1000); Pyramid Attention Broadcast and FasterCache read it unless
    the config has a ``current_timestep_callback``. With no cache enabled this does nothing,
    so a denoising loop can always wrap its calls.
    """
    _require(model)
    session = _session(model)
    if session is None:
        yield
        return
    if not name:
        raise CacheError("a cache context needs a name, such as 'cond' or 'uncond'")
    value = None if timestep is None else float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) \
        else float(timestep)
    context, clock = session.context, session.clock
    outer_name, context.active = context.active, name
    outer_timestep, clock.now = clock.now, value
    try:
        yield
    finally:
        context.active, clock.now = outer_name, outer_timestep


def reset(model: SupportsCache) -> None:
    """Forget every cached output and counter, and the stats (start of a new generation)."""
    session = _session(model)
    if session is not None:
        session.reset()


def stats(model: SupportsCache) -> CacheStats:
    """What the enabled cache computed and skipped so far, per context and block group."""
    session = _enabled(model)
    return session.stats()


def calibrated_mag_ratios(model: SupportsCache) -> dict[str, tuple[float, ...]]:
    """The ratios a ``MagCacheConfig(calibrate=True)`` run measured, per context (complete runs only)."""
    session = _enabled(model)
    if not (isinstance(session.config, MagCacheConfig) and session.config.calibrate):
        raise CacheError(f"calibrated_mag_ratios needs MagCacheConfig(calibrate=True) enabled, "
                         f"not {type(session.config).__name__}")
    return dict(session.calibrations)
