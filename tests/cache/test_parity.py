"""Each cache against diffusers' own on the same weights: same decision at every step, same latents.

The oracle is diffusers' ``FluxTransformer2DModel`` holding the seeded weights, with the
cache diffusers ships at the same settings. Which modules ran at each step is read with
plain torch forward hooks on their first sub-layer in both libraries, so the comparison does
not trust either library's own bookkeeping.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch

from diffcaps import cache
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from tests.cache.loop import STEPS, denoise
from tests.flux_fixtures import PARITY_CONFIGS, diffusers_flux, flux_inputs, seeded_model

MODELS = ["dev-like", "schnell-like"]


class Clock:
    """The current timestep on diffusers' 0–1000 scale, for diffusers' ``current_timestep_callback``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _diffusers_config(kind: str, clock: Clock, settings: dict[str, Any]) -> Any:
    import diffusers.hooks as hooks

    classes = {
        "first_block_cache": hooks.FirstBlockCacheConfig,
        "pyramid_attention_broadcast": hooks.PyramidAttentionBroadcastConfig,
        "faster_cache": hooks.FasterCacheConfig,
        "taylorseer_cache": hooks.TaylorSeerCacheConfig,
        "mag_cache": hooks.MagCacheConfig,
    }
    if kind in ("pyramid_attention_broadcast", "faster_cache"):
        settings = dict(settings, current_timestep_callback=clock)
    if kind == "mag_cache" and "mag_ratios" in settings:
        settings = dict(settings, mag_ratios=list(settings["mag_ratios"]))
    return classes[kind](**settings)


def _ours_config(kind: str, settings: dict[str, Any]) -> cache.CacheConfig:
    classes: dict[str, Callable[..., cache.CacheConfig]] = {
        "first_block_cache": cache.FirstBlockCacheConfig,
        "pyramid_attention_broadcast": cache.PyramidAttentionBroadcastConfig,
        "faster_cache": cache.FasterCacheConfig,
        "taylorseer_cache": cache.TaylorSeerCacheConfig,
        "mag_cache": cache.MagCacheConfig,
    }
    return classes[kind](**settings)


def _diffusers_enter(model: Any, clock: Clock) -> Callable[[int, float], AbstractContextManager[Any]]:
    def enter(_: int, timestep: float) -> AbstractContextManager[Any]:
        clock.now = timestep
        context: AbstractContextManager[Any] = model.cache_context("cond")
        return context
    return enter


def _ours_enter(model: FluxTransformer2DModel) -> Callable[[int, float], AbstractContextManager[Any]]:
    def enter(_: int, timestep: float) -> AbstractContextManager[None]:
        return cache.context(model, "cond", timestep=timestep)
    return enter


@pytest.fixture(scope="module", params=MODELS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[FluxConfig, FluxTransformer2DModel, Any]]:
    config = PARITY_CONFIGS[request.param]
    ours = seeded_model(config, seed=3)
    yield config, ours, diffusers_flux(config, ours.state_dict())


def _calibrated_ratios(config: FluxConfig, ours: FluxTransformer2DModel) -> tuple[float, ...]:
    cache.enable(ours, cache.MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    try:
        denoise(ours, flux_inputs(config, height=8, width=8), _ours_enter(ours))
        return cache.calibrated_mag_ratios(ours, context="cond")
    finally:
        cache.disable(ours)


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "fbc": ("first_block_cache", {"threshold": 0.6}),
    "pab": ("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 3}),
    "pab-wide-range": ("pyramid_attention_broadcast",
                       {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (0, 990)}),
    "faster": ("faster_cache", {"spatial_attention_timestep_skip_range": (-1, 901), "is_guidance_distilled": True}),
    "taylorseer": ("taylorseer_cache", {"cache_interval": 3, "max_order": 2, "taylor_factors_dtype": torch.float32}),
    "taylorseer-defaults": ("taylorseer_cache", {}),
    "taylorseer-lite": ("taylorseer_cache", {"use_lite_mode": True}),
    "mag": ("mag_cache", {"threshold": 0.3, "num_inference_steps": STEPS, "max_skip_steps": 2}),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_same_decisions_and_latents_as_diffusers(case: str, pair: tuple[FluxConfig, FluxTransformer2DModel, Any]) -> None:
    config, ours, theirs = pair
    kind, settings = CASES[case]
    if kind == "mag_cache":
        settings = dict(settings, mag_ratios=_calibrated_ratios(config, ours))
    inputs = flux_inputs(config, height=8, width=8)
    clock = Clock()
    uncached, _ = denoise(ours, inputs, _ours_enter(ours))

    cache.enable(ours, _ours_config(kind, settings))
    theirs.enable_cache(_diffusers_config(kind, clock, settings))
    try:
        latents, ran = denoise(ours, inputs, _ours_enter(ours))
        expected, expected_ran = denoise(theirs, inputs, _diffusers_enter(theirs, clock))
        stats = cache.stats(ours)
    finally:
        cache.disable(ours)
        theirs.disable_cache()

    assert ran == expected_ran, "a step computed in one library and skipped in the other"
    assert (latents - expected).abs().max().item() <= 1e-5
    # the cache did something, and its own log agrees with what ran
    assert 0 < stats.skipped() and 0 < stats.computed()
    assert not torch.equal(latents, uncached)
    full = max(len(step) for step in ran)
    assert sum(len(step) < full for step in ran) > 0


def test_pab_timestep_from_callback_equals_timestep_from_context() -> None:
    config = PARITY_CONFIGS["dev-like"]
    model = seeded_model(config)
    inputs = flux_inputs(config, height=8, width=8)
    clock = Clock()
    results = []
    for callback in (None, clock):
        cache.enable(model, cache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                                  current_timestep_callback=callback))

        def enter(_: int, timestep: float, use_context: bool = callback is None) -> AbstractContextManager[None]:
            clock.now = timestep
            return cache.context(model, "cond", timestep=timestep if use_context else None)
        results.append(denoise(model, inputs, enter))
        cache.disable(model)
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def test_mag_cache_calibration_records_diffusers_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    import diffusers.hooks as hooks

    config = PARITY_CONFIGS["dev-like"]
    ours = seeded_model(config, seed=3)
    theirs = diffusers_flux(config, ours.state_dict())
    inputs = flux_inputs(config, height=8, width=8)
    theirs.enable_cache(hooks.MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    capsys.readouterr()
    denoise(theirs, inputs, lambda _, __: theirs.cache_context("cond"))
    printed = capsys.readouterr().out.strip().splitlines()
    expected = ast.literal_eval(printed[-1])

    ratios = _calibrated_ratios(config, ours)
    assert len(ratios) == STEPS
    assert ratios == pytest.approx(expected, rel=1e-6, abs=0)


def test_interpolated_ratios_match_diffusers_resampling() -> None:
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp

    from diffcaps.models.flux._cache import FLUX_MAG_RATIOS as OURS

    assert torch.tensor(OURS, dtype=torch.float32).tolist() == FLUX_MAG_RATIOS.tolist()
    for steps in (1, 4, 20, 28, 50):
        expected = nearest_interp(FLUX_MAG_RATIOS, steps).tolist()
        got = torch.tensor(cache.interpolate_mag_ratios(OURS, steps), dtype=torch.float32).tolist()
        assert got == expected
