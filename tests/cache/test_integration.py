"""Caches with LoRA adapters loaded (``diffcaps.lora`` or raw peft layers in place of Linear) and under torch.compile."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffcaps import cache
from tests.cache.loop import denoise
from tests.cache.test_parity import Clock, _diffusers_enter, _ours_enter
from tests.flux_fixtures import TINY, diffusers_flux, flux_inputs, seeded_model

TARGETS = ("attn.to_q", "attn.to_v", "attn.add_k_proj", "proj_mlp")


def _lora_state(model: nn.Module) -> dict[str, Tensor]:
    """A diffusers/PEFT-layout LoRA for ``model``'s attention and MLP projections, non-zero and seeded."""
    generator = torch.Generator().manual_seed(5)
    state = {}
    for name, module in model.named_modules():
        if name.endswith(TARGETS) and isinstance(module, nn.Linear):
            state[f"transformer.{name}.lora_A.weight"] = 0.2 * torch.randn(4, module.in_features, generator=generator)
            state[f"transformer.{name}.lora_B.weight"] = 0.2 * torch.randn(module.out_features, 4, generator=generator)
    return state


def _inject_peft(model: nn.Module, state: dict[str, Tensor]) -> None:
    """A raw peft adapter (peft layers replace the Linear modules) holding ``state``'s weights."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=[t.split(".")[-1] for t in TARGETS]), model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            key = f"transformer.{name.replace('.default', '')}"
            if key in state:
                parameter.copy_(state[key])


@pytest.mark.parametrize("order", ["adapter-then-cache", "cache-then-adapter", "raw-peft-adapter"])
def test_first_block_cache_with_a_lora_adapter_matches_diffusers(order: str) -> None:
    import diffusers.hooks as hooks

    from diffcaps import lora

    ours = seeded_model(TINY, seed=3)
    theirs = diffusers_flux(TINY, ours.state_dict())
    inputs = flux_inputs(TINY, height=8, width=8)
    plain, _ = denoise(ours, inputs, _ours_enter(ours))
    state = _lora_state(ours)
    config = cache.FirstBlockCacheConfig(threshold=0.6)
    if order == "adapter-then-cache":
        lora.load_adapter(ours, dict(state), adapter_name="style")
        cache.enable(ours, config)
    elif order == "cache-then-adapter":
        cache.enable(ours, config)
        lora.load_adapter(ours, dict(state), adapter_name="style")
    else:
        cache.enable(ours, config)
        _inject_peft(ours, state)
    theirs.load_lora_adapter(dict(state), prefix="transformer", adapter_name="style")
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
    assert (uncached_lora - expected_uncached).abs().max().item() <= 1e-5
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
    eager, _ = denoise(model, inputs, _ours_enter(model), steps=10)
    eager_stats = cache.stats(model)
    cache.disable(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    cache.enable(compiled, config)  # type: ignore[arg-type]  # the wrapper: the cache goes on the model inside
    ts = torch.linspace(1.0, 0.0, 11)
    x = inputs["hidden_states"].clone()
    with torch.no_grad():
        for i in range(10):
            with cache.context(model, "cond", timestep=float(ts[i]) * 1000):
                out = compiled(**dict(inputs, hidden_states=x, timestep=ts[i].expand(1)), return_dict=False)[0]
            x = x + (ts[i + 1] - ts[i]) * out
    assert torch.equal(x, eager)
    assert cache.stats(model) == eager_stats and eager_stats.skipped() > 0
    assert cache.active(compiled) == config  # type: ignore[arg-type]
    cache.disable(compiled)  # type: ignore[arg-type]
    assert cache.active(model) is None
    torch._dynamo.reset()
