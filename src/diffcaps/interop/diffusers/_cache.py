"""diffusers' cache config objects, read as diffcaps' (``cache_config``).

diffcaps' five cache configs have diffusers' field names and defaults, so a diffusers config
maps field by field. Whatever diffcaps cannot honour — a config type diffcaps has no cache
for (``TextKVCacheConfig``, ``SeaCacheConfig``), a field diffcaps' config lacks (a subclass,
a newer diffusers), a value diffcaps refuses — is an :class:`~diffcaps.errors.InteropError`
naming it, before any model is touched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import attrs

from diffcaps import cache
from diffcaps.errors import CacheError, InteropError

__all__ = ["cache_config"]

_OURS: Final[tuple[type[cache.CacheConfig], ...]] = (
    cache.FirstBlockCacheConfig, cache.FasterCacheConfig, cache.PyramidAttentionBroadcastConfig,
    cache.TaylorSeerCacheConfig, cache.MagCacheConfig,
)


def _counterparts() -> dict[type, type[cache.CacheConfig]]:
    """diffusers' config class → diffcaps' config class of the same name."""
    import diffusers.hooks as hooks

    return {getattr(hooks, ours.__name__): ours for ours in _OURS}


def cache_config(config: object) -> cache.CacheConfig:
    """The diffcaps cache config equal to ``config``, a diffusers cache config (or a diffcaps one, returned as is).

    ``diffusers.FirstBlockCacheConfig(threshold=0.1)`` becomes
    ``diffcaps.cache.FirstBlockCacheConfig(threshold=0.1)``, and likewise for FasterCache,
    Pyramid Attention Broadcast, TaylorSeer and MagCache (callbacks are kept as they are).
    """
    if isinstance(config, _OURS):
        return config
    known = _counterparts()
    ours = next((known[base] for base in type(config).__mro__ if base in known), None)
    name = f"{type(config).__module__}.{type(config).__qualname__}"
    if ours is None or not dataclasses.is_dataclass(config):
        raise InteropError(f"{name} is not a cache config diffcaps can run; diffcaps has "
                           f"{', '.join(t.__name__ for t in _OURS)} (diffusers' or diffcaps' classes)")
    by_alias = {field.alias: field.name for field in attrs.fields(ours)}
    values: dict[str, Any] = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    unknown = sorted(set(values) - set(by_alias))
    if unknown:
        raise InteropError(f"{name}: diffcaps' {ours.__name__} cannot honour {', '.join(unknown)} "
                           f"(it has {', '.join(sorted(by_alias))})")
    try:
        return ours(**values)
    except CacheError as refused:
        raise InteropError(f"{name}: {refused}") from refused
