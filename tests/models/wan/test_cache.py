"""Wan's caches against diffusers' own on the same weights: same compute/skip decisions, same latents.

Which modules ran at each step is read with plain torch forward hooks on the first sub-layer of
each block and attention (same names in both libraries), so neither library's bookkeeping is
trusted. Wan needs no explicit identifiers: its one block list is ``blocks`` and its self- and
cross-attention are told apart by class here and by ``is_cross_attention`` in diffusers, so
diffusers' default identifiers (``blocks``) and diffcaps' match the same modules.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch
from torch import Tensor

from diffcaps import cache
from diffcaps.models.wan import WanConfig, WanTransformer3DModel
from tests.cache.loop import call_log
from tests.wan_fixtures import I2V, T2V, diffusers_wan, seeded_model, wan_inputs

STEPS = 12
RAN = (".norm1", "attn1.to_q", "attn2.to_q")
Enter = Callable[[float], AbstractContextManager[Any]]


class Clock:
    """The current timestep, for diffusers' ``current_timestep_callback`` (typed there as returning int)."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def denoise(model: torch.nn.Module, inputs: dict[str, Tensor], enter: Enter) -> tuple[Tensor, list[tuple[str, ...]]]:
    """A fixed Euler loop from t=1000 to 0 on 4 latent channels; the final latents and, per step,
    which modules ran."""
    ts = torch.linspace(1.0, 0.0, STEPS + 1)
    # an image-to-video model sees its conditioning channels after the noisy latents, unchanged
    x, condition = inputs["hidden_states"][:, :4], inputs["hidden_states"][:, 4:]
    ran: list[tuple[str, ...]] = []
    with call_log(model, RAN) as log, torch.no_grad():
        for i in range(STEPS):
            log.clear()
            t = float(ts[i]) * 1000
            with enter(t):
                out: Tensor = model(**dict(inputs, hidden_states=torch.cat([x, condition], dim=1),
                                           timestep=torch.full((x.shape[0],), t)), return_dict=False)[0]
            ran.append(tuple(log))
            x = x + (ts[i + 1] - ts[i]) * out
    return x, ran


def _cases() -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "fbc": ("first_block_cache", {"threshold": 0.3}),
        "pab": ("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 3,
                                                "spatial_attention_timestep_skip_range": (100, 950)}),
        "pab-cross": ("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 2,
                                                      "cross_attention_block_skip_range": 3,
                                                      "spatial_attention_timestep_skip_range": (0, 990),
                                                      "cross_attention_timestep_skip_range": (0, 990)}),
    }


def _configs(kind: str, settings: dict[str, Any], clock: Clock) -> tuple[cache.CacheConfig, Any]:
    import diffusers.hooks as hooks

    if kind == "first_block_cache":
        return cache.FirstBlockCacheConfig(**settings), hooks.FirstBlockCacheConfig(**settings)
    return (cache.PyramidAttentionBroadcastConfig(**settings),
            hooks.PyramidAttentionBroadcastConfig(**settings, current_timestep_callback=clock))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("config", [T2V, I2V], ids=["t2v", "i2v"])
@pytest.mark.parametrize("case", list(_cases()))
def test_same_decisions_and_latents_as_diffusers(case: str, config: WanConfig) -> None:
    ours = seeded_model(config, seed=21)
    theirs = diffusers_wan(config, ours.state_dict())
    inputs = wan_inputs(config, seed=22)
    kind, settings = _cases()[case]
    clock = Clock()

    def ours_enter(t: float) -> AbstractContextManager[None]:
        return cache.context(ours, "cond", timestep=t)

    def theirs_enter(t: float) -> AbstractContextManager[Any]:
        clock.now = round(t)
        context: AbstractContextManager[Any] = theirs.cache_context("cond")
        return context

    uncached, _ = denoise(ours, inputs, ours_enter)
    our_config, their_config = _configs(kind, settings, clock)
    cache.enable(ours, our_config)
    theirs.enable_cache(their_config)
    try:
        latents, ran = denoise(ours, inputs, ours_enter)
        expected, expected_ran = denoise(theirs, inputs, theirs_enter)
        stats = cache.stats(ours)
    finally:
        cache.disable(ours)
        theirs.disable_cache()

    assert ran == expected_ran, "a module computed in one library and skipped in the other"
    assert (latents - expected).abs().max().item() <= 1e-5
    assert 0 < stats.skipped() and 0 < stats.computed()
    assert not torch.equal(latents, uncached)
    full = max(len(step) for step in ran)
    assert sum(len(step) < full for step in ran) > 0
    if case == "pab-cross":  # cross-attention is skipped on its own schedule
        assert any(sum(n.endswith("attn2.to_q") for n in step) < config.num_layers for step in ran)


def test_cache_declaration() -> None:
    support = WanTransformer3DModel.declared_capabilities().cache
    assert [b.path for b in support.blocks] == ["blocks"]
    assert support.sample_format == "BCFHW" and support.output_projection == "proj_out"
    assert set(support.kinds()) >= {"first_block_cache", "pyramid_attention_broadcast"}
