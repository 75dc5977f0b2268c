"""Inference caches: skip work between denoising steps, one switch per model.

``enable(model, config)`` installs one cache (First Block Cache, FasterCache, Pyramid Attention
Broadcast, TaylorSeer or MagCache) from a frozen config whose fields and defaults are
diffusers'; ``context(model, name)`` keeps the state of each denoising pass ("cond",
"uncond") apart; ``stats(model)`` tells what was computed and skipped; ``active(model)`` gives the config in
force (``None`` when off); ``disable(model)`` restores every forward exactly. MagCache needs
per-model ratios: run once with ``MagCacheConfig(calibrate=True)``, then pass
``calibrated_mag_ratios(model)`` as ``MagCacheConfig(mag_ratios=...)``. A model says where its
blocks and attention are with a ``CacheSupport`` (:mod:`diffcaps.cache.spec`) in its
capabilities; this package never names a model class.

``torch.compile``: enable the cache before the first compiled call (the functions also take
the compiled wrapper and act on the model inside it). The hooked forwards are traced; each
decision runs outside the graph (:func:`diffcaps.hooks.eager`), so the graph breaks there:
First Block Cache and MagCache once per call at the first block (MagCache also at the last
block while calibrating); Pyramid Attention Broadcast, FasterCache and TaylorSeer at each
hooked attention call (TaylorSeer's predictions too); FasterCache's unconditional-batch
decision at the model's entry.
"""

from diffcaps.cache._api import (
    active as active,
    calibrated_mag_ratios as calibrated_mag_ratios,
    context as context,
    disable as disable,
    enable as enable,
    reset as reset,
    stats as stats,
)
from diffcaps.cache._config import (
    CacheConfig as CacheConfig,
    FasterCacheConfig as FasterCacheConfig,
    FirstBlockCacheConfig as FirstBlockCacheConfig,
    MagCacheConfig as MagCacheConfig,
    PyramidAttentionBroadcastConfig as PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig as TaylorSeerCacheConfig,
    interpolate_mag_ratios as interpolate_mag_ratios,
)
from diffcaps.cache._stats import CacheStats as CacheStats, GroupStats as GroupStats

__all__ = [
    "CacheConfig",
    "CacheStats",
    "FasterCacheConfig",
    "FirstBlockCacheConfig",
    "GroupStats",
    "MagCacheConfig",
    "PyramidAttentionBroadcastConfig",
    "TaylorSeerCacheConfig",
    "active",
    "calibrated_mag_ratios",
    "context",
    "disable",
    "enable",
    "interpolate_mag_ratios",
    "reset",
    "stats",
]
