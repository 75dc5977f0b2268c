"""enable / disable / context / reset / stats on Flux: restoration, errors, contexts, statistics."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import diffcaps.cache
from diffcaps import cache
from diffcaps.errors import CacheError, CapabilityError, ContextError
from diffcaps.hooks import hooked_modules
from diffcaps.models.flux import FluxTransformer2DModel
from tests.cache.loop import denoise
from tests.custom_model import seeded_tiny_dit
from tests.flux_fixtures import TINY, flux_inputs, seeded_model

ALL_KINDS = ("faster_cache", "first_block_cache", "mag_cache", "pyramid_attention_broadcast", "taylorseer_cache")


def _configs() -> list[cache.CacheConfig]:
    return [
        cache.FirstBlockCacheConfig(threshold=0.6),
        cache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2),
        cache.FasterCacheConfig(spatial_attention_timestep_skip_range=(-1, 901), is_guidance_distilled=True),
        cache.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2),
        cache.TaylorSeerCacheConfig(use_lite_mode=True),
        cache.MagCacheConfig(mag_ratios=[1.0] * 20, num_inference_steps=20, threshold=0.5),
    ]


def _enter(model: FluxTransformer2DModel, name: str = "cond") -> Any:
    return lambda _, t: cache.context(model, name, timestep=t)


def _forward(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    with torch.no_grad():
        out: Tensor = model(**inputs, return_dict=False)[0]
    return out


def _untouched(model: nn.Module) -> bool:
    return (not list(hooked_modules(model)) and cache.active(model) is None  # type: ignore[arg-type]
            and all("forward" not in m.__dict__ for m in model.modules()))


def test_metadata_lists_the_cache_kinds() -> None:
    row = FluxTransformer2DModel.metadata()["cache"]
    assert row.entries == ALL_KINDS
    assert FluxTransformer2DModel.declared_capabilities().cache.kinds() == ALL_KINDS


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("config", _configs(), ids=lambda c: type(c).__name__)
def test_disable_restores_the_uncached_model_exactly(config: cache.CacheConfig) -> None:
    model = seeded_model(TINY)
    inputs = flux_inputs(TINY, height=8, width=8)
    uncached, _ = denoise(model, inputs, _enter(model))
    cache.enable(model, config)
    cached, _ = denoise(model, inputs, _enter(model))
    assert cache.stats(model).skipped() > 0
    assert not torch.equal(cached, uncached)
    assert cache.active(model) == config
    cache.disable(model)
    assert _untouched(model)
    again, _ = denoise(model, inputs, _enter(model))
    assert torch.equal(again, uncached)
    cache.disable(model)  # nothing on: a no-op
    assert _untouched(model)


def test_only_one_cache_at_a_time() -> None:
    model = seeded_model(TINY)
    first = cache.FirstBlockCacheConfig()
    cache.enable(model, first)
    with pytest.raises(CacheError, match="already has FirstBlockCacheConfig enabled"):
        cache.enable(model, cache.TaylorSeerCacheConfig())
    assert cache.active(model) == first
    cache.disable(model)
    cache.enable(model, cache.TaylorSeerCacheConfig())
    assert isinstance(cache.active(model), cache.TaylorSeerCacheConfig)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: cache.FirstBlockCacheConfig(threshold=-0.1), "threshold must be a finite number >= 0"),
    (lambda: cache.FirstBlockCacheConfig(threshold=float("nan")), "threshold"),
    (lambda: cache.MagCacheConfig(), "mag_ratios is required"),
    (lambda: cache.MagCacheConfig(mag_ratios=[1.0] * 10, num_inference_steps=20), "has 10 entries but"),
    (lambda: cache.MagCacheConfig(mag_ratios=[1.0, -1.0], num_inference_steps=2), "finite and > 0"),
    (lambda: cache.MagCacheConfig(calibrate=True, retention_ratio=1.5), "retention_ratio"),
    (lambda: cache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=0), "must be an integer >= 1"),
    (lambda: cache.PyramidAttentionBroadcastConfig(spatial_attention_timestep_skip_range=(800, 100)),
     "low <= high"),
    (lambda: cache.PyramidAttentionBroadcastConfig(spatial_attention_block_identifiers=("(",)),
     "not a regular expression"),
    (lambda: cache.FasterCacheConfig(tensor_format="NCHW"), "tensor_format"),
    (lambda: cache.FasterCacheConfig(spatial_attention_timestep_skip_range=(1, 2, 3)), "timestep range"),
    (lambda: cache.TaylorSeerCacheConfig(cache_interval=0), "cache_interval"),
    (lambda: cache.TaylorSeerCacheConfig(taylor_factors_dtype=torch.int8), "floating dtype"),
    (lambda: cache.FirstBlockCacheConfig(threshold="0.1"), "threshold must be a finite number, got '0.1' \\(str\\)"),  # type: ignore[arg-type]
    (lambda: cache.MagCacheConfig(threshold="high", calibrate=True), "threshold must be a finite number"),  # type: ignore[arg-type]
    (lambda: cache.MagCacheConfig(num_inference_steps=2.5, calibrate=True), "num_inference_steps must be an integer"),  # type: ignore[arg-type]
    (lambda: cache.MagCacheConfig(mag_ratios={"cond": (1.0,)}, num_inference_steps=1), "not a mapping by context"),  # type: ignore[arg-type]
    (lambda: cache.MagCacheConfig(mag_ratios=["a"], num_inference_steps=1), "sequence of numbers"),  # type: ignore[list-item]
    (lambda: cache.TaylorSeerCacheConfig(cache_interval=1.5), "cache_interval must be an integer"),  # type: ignore[arg-type]
    (lambda: cache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range="2"), "must be an integer"),  # type: ignore[arg-type]
    (lambda: cache.PyramidAttentionBroadcastConfig(spatial_attention_block_identifiers=[5]), "5 is not a string"),  # type: ignore[list-item]
    (lambda: cache.FasterCacheConfig(alpha_low_frequency="1.1"), "alpha_low_frequency must be a finite number"),  # type: ignore[arg-type]
    (lambda: cache.FasterCacheConfig(spatial_attention_timestep_skip_range=("a", "b")), "two numbers"),  # type: ignore[arg-type]
])
def test_bad_configs_are_refused_when_built(build: Any, message: str) -> None:
    with pytest.raises(CacheError, match=message):
        build()


@pytest.mark.parametrize(("config", "message"), [
    (cache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                           spatial_attention_block_identifiers=("^decoder",)), "match no module"),
    (cache.PyramidAttentionBroadcastConfig(cross_attention_block_skip_range=2), "selects no attention module"),
    (cache.FasterCacheConfig(spatial_attention_block_identifiers=("temporal",), is_guidance_distilled=True),
     "match no module"),
    (cache.FasterCacheConfig(), "outputs a token sequence"),
    (cache.TaylorSeerCacheConfig(cache_identifiers=["transformer_blocks.*attn", "nothing_like_this"]),
     "fully match no module"),
])
def test_configs_that_do_not_fit_the_model_leave_it_untouched(config: cache.CacheConfig, message: str) -> None:
    model = seeded_model(TINY)
    inputs = flux_inputs(TINY)
    before = _forward(model, inputs)
    with pytest.raises(CacheError, match=message):
        cache.enable(model, config)
    assert _untouched(model)
    assert torch.equal(_forward(model, inputs), before)


def test_a_failing_hook_mid_enable_is_rolled_back() -> None:
    model = seeded_model(TINY)
    from diffcaps.hooks import Hook, add_hook, remove_hook

    blocker = model.single_transformer_blocks[0]
    add_hook(blocker, "diffcaps.cache.first_block_cache", Hook())  # the cache's own hook name is taken here
    with pytest.raises(Exception, match="already has a hook"):
        cache.enable(model, cache.FirstBlockCacheConfig())
    remove_hook(blocker, "diffcaps.cache.first_block_cache")
    assert _untouched(model)


def test_models_without_cache_support_are_refused() -> None:
    with pytest.raises(CapabilityError, match="cache"):
        cache.enable(seeded_tiny_dit(), cache.FirstBlockCacheConfig())  # type: ignore[arg-type]


def test_calls_outside_a_required_context_say_so() -> None:
    model = seeded_model(TINY)
    inputs = flux_inputs(TINY)
    cache.enable(model, cache.FirstBlockCacheConfig())
    with pytest.raises(ContextError, match=r"diffcaps\.cache\.context\(model"):
        _forward(model, inputs)
    with cache.context(model, "cond"):
        _forward(model, inputs)


def test_attention_caches_need_a_timestep() -> None:
    model = seeded_model(TINY)
    inputs = flux_inputs(TINY)
    cache.enable(model, cache.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2))
    with pytest.raises(CacheError, match="needs the current timestep"):
        _forward(model, inputs)
    with cache.context(model, "cond", timestep=torch.tensor([500.0])):
        _forward(model, inputs)  # a tensor timestep works too


def test_context_without_a_cache_does_nothing() -> None:
    model = seeded_model(TINY)
    inputs = flux_inputs(TINY)
    with cache.context(model, "cond", timestep=1.0):
        assert torch.equal(_forward(model, inputs), _forward(seeded_model(TINY), inputs))


@pytest.mark.parametrize("enabled", [True, False])
def test_context_arguments_are_checked(enabled: bool) -> None:
    model = seeded_model(TINY)
    if enabled:
        cache.enable(model, cache.FirstBlockCacheConfig())
    for bad in ("", ["cond"], 1, None):
        with pytest.raises(ContextError, match=rf"a non-empty string such as 'cond' or 'uncond'; got {re.escape(repr(bad))} "):
            with cache.context(model, bad):  # type: ignore[arg-type]
                pass
    for step, shown in (("500", "'500' (str)"), (float("nan"), "nan (float)"), (True, "True (bool)")):
        with pytest.raises(CacheError, match=re.escape(f"timestep must be a finite number, got {shown}")):
            with cache.context(model, "cond", timestep=step):  # type: ignore[arg-type]
                pass
    for tensor in (torch.zeros(0), torch.ones(1, dtype=torch.bool)):
        with pytest.raises(CacheError, match="timestep must be a number or a non-empty real tensor"):
            with cache.context(model, "cond", timestep=tensor):
                pass
    with cache.context(model, "cond", timestep=torch.tensor([3])):
        _forward(model, flux_inputs(TINY))
    if enabled:
        assert set(cache.stats(model).contexts) == {"cond"}  # only the good context ran


def test_contexts_keep_separate_state() -> None:
    """Interleaving "cond" and "uncond" passes equals running each on its own model."""
    config = cache.FirstBlockCacheConfig(threshold=0.6)
    cond_inputs = flux_inputs(TINY, height=8, width=8, seed=1)
    uncond_inputs = flux_inputs(TINY, height=8, width=8, seed=2)
    alone = {}
    for name, inputs in (("cond", cond_inputs), ("uncond", uncond_inputs)):
        model = seeded_model(TINY)
        cache.enable(model, config)
        alone[name] = denoise(model, inputs, _enter(model, name))

    model = seeded_model(TINY)
    cache.enable(model, config)
    ts = torch.linspace(1.0, 0.0, 21)
    latents = {"cond": cond_inputs["hidden_states"].clone(), "uncond": uncond_inputs["hidden_states"].clone()}
    for i in range(20):
        for name, inputs in (("cond", cond_inputs), ("uncond", uncond_inputs)):
            with cache.context(model, name):
                out = _forward(model, dict(inputs, hidden_states=latents[name], timestep=ts[i].expand(1)))
            latents[name] = latents[name] + (ts[i + 1] - ts[i]) * out
    for name in ("cond", "uncond"):
        assert torch.equal(latents[name], alone[name][0])
    stats = cache.stats(model)
    assert set(stats.contexts) == {"cond", "uncond"}
    assert set(stats.contexts["cond"]) == {"transformer_blocks", "single_transformer_blocks"}
    ran_all = [len(step) == max(map(len, alone["cond"][1])) for step in alone["cond"][1]]
    assert list(stats.contexts["cond"]["transformer_blocks"].decisions) == ran_all
    assert stats.skipped("cond") == 2 * ran_all.count(False)


def test_reset_starts_a_new_generation() -> None:
    model = seeded_model(TINY)
    inputs = flux_inputs(TINY, height=8, width=8)
    cache.enable(model, cache.TaylorSeerCacheConfig(cache_interval=2))
    first, _ = denoise(model, inputs, _enter(model))
    counted = cache.stats(model)
    continued, _ = denoise(model, inputs, _enter(model))  # the counters run on
    assert not torch.equal(first, continued)
    cache.reset(model)
    assert cache.stats(model).contexts == {}
    again, _ = denoise(model, inputs, _enter(model))
    assert torch.equal(first, again)
    assert cache.stats(model) == counted


def test_stats_per_module_group_and_table() -> None:
    model = seeded_model(TINY)
    cache.enable(model, cache.TaylorSeerCacheConfig(use_lite_mode=True))
    denoise(model, flux_inputs(TINY, height=8, width=8), _enter(model), steps=6)
    stats = cache.stats(model)
    # lite mode: 2 double + 2 single blocks skip, the output projection ("model" group) is predicted
    assert set(stats.contexts["cond"]) == {"transformer_blocks", "single_transformer_blocks", "model"}
    assert stats.contexts["cond"]["model"].decisions == (True, True, True, False, True, False)
    assert stats.skipped(group="transformer_blocks") == 2 * 2
    assert "taylorseer_cache" in str(stats) and "single_transformer_blocks" in stats.describe()


def test_stats_need_an_enabled_cache() -> None:
    with pytest.raises(CacheError, match="no cache is enabled"):
        cache.stats(seeded_model(TINY))


def test_calibration_ratios_need_calibration_mode() -> None:
    model = seeded_model(TINY)
    cache.enable(model, cache.FirstBlockCacheConfig())
    with pytest.raises(CacheError, match="calibrate=True"):
        cache.calibrated_mag_ratios(model)


def test_calibrated_ratios_enable_mag_cache() -> None:
    model = seeded_model(TINY)
    inputs = flux_inputs(TINY, height=8, width=8)
    cache.enable(model, cache.MagCacheConfig(calibrate=True, num_inference_steps=20))
    with pytest.raises(CacheError, match="no complete calibration run yet"):
        cache.calibrated_mag_ratios(model)
    uncached, _ = denoise(model, inputs, _enter(model))
    assert cache.stats(model).skipped() == 0  # calibration computes every step
    ratios = cache.calibrated_mag_ratios(model)
    assert ratios == cache.calibrated_mag_ratios(model, context="cond") and len(ratios) == 20
    with pytest.raises(CacheError, match="calibrated: 'cond'"):
        cache.calibrated_mag_ratios(model, context="uncond")
    cache.disable(model)

    config = cache.MagCacheConfig(mag_ratios=ratios, num_inference_steps=20, threshold=0.5)
    cache.enable(model, config)
    cached, ran = denoise(model, inputs, _enter(model))
    stats = cache.stats(model)
    cache.disable(model)
    # the same skips as a run with the same table written out by hand
    cache.enable(model, cache.MagCacheConfig(mag_ratios=list(ratios), num_inference_steps=20, threshold=0.5))
    again, ran_again = denoise(model, inputs, _enter(model))
    assert cache.stats(model) == stats and ran_again == ran and torch.equal(again, cached)
    cache.disable(model)
    assert stats.skipped() > 0 and stats.computed() > 0
    assert not torch.equal(cached, uncached)


def test_calibrations_of_several_contexts_need_a_name() -> None:
    model = seeded_model(TINY)
    inputs = flux_inputs(TINY, height=8, width=8)
    cache.enable(model, cache.MagCacheConfig(calibrate=True, num_inference_steps=20))
    denoise(model, inputs, _enter(model, "cond"))
    denoise(model, inputs, _enter(model, "uncond"))
    with pytest.raises(CacheError, match="pass context="):
        cache.calibrated_mag_ratios(model)
    assert len(cache.calibrated_mag_ratios(model, context="uncond")) == 20


def test_mag_ratios_tensor_and_interpolation() -> None:
    table = torch.tensor([1.0, 1.1, 1.2, 0.9])
    config = cache.MagCacheConfig(mag_ratios=cache.interpolate_mag_ratios(table, 7), num_inference_steps=7)
    assert config.mag_ratios is not None and len(config.mag_ratios) == 7
    assert cache.MagCacheConfig(mag_ratios=table, num_inference_steps=4).mag_ratios == tuple(table.tolist())
    with pytest.raises(CacheError, match="empty"):
        cache.interpolate_mag_ratios([], 3)


def test_diffusers_style_private_field_name_is_accepted() -> None:
    config = cache.FasterCacheConfig(_unconditional_conditional_input_kwargs_identifiers=["hidden_states"])
    assert config.unconditional_conditional_input_kwargs_identifiers == ("hidden_states",)


def test_pab_without_any_skip_range_uses_spatial_two_and_warns() -> None:
    model = seeded_model(TINY)
    with pytest.warns(UserWarning, match="spatial_attention_block_skip_range=2"):
        cache.enable(model, cache.PyramidAttentionBroadcastConfig())
    denoise(model, flux_inputs(TINY), _enter(model), steps=10)
    assert cache.stats(model).skipped() > 0


def test_public_names() -> None:
    public = {name for name in vars(diffcaps.cache) if not name.startswith("_")}
    assert set(diffcaps.cache.__all__) <= public
    assert all(getattr(diffcaps.cache, name) is not None for name in diffcaps.cache.__all__)
