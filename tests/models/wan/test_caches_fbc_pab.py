"""First Block Cache and Pyramid Attention Broadcast on Wan against diffusers' own on the same
weights: same compute/skip decisions, same latents (the loop is ``_cache_loop.py``). Wan needs no explicit identifiers: its one block list is ``blocks`` and its self- and
cross-attention are told apart by class here and by ``is_cross_attention`` in diffusers, so
diffusers' default identifiers (``blocks``) and diffcaps' match the same modules.
"""

from __future__ import annotations

from typing import Any

import pytest

from diffcaps import cache
from diffcaps.models.wan import WanConfig, WanTransformer3DModel
from tests.models.wan._cache_loop import Clock, assert_same_as_diffusers
from tests.wan_fixtures import I2V, T2V, diffusers_wan, seeded_model, wan_inputs


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
    ran = assert_same_as_diffusers(ours, theirs, inputs, _configs(kind, settings, clock), clock)
    if case == "pab-cross":  # cross-attention is skipped on its own schedule
        assert any(sum(n.endswith("attn2.to_q") for n in step) < config.num_layers for step in ran)


def test_cache_declaration() -> None:
    support = WanTransformer3DModel.declared_capabilities().cache
    assert [b.path for b in support.blocks] == ["blocks"]
    assert support.sample_format == "BCFHW" and support.output_projection == "proj_out"
    assert set(support.kinds()) >= {"first_block_cache", "pyramid_attention_broadcast"}
