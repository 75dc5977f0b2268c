"""``enable``, ``disable``, ``active``, ``context``, ``reset``, ``stats``: the cache functions, model first."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Final, cast

import torch
from torch import nn

from diffcaps import checks
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
from diffcaps.cache._targets import HookPlacement
from diffcaps.cache._taylorseer import plan_taylorseer_cache
from diffcaps.errors import CacheError, ContextError
from diffcaps.hooks import add_hook, remove_hook
from diffcaps.protocols import SupportsCache, require
from diffcaps.slots import InstanceSlot

__all__ = ["active", "calibrated_mag_ratios", "context", "disable", "enable", "reset", "stats"]

_CONFIG_TYPES: Final = (FirstBlockCacheConfig, FasterCacheConfig, PyramidAttentionBroadcastConfig,
                        TaylorSeerCacheConfig, MagCacheConfig)
# caches whose state only makes sense per denoising pass: calls outside a context are an error
_NEED_CONTEXT: Final = (FirstBlockCacheConfig, TaylorSeerCacheConfig)


def _plan(model: nn.Module, support: CacheSupport, config: CacheConfig, session: CacheSession) -> list[HookPlacement]:
    if isinstance(config, FirstBlockCacheConfig):
        return plan_first_block_cache(model, support, config, session)
    if isinstance(config, MagCacheConfig):
        return plan_mag_cache(model, support, config, session)
    if isinstance(config, PyramidAttentionBroadcastConfig):
        return plan_pyramid_attention_broadcast(model, support, config, session)
    if isinstance(config, FasterCacheConfig):
        return plan_faster_cache(model, support, config, session)
    return plan_taylorseer_cache(model, support, config, session)


_SLOT: Final = InstanceSlot("cache", CacheSession)


def enable(model: SupportsCache, config: CacheConfig) -> None:
    """Switch on the cache ``config`` describes; the model must not have one already.

    A config that does not fit the model raises :class:`~diffcaps.errors.CacheError` and
    leaves the model untouched. Every function here also takes the ``torch.compile`` wrapper
    of a model and acts on the model inside it.
    """
    module, support = require(model, "cache")
    existing = _SLOT.get(module)
    if existing is not None:
        raise CacheError(f"{type(module).__name__} already has {type(existing.config).__name__} enabled; "
                         "call diffcaps.cache.disable(model) before enabling another cache")
    given = cast(object, config)
    if not isinstance(given, _CONFIG_TYPES):
        raise CacheError(f"{type(given).__name__} is not a cache config; use one of "
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
    _SLOT.set(module, session)


def _remove(session: CacheSession) -> None:
    while session.placements:
        target, name, _ = session.placements.pop()
        remove_hook(target, name)


def disable(model: SupportsCache) -> None:
    """Remove the cache and all its state (nothing happens if no cache is on).

    Afterwards every forward is the model's own again, so outputs equal an uncached model's.
    """
    module, _ = require(model, "cache")
    session = _SLOT.clear(module)
    if session is not None:
        _remove(session)


def active(model: SupportsCache) -> CacheConfig | None:
    """The config of the enabled cache, or ``None``."""
    return None if (session := _session(model)) is None else session.config


def _session(model: SupportsCache) -> CacheSession | None:
    module, _ = require(model, "cache")
    return _SLOT.get(module)


def _enabled(model: SupportsCache) -> CacheSession:
    session = _session(model)
    if session is None:
        raise CacheError(f"no cache is enabled on this {type(model).__name__}; call diffcaps.cache.enable first")
    return session


@contextmanager
def context(model: SupportsCache, name: str, *, timestep: float | torch.Tensor | None = None) -> Generator[None]:
    """Run the model as denoising pass ``name`` ("cond", "uncond", …): each name keeps its own cache state.

    ``timestep`` is the step's timestep on the scale of the config's timestep ranges (diffusers
    uses the scheduler's 0–1000); Pyramid Attention Broadcast and FasterCache read it unless
    the config has a ``current_timestep_callback``. With no cache enabled this does nothing
    but check its arguments, so a denoising loop can always wrap its calls. A name that is not
    a non-empty string is a :class:`~diffcaps.errors.ContextError`.
    """
    given = cast(object, name)  # callers may ignore the annotation
    if not (isinstance(given, str) and given):
        raise ContextError(f"a cache context needs a name, a non-empty string such as 'cond' or 'uncond'; "
                           f"got {given!r} ({type(given).__name__})")
    value = _timestep(timestep)
    session = _session(model)
    if session is None:
        yield
        return
    context, clock = session.context, session.clock
    outer_name, context.active = context.active, name
    outer_timestep, clock.now = clock.now, value
    try:
        yield
    finally:
        context.active, clock.now = outer_name, outer_timestep


def _timestep(timestep: object) -> float | None:
    """The step as a float: from a number, or from the first element of a real tensor."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0 or timestep.is_complex() or timestep.dtype == torch.bool:
            raise CacheError(f"timestep must be a number or a non-empty real tensor, got a tensor of shape "
                             f"{list(timestep.shape)} and dtype {timestep.dtype}")
        return float(timestep.flatten()[0])
    return checks.number(timestep, "timestep", CacheError)


def reset(model: SupportsCache) -> None:
    """Forget every cached output and counter, and the stats (start of a new generation)."""
    session = _session(model)
    if session is not None:
        session.reset()


def stats(model: SupportsCache) -> CacheStats:
    """What the enabled cache computed and skipped so far, per context and block group."""
    session = _enabled(model)
    return session.stats()


def calibrated_mag_ratios(model: SupportsCache, context: str | None = None) -> tuple[float, ...]:
    """The ratios a ``MagCacheConfig(calibrate=True)`` run measured: ``mag_ratios`` for the next config.

    ``context`` names the denoising pass ("cond", …) whose complete run to return; it may be
    left out when one pass was calibrated (calls outside ``cache.context`` are ``"default"``).
    """
    session = _enabled(model)
    if not (isinstance(session.config, MagCacheConfig) and session.config.calibrate):
        raise CacheError(f"calibrated_mag_ratios needs MagCacheConfig(calibrate=True) enabled, "
                         f"not {type(session.config).__name__}")
    found = session.calibrations
    names = ", ".join(map(repr, found)) or "none"
    if context is None:
        if len(found) != 1:
            raise CacheError(f"calibrated contexts: {names}; pass context= to pick one" if found else
                             f"no complete calibration run yet ({session.config.num_inference_steps} steps)")
        return next(iter(found.values()))
    if context not in found:
        raise CacheError(f"no complete calibration run in context {context!r} (calibrated: {names})")
    return found[context]
