"""The denoising loop both Wan cache test modules run on diffcaps and diffusers alike.

Which modules ran at each step is read with plain torch forward hooks on the first sub-layer of
each block and attention (same names in both libraries), so neither library's bookkeeping is
trusted.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from diffcaps.models.wan import WanTransformer3DModel
from tests.cache.loop import call_log

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


def enters(ours: WanTransformer3DModel, theirs: Any, clock: Clock) -> tuple[Enter, Enter]:
    """How each library opens the "cond" pass at timestep ``t`` (diffusers reads the clock)."""
    from diffcaps import cache

    def ours_enter(t: float) -> AbstractContextManager[Any]:
        return cache.context(ours, "cond", timestep=t)

    def theirs_enter(t: float) -> AbstractContextManager[Any]:
        clock.now = round(t)
        context: AbstractContextManager[Any] = theirs.cache_context("cond")
        return context

    return ours_enter, theirs_enter


def assert_same_as_diffusers(ours: WanTransformer3DModel, theirs: Any, inputs: dict[str, Tensor], configs: tuple[Any, Any],
                             clock: Clock) -> list[tuple[str, ...]]:
    """Run the loop uncached, then cached in both libraries; assert the same modules ran at every
    step, the same latents (≤ 1e-5), and that the cache skipped something. Returns what ran."""
    from diffcaps import cache

    ours_enter, theirs_enter = enters(ours, theirs, clock)
    uncached, _ = denoise(ours, inputs, ours_enter)
    cache.enable(ours, configs[0])
    theirs.enable_cache(configs[1])
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
    return ran
