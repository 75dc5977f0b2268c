"""Caches with LoRA adapters loaded (peft layers in place of Linear) and under torch.compile."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from diffcaps import cache
from tests.cache.loop import denoise
from tests.cache.test_parity import Clock, _diffusers_enter, _ours_enter
from tests.flux_fixtures import TINY, diffusers_flux, flux_inputs, seeded_model

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp"]


def _inject_lora(model: nn.Module) -> None:
    """A peft LoRA adapter with non-zero, seeded weights (the same for any model with these names)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("order", ["adapter-then-cache", "cache-then-adapter"])
def test_first_block_cache_with_a_lora_adapter_matches_diffusers(order: str) -> None:
    ours = seeded_model(TINY, seed=3)
    theirs = diffusers_flux(TINY, ours.state_dict())
    inputs = flux_inputs(TINY, height=8, width=8)
    plain, _ = denoise(ours, inputs, _ours_enter(ours))
    import diffusers.hooks as hooks

    config = cache.FirstBlockCacheConfig(threshold=0.6)
    if order == "adapter-then-cache":
        _inject_lora(ours)
        cache.enable(ours, config)
    else:
        cache.enable(ours, config)
        _inject_lora(ours)
    _inject_lora(theirs)
    theirs.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.6))
    assert any("lora_A" in name for name, _ in ours.named_parameters())

    latents, ran = denoise(ours, inputs, _ours_enter(ours))
    expected, expected_ran = denoise(theirs, inputs, _diffusers_enter(theirs, Clock()))
    assert ran == expected_ran
    assert (latents - expected).abs().max().item() <= 1e-5
    assert cache.stats(ours).skipped() > 0

    cache.disable(ours)
    theirs.disable_cache()
    uncached_lora, _ = denoise(ours, inputs, _ours_enter(ours))
    expected_uncached, _ = denoise(theirs, inputs, _diffusers_enter(theirs, Clock()))
    assert torch.equal(uncached_lora, expected_uncached)
    assert not torch.equal(uncached_lora, plain)  # the adapter is live


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("config", [
    cache.FirstBlockCacheConfig(threshold=0.8),
    cache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2),
], ids=lambda c: type(c).__name__)
def test_compiled_model_with_a_cache_gives_the_same_result(config: Any) -> None:
    """Dynamo traces the hooked forwards; each cache's decision runs eagerly, between graphs."""
    inputs = flux_inputs(TINY, height=8, width=8)
    model = seeded_model(TINY)
    cache.enable(model, config)
    eager, eager_ran = denoise(model, inputs, _ours_enter(model), steps=10)
    eager_stats = cache.stats(model)
    cache.reset(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    ts = torch.linspace(1.0, 0.0, 11)
    x = inputs["hidden_states"].clone()
    with torch.no_grad():
        for i in range(10):
            with cache.context(model, "cond", timestep=float(ts[i]) * 1000):
                out = compiled(**dict(inputs, hidden_states=x, timestep=ts[i].expand(1)), return_dict=False)[0]
            x = x + (ts[i + 1] - ts[i]) * out
    assert torch.equal(x, eager)
    assert cache.stats(model) == eager_stats and eager_stats.skipped() > 0
    torch._dynamo.reset()
