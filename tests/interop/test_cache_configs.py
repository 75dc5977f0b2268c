"""diffusers' cache configs on a wrapped model: ``pipe.transformer.enable_cache(diffusers config)``.

Each cache runs in two FluxPipelines over the same tiny seeded folder, one with diffusers'
transformer and ``enable_cache`` of diffusers' config, one with ``wrap(model)`` and the same
diffusers config: same images, same latents, and the same modules run at every transformer
call (read with plain torch forward hooks on each block's and attention's first sub-layer,
as in ``tests/cache/test_parity.py``, trusting neither library's bookkeeping).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import diffusers
import diffusers.hooks as hooks
import pytest
import torch
from diffusers import FluxPipeline
from torch import nn

from diffcaps import cache
from diffcaps.errors import InteropError
from diffcaps.interop.diffusers import cache_config, unwrap, wrap
from diffcaps.models.flux import FluxTransformer2DModel
from tests.cache.loop import RAN_SUFFIXES
from tests.interop.pipelines import FLUX_CALL, assert_same, generate

_STEPS = 6
CALL: dict[str, Any] = {"prompt": "a photo of a cat", "guidance_scale": 3.5, **FLUX_CALL, "num_inference_steps": _STEPS}


@contextmanager
def _calls(model: nn.Module) -> Generator[list[tuple[str, ...]]]:
    """Per transformer call, the names of the blocks and attention modules that ran (torch hooks only)."""
    calls: list[tuple[str, ...]] = []
    ran: list[str] = []
    handles = [model.register_forward_pre_hook(lambda *_: ran.clear()),
               model.register_forward_hook(lambda *_: calls.append(tuple(ran)))]
    for name, module in model.named_modules():
        if name.endswith(RAN_SUFFIXES):
            handles.append(module.register_forward_hook(lambda *_, name=name: ran.append(name)))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _pipelines(folder: Path) -> tuple[Any, Any]:
    theirs = FluxPipeline.from_pretrained(folder)
    ours = FluxPipeline.from_pipe(theirs, transformer=wrap(FluxTransformer2DModel.from_pretrained(folder / "transformer")))
    return ours, theirs


def _run(pipe: Any, model: nn.Module) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple[str, ...]]]:
    with _calls(model) as calls, torch.no_grad():
        output = generate(pipe, **CALL)
    return output, calls


CASES: dict[str, Callable[[Any], Any]] = {
    "first_block": lambda pipe: hooks.FirstBlockCacheConfig(threshold=0.3),
    "pyramid": lambda pipe: hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep),
    "faster": lambda pipe: hooks.FasterCacheConfig(
        spatial_attention_timestep_skip_range=(-1, 901), is_guidance_distilled=True,
        current_timestep_callback=lambda: pipe.current_timestep),
    "taylorseer": lambda pipe: hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                            taylor_factors_dtype=torch.float32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_diffusers_cache_config_gives_diffusers_decisions_and_images(case: str, flux_folder: Path) -> None:
    ours, theirs = _pipelines(flux_folder)
    model = unwrap(ours.transformer)
    uncached, _ = _run(ours, model)
    ours.transformer.enable_cache(CASES[case](ours))
    theirs.transformer.enable_cache(CASES[case](theirs))
    assert ours.transformer.is_cache_enabled and theirs.transformer.is_cache_enabled
    mine, my_calls = _run(ours, model)
    reference, their_calls = _run(theirs, theirs.transformer)
    assert my_calls == their_calls, "a module ran in one library and was skipped in the other"
    assert_same(mine, reference)
    full = max(len(call) for call in my_calls)
    assert any(len(call) < full for call in my_calls)  # the cache skipped something
    assert (mine[0] - uncached[0]).abs().max() > 0

    ours.transformer.disable_cache()
    assert not ours.transformer.is_cache_enabled and cache.active(model) is None
    assert_same(_run(ours, model)[0], uncached, tolerance=0.0)


def test_mag_cache_with_ratios_calibrated_through_the_pipeline(flux_folder: Path) -> None:
    ours, theirs = _pipelines(flux_folder)
    model = unwrap(ours.transformer)
    ours.transformer.enable_cache(hooks.MagCacheConfig(calibrate=True, num_inference_steps=_STEPS))
    _run(ours, model)
    ratios = cache.calibrated_mag_ratios(model, context="cond")
    ours.transformer.disable_cache()
    settings: dict[str, Any] = {"threshold": 0.5, "max_skip_steps": 2, "retention_ratio": 0.2,
                                "num_inference_steps": _STEPS, "mag_ratios": list(ratios)}
    ours.transformer.enable_cache(hooks.MagCacheConfig(**settings))
    theirs.transformer.enable_cache(hooks.MagCacheConfig(**settings))
    mine, my_calls = _run(ours, model)
    reference, their_calls = _run(theirs, theirs.transformer)
    assert my_calls == their_calls
    assert_same(mine, reference)
    assert [len(call) for call in my_calls].count(1) >= 2  # whole steps skipped: only norm_out ran


@pytest.mark.parametrize("name", ["FirstBlockCacheConfig", "FasterCacheConfig", "PyramidAttentionBroadcastConfig",
                                  "TaylorSeerCacheConfig", "MagCacheConfig"])
def test_each_diffusers_config_maps_field_by_field(name: str) -> None:
    given: Any = getattr(diffusers, name)(**({"mag_ratios": [1.0] * 28} if name == "MagCacheConfig" else {}))
    ours = cache_config(given)
    assert type(ours) is getattr(cache, name)
    by_alias = {field.alias: getattr(ours, field.name) for field in attrs.fields(type(ours))}
    for field in dataclasses.fields(given):
        theirs = getattr(given, field.name)
        expected = tuple(theirs.tolist()) if isinstance(theirs, torch.Tensor) else theirs
        assert by_alias[field.name] == (tuple(expected) if isinstance(expected, list) else expected), field.name
    assert cache_config(ours) is ours


def test_what_diffcaps_cannot_honour_is_named() -> None:
    with pytest.raises(InteropError, match="TextKVCacheConfig is not a cache config diffcaps can run"):
        cache_config(hooks.TextKVCacheConfig())

    extended: Any = dataclasses.make_dataclass("Extended", [("warmup_steps", int, dataclasses.field(default=2))],
                                               bases=(hooks.FirstBlockCacheConfig,))

    with pytest.raises(InteropError, match="cannot honour warmup_steps"):
        cache_config(extended(threshold=0.1))
    with pytest.raises(InteropError, match=r"FasterCacheConfig: .*tensor_format"):
        cache_config(hooks.FasterCacheConfig(tensor_format="NCHW"))


def test_enable_cache_refuses_before_touching_the_model(flux_folder: Path) -> None:
    ours, _ = _pipelines(flux_folder)
    with pytest.raises(InteropError, match="SeaCacheConfig"):
        ours.transformer.enable_cache(hooks.SeaCacheConfig())
    assert not ours.transformer.is_cache_enabled
    ours.transformer.enable_cache(cache.FirstBlockCacheConfig(threshold=0.1))  # diffcaps' configs too
    assert cache.active(unwrap(ours.transformer)) == cache.FirstBlockCacheConfig(threshold=0.1)
    ours.transformer.disable_cache()
    ours.transformer.disable_cache()  # nothing on: nothing happens, as in diffusers

