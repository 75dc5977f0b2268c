"""Caches on a model outside diffcaps that declares its own CacheSupport (single-tensor blocks, BCHW output)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from torch import Tensor

from diffcaps import cache
from diffcaps.errors import CacheError
from tests.cache.toy import ToyDenoiser, seeded_toy

STEPS = 12
FASTER: dict[str, Any] = dict(
    spatial_attention_timestep_skip_range=(-1, 901), unconditional_batch_skip_range=3,
    unconditional_batch_timestep_skip_range=(-1, 800), tensor_format="BCHW", alpha_low_frequency=1.2,
    low_frequency_weight_update_timestep_range=(99, 901), high_frequency_weight_update_timestep_range=(-1, 500),
)


def _inputs() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 8, generator=generator),
            torch.randn(1, 8, generator=generator))


def _guided_loop(model: ToyDenoiser, *, ours: bool, clock: dict[str, float],
                 return_dict: bool = False) -> tuple[Tensor, list[int]]:
    """Classifier-free guidance in one batch (unconditional first); logs the batch each call computes."""
    x, cond, uncond = _inputs()
    ts = torch.linspace(1, 0, STEPS + 1)
    batches: list[int] = []
    handle = model.proj_in.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    try:
        for i in range(STEPS):
            t = ts[i]
            clock["t"] = float(t) * 1000
            kwargs: dict[str, Any] = dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([uncond, cond]),
                                          timestep=t.expand(2), return_dict=return_dict)
            with torch.no_grad(), cache.context(model, "cfg", timestep=clock["t"]):
                output = model(**kwargs)
            prediction: Tensor = output.sample if return_dict else output[0]
            unconditional, conditional = prediction.chunk(2)
            x = x + (ts[i + 1] - t) * (unconditional + 3 * (conditional - unconditional))
    finally:
        handle.remove()
    return x, batches


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_faster_cache_unconditional_branch_matches_diffusers() -> None:
    import diffusers.hooks as hooks

    ours = seeded_toy()
    theirs = copy.deepcopy(ours)
    clock = {"t": 0.0}
    hooks.apply_faster_cache(theirs, hooks.FasterCacheConfig(**FASTER, current_timestep_callback=cast(Callable[[], int], lambda: clock["t"])))
    cache.enable(ours, cache.FasterCacheConfig(**FASTER))

    latents, batches = _guided_loop(ours, ours=True, clock=clock)
    expected, expected_batches = _guided_loop(theirs, ours=False, clock=clock)
    assert batches == expected_batches
    assert 1 in batches and 2 in batches  # some steps ran only the conditional half
    assert (latents - expected).abs().max().item() <= 1e-5
    stats = cache.stats(ours)
    assert stats.skipped(group="unconditional_batch") == batches.count(1)

    # the model's attrs output object carries the rebuilt batch too
    cache.reset(ours)
    from_dict, _ = _guided_loop(ours, ours=True, clock=clock, return_dict=True)
    assert torch.equal(from_dict, latents)


def test_faster_cache_tensor_format_must_match_the_model() -> None:
    model = seeded_toy()
    with pytest.raises(CacheError, match="tensor_format"):
        cache.enable(model, cache.FasterCacheConfig(tensor_format="BFCHW"))
    assert cache.active(model) is None


def _block_stack(model: ToyDenoiser, tokens: Tensor) -> Tensor:
    for block in model.blocks:
        tokens = block(tokens)
    return tokens


def test_first_block_cache_on_tensor_blocks_adds_the_last_tail_residual() -> None:
    model = seeded_toy()
    generator = torch.Generator().manual_seed(1)
    first, second = torch.randn(2, 1, 64, 16, generator=generator)
    with torch.no_grad():
        head_1 = model.blocks[0](first)
        tail_1 = _block_stack(model, first)
        head_2 = model.blocks[0](second)
        cache.enable(model, cache.FirstBlockCacheConfig(threshold=1e9))
        with cache.context(model, "x"):
            assert torch.equal(_block_stack(model, first), tail_1)  # first step computes everything
            skipped = _block_stack(model, second)
    # skipped: the head runs, the rest is replaced by the residual they added on the last computed step
    assert torch.allclose(skipped, head_2 + (tail_1 - head_1), atol=1e-6)
    assert cache.stats(model).contexts["x"]["blocks"].decisions == (True, False)


def test_mag_cache_on_tensor_blocks_adds_the_last_residual() -> None:
    model = seeded_toy()
    generator = torch.Generator().manual_seed(1)
    steps = torch.randn(3, 1, 64, 16, generator=generator)
    with torch.no_grad():
        full = [_block_stack(model, x) for x in steps]
        cache.enable(model, cache.MagCacheConfig(mag_ratios=[1.0, 1.0, 1.0], num_inference_steps=3,
                                                 retention_ratio=0.0, threshold=0.1))
        got = [_block_stack(model, x) for x in steps]  # no context: MagCache uses "default"
    assert torch.equal(got[0], full[0])
    # step 2 skips (ratio 1.0, no error) and reuses step 1's residual; MagCache then resets after 3 steps
    assert torch.allclose(got[1], steps[1] + (full[0] - steps[0]), atol=1e-6)
    assert cache.stats(model).contexts["default"]["blocks"].decisions == (True, False, False)
