"""IP-Adapter under an inference cache: same skips and latents as diffusers' cache on diffusers' IP-Adapter.

A 12-step Euler loop runs the model with the image prompt at every step; the cache decides
per step which blocks (First Block Cache) or attention calls (Pyramid Attention Broadcast)
to skip. The oracle is diffusers' Flux with the same weights, the same IP-Adapter file loaded
by its own loader, and its own cache at the same settings.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from diffcaps import cache, ip_adapter
from tests.cache.loop import call_log, timesteps
from tests.flux_fixtures import TINY, diffusers_flux, flux_inputs, seeded_model, seeded_state
from tests.ip_adapter.xlabs import DiffusersIPAdapter, image_embeds, write_xlabs

STEPS = 12
RAN = ("attn.to_q", ".norm1")


def _denoise(model: torch.nn.Module, inputs: dict[str, Any], embeds: list[Tensor],
             enter: Callable[[float], AbstractContextManager[Any]]) -> tuple[Tensor, list[int]]:
    ts = timesteps(STEPS)
    x = inputs["hidden_states"].clone()
    ran: list[int] = []
    with call_log(model, RAN) as log, torch.no_grad():
        for i in range(STEPS):
            log.clear()
            with enter(float(ts[i]) * 1000):
                kwargs = {"ip_adapter_image_embeds": list(embeds)}  # fresh: diffusers pops it
                out: Tensor = model(**dict(inputs, hidden_states=x, timestep=ts[i].expand(x.shape[0])),
                                    joint_attention_kwargs=kwargs, return_dict=False)[0]
            ran.append(len(log))
            x = x + (ts[i + 1] - ts[i]) * out
    return x, ran


class _Clock:
    """The current timestep on the 0–1000 scale, for diffusers' ``current_timestep_callback``."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


_CLOCK = _Clock()

CASES: dict[str, tuple[Callable[[], cache.CacheConfig], Callable[[Any], Any]]] = {
    "first-block-cache": (lambda: cache.FirstBlockCacheConfig(threshold=0.4),
                          lambda hooks: hooks.FirstBlockCacheConfig(threshold=0.4)),
    "pyramid-attention-broadcast": (
        lambda: cache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                      spatial_attention_timestep_skip_range=(0, 990)),
        lambda hooks: hooks.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                            spatial_attention_timestep_skip_range=(0, 990),
                                                            current_timestep_callback=_CLOCK)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_cached_denoising_with_an_image_prompt_matches_diffusers(case: str, tmp_path: Path) -> None:
    import diffusers.hooks as hooks

    ours_config, theirs_config = CASES[case]
    path = write_xlabs(tmp_path / "ip.safetensors", TINY, seed=41)
    ours = seeded_model(TINY, seed=3)
    oracle = DiffusersIPAdapter(diffusers_flux(TINY, seeded_state(ours, seed=3)))
    oracle.load(path)
    ip_adapter.load(ours, path)
    inputs = flux_inputs(TINY, height=8, width=8)
    embeds = [image_embeds(1)]

    uncached, _ = _denoise(ours, inputs, embeds, lambda t: cache.context(ours, "cond", timestep=t))
    cache.enable(ours, ours_config())
    oracle.transformer.enable_cache(theirs_config(hooks))
    try:
        latents, ran = _denoise(ours, inputs, embeds, lambda t: cache.context(ours, "cond", timestep=t))

        def enter(t: float) -> AbstractContextManager[Any]:
            _CLOCK.now = t
            context: AbstractContextManager[Any] = oracle.transformer.cache_context("cond")
            return context
        expected, expected_ran = _denoise(oracle.transformer, inputs, embeds, enter)
    finally:
        cache.disable(ours)
        oracle.transformer.disable_cache()

    assert ran == expected_ran and min(ran) < max(ran)  # the same steps skipped the same work
    assert (latents - expected).abs().max().item() <= 1e-5
    assert not torch.equal(latents, uncached)
    # the cache is gone and the adapter still acts as before
    again, _ = _denoise(ours, inputs, embeds, lambda t: cache.context(ours, "cond", timestep=t))
    assert torch.equal(again, uncached)
