"""Type-checked, never run: the cache and hook APIs accept models that declare caches, and nothing else.

Lines that must fail carry ``# type: ignore[<code>]``; mypy --strict reports an unused
ignore, so a line that starts to pass fails the check.
"""

from __future__ import annotations

from typing import Any, assert_type

import torch
from torch import nn

from diffcaps import cache
from diffcaps.cache import (
    CacheConfig,
    CacheStats,
    FasterCacheConfig,
    FirstBlockCacheConfig,
    GroupStats,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffcaps.cache.spec import CacheSupport
from diffcaps.hooks import ContextualState, Forward, Hook, StateContext, add_hook, eager, get_hook, remove_hook
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.protocols import SupportsCache, supports_cache
from tests.custom_model import TinyDiT, TinyDiTConfig

flux = FluxTransformer2DModel(FluxConfig())
tiny = TinyDiT(TinyDiTConfig())

# --- Flux declares caches; the functions take it and say what they return ----------------------
assert_type(FluxTransformer2DModel.declared_capabilities().cache, CacheSupport)
assert_type(cache.enable(flux, FirstBlockCacheConfig(threshold=0.1)), None)
assert_type(cache.disable(flux), None)
assert_type(cache.active(flux), CacheConfig | None)
assert_type(cache.stats(flux), CacheStats)
assert_type(cache.stats(flux).contexts["cond"]["transformer_blocks"], GroupStats)
assert_type(cache.stats(flux).skipped(context="cond"), int)
assert_type(cache.calibrated_mag_ratios(flux), tuple[float, ...])
assert_type(cache.calibrated_mag_ratios(flux, context="cond"), tuple[float, ...])
MagCacheConfig(mag_ratios=cache.calibrated_mag_ratios(flux), num_inference_steps=28)
assert_type(cache.reset(flux), None)
with cache.context(flux, "cond", timestep=500.0):
    pass
with cache.context(flux, "uncond", timestep=torch.tensor([0.5])):
    pass
for config in (FasterCacheConfig(is_guidance_distilled=True), PyramidAttentionBroadcastConfig(),
               TaylorSeerCacheConfig(cache_identifiers=["x"]), MagCacheConfig(calibrate=True)):
    cache.enable(flux, config)
assert_type(cache.interpolate_mag_ratios([1.0, 1.1], 4), tuple[float, ...])


def generic(model: SupportsCache) -> None:
    cache.enable(model, FirstBlockCacheConfig())


def narrowed(model: object) -> None:
    if supports_cache(model):
        cache.enable(model, FirstBlockCacheConfig())


# --- a model that declares no cache is rejected by mypy --------------------------------------
cache.enable(tiny, FirstBlockCacheConfig())  # type: ignore[arg-type]
cache.stats(tiny)  # type: ignore[arg-type]
cache.context(tiny, "cond")  # type: ignore[arg-type]
cache.enable(nn.Linear(2, 2), FirstBlockCacheConfig())  # type: ignore[arg-type]
cache.enable(FluxTransformer2DModel, FirstBlockCacheConfig())  # type: ignore[arg-type]
cache.active(FluxTransformer2DModel)  # type: ignore[arg-type]

# --- only cache configs, built by keyword, frozen --------------------------------------------
cache.enable(flux, object())  # type: ignore[arg-type]
FirstBlockCacheConfig(0.1)  # type: ignore[call-arg]
FirstBlockCacheConfig(threshold="high")  # type: ignore[arg-type]
FirstBlockCacheConfig().threshold = 0.2  # type: ignore[misc]
with cache.context(flux, 1):  # type: ignore[arg-type]
    pass


# --- hooks are typed ----------------------------------------------------------------------------
class Double(Hook):
    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        return 2 * forward(*args, **kwargs)


linear = nn.Linear(2, 2)
assert_type(add_hook(linear, "double", Double()), None)
assert_type(get_hook(linear, "double"), Hook | None)
assert_type(get_hook(linear, "double", Double), Double | None)
assert_type(remove_hook(linear, "double"), Hook)
add_hook(linear, "double", object())  # type: ignore[arg-type]
context = StateContext(default="default")
counts: ContextualState[dict[str, int]] = ContextualState(dict, context)
assert_type(counts.get(), dict[str, int])
assert_type(context.current, str)


@eager
def decide(step: int, *, threshold: float) -> bool:
    return step > threshold


assert_type(decide(3, threshold=0.5), bool)
decide("3", threshold=0.5)  # type: ignore[arg-type]
