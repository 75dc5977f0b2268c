"""FasterCache, MagCache and TaylorSeer on Wan against diffusers' own on the same weights.

Same loop, call log and clock (``_cache_loop.py``) as ``test_caches_fbc_pab.py`` (First Block Cache and Pyramid
Attention Broadcast): which modules ran at each step is read with plain torch forward hooks,
so neither library's bookkeeping is trusted, and the final latents must agree.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from diffcaps import cache
from diffcaps.models.wan import WanConfig, WanTransformer3DModel
from tests.models.wan._cache_loop import STEPS, Clock, assert_same_as_diffusers, denoise, enters
from tests.wan_fixtures import I2V, T2V, diffusers_wan, seeded_model, wan_inputs


def _calibrated(model: WanTransformer3DModel, inputs: dict[str, torch.Tensor]) -> tuple[float, ...]:
    cache.enable(model, cache.MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    try:
        denoise(model, inputs, lambda t: cache.context(model, "cond", timestep=t))
        return cache.calibrated_mag_ratios(model, context="cond")
    finally:
        cache.disable(model)


WAN_ATTENTION = [r"blocks\.\d+\.attn[12]"]
"""Wan's self- and cross-attention, for diffusers' TaylorSeer: its default ``^blocks.*attn`` is
``re.fullmatch``-ed, so it names Flux's ``transformer_blocks.N.attn`` but none of Wan's
``blocks.N.attn1``/``attn2``. diffcaps' default (the declared attention classes) picks those."""

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "faster": ("faster_cache", {"spatial_attention_timestep_skip_range": (-1, 901), "is_guidance_distilled": True}),
    "taylorseer": ("taylorseer_cache", {"cache_interval": 3, "max_order": 2, "taylor_factors_dtype": torch.float32}),
    "taylorseer-defaults": ("taylorseer_cache", {}),
    "taylorseer-explicit": ("taylorseer_cache", {"cache_interval": 2, "cache_identifiers": (r"blocks\.\d+\.attn1",),
                                                 "skip_predict_identifiers": (r"blocks\.\d+\.ffn",)}),
    "taylorseer-lite": ("taylorseer_cache", {"use_lite_mode": True}),
    "mag": ("mag_cache", {"threshold": 0.3, "num_inference_steps": STEPS, "max_skip_steps": 2}),
}


def _configs(kind: str, settings: dict[str, Any], clock: Clock) -> tuple[cache.CacheConfig, Any]:
    import diffusers.hooks as hooks

    if kind == "faster_cache":
        return (cache.FasterCacheConfig(**settings),
                hooks.FasterCacheConfig(**settings, current_timestep_callback=clock))
    if kind == "taylorseer_cache":
        theirs = settings if "cache_identifiers" in settings or settings.get("use_lite_mode") else dict(
            settings, cache_identifiers=WAN_ATTENTION)
        return cache.TaylorSeerCacheConfig(**settings), hooks.TaylorSeerCacheConfig(**theirs)
    return (cache.MagCacheConfig(**settings),
            hooks.MagCacheConfig(**dict(settings, mag_ratios=list(settings["mag_ratios"]))))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("config", [T2V, I2V], ids=["t2v", "i2v"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_decisions_and_latents_as_diffusers(case: str, config: WanConfig) -> None:
    ours = seeded_model(config, seed=21)
    theirs = diffusers_wan(config, ours.state_dict())
    inputs = wan_inputs(config, seed=22)
    kind, settings = CASES[case]
    if kind == "mag_cache":
        settings = dict(settings, mag_ratios=_calibrated(ours, inputs))
    clock = Clock()
    assert_same_as_diffusers(ours, theirs, inputs, _configs(kind, settings, clock), clock)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_diffusers_default_taylorseer_identifiers_hook_nothing_on_wan() -> None:
    """Why the cases above give diffusers ``WAN_ATTENTION``: with its defaults every module runs at
    every step and the latents are the uncached ones."""
    import diffusers.hooks as hooks

    ours = seeded_model(T2V, seed=21)
    theirs = diffusers_wan(T2V, ours.state_dict())
    inputs = wan_inputs(T2V, seed=22)
    _, theirs_enter = enters(ours, theirs, Clock())
    uncached, all_ran = denoise(theirs, inputs, theirs_enter)
    theirs.enable_cache(hooks.TaylorSeerCacheConfig(cache_interval=3))
    try:
        latents, ran = denoise(theirs, inputs, theirs_enter)
    finally:
        theirs.disable_cache()
    assert ran == all_ran and len(set(ran)) == 1
    assert torch.equal(latents, uncached)
