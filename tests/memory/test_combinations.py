"""Memory features combined with LoRA and caches: LoRA + casting, LoRA + offload, cache + offload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffcaps import cache, casting, lora, offload
from diffcaps.cache import FirstBlockCacheConfig
from diffcaps.casting import LayerwiseCastingConfig
from diffcaps.errors import DiffcapsError
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.offload import GroupOffloadingConfig
from tests.flux_fixtures import TINY, flux_inputs, seeded_model

TARGETS = ("attn.to_q", "attn.to_v", "ff.net.2", "proj_mlp")


def _peft_lora(model: FluxTransformer2DModel, seed: int = 11, rank: int = 2) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-layout LoRA file for a few projections of every block, seeded."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
    return state


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(**flux_inputs(TINY, batch=2)).sample
    return result


def _with_lora() -> tuple[FluxTransformer2DModel, torch.Tensor]:
    model = seeded_model(TINY)
    lora.load_adapter(model, _peft_lora(model), adapter_name="style")
    return model, _out(model)


@pytest.mark.parametrize("order", ["lora-first", "casting-first"])
def test_lora_and_casting(order: str) -> None:
    _, expected = _with_lora()
    model = seeded_model(TINY)
    if order == "lora-first":
        lora.load_adapter(model, _peft_lora(model), adapter_name="style")
    cast = casting.enable(model, LayerwiseCastingConfig(storage_dtype=torch.bfloat16))
    if order == "casting-first":
        lora.load_adapter(model, _peft_lora(model), adapter_name="style")
    assert not [n for n in cast if "lora_" in n]
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    got = _out(model)
    assert (got - expected).abs().mean().item() < 0.01  # bf16 storage of the base weights only
    lora.set_adapters(model, ["style"], [0.0])
    assert (got - _out(model)).abs().max().item() > 1e-3  # the adapter really acts under casting


@pytest.mark.parametrize("to_disk", [False, True])
def test_lora_loaded_and_unloaded_under_offloading(tmp_path: Path, to_disk: bool) -> None:
    _, expected = _with_lora()
    model = seeded_model(TINY)
    plain = _out(model)
    offload.enable(model, GroupOffloadingConfig(onload_device="cpu", offload_to_disk_path=tmp_path if to_disk else None))
    report = lora.load_adapter(model, _peft_lora(model), adapter_name="style")
    assert report.format == "diffusers"
    assert torch.equal(_out(model), expected)
    lora.unload(model)
    assert torch.equal(_out(model), plain)
    assert offload.active(model) is not None


def test_a_failed_lora_load_keeps_offloading(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    expected = _out(model)
    offload.enable(model, GroupOffloadingConfig(onload_device="cpu", offload_to_disk_path=tmp_path))
    bad = _peft_lora(model)
    bad["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.zeros(5, 2)  # wrong shape
    with pytest.raises(DiffcapsError):
        lora.load_adapter(model, bad)
    assert offload.active(model) is not None
    assert torch.equal(_out(model), expected)
    offload.disable(model)
    assert torch.equal(_out(model), expected)


def _denoise(model: FluxTransformer2DModel, steps: int = 6) -> torch.Tensor:
    inputs = flux_inputs(TINY, batch=1)
    latents = inputs.pop("hidden_states")
    timesteps = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for t, t_next in zip(timesteps[:-1], timesteps[1:], strict=True):
            with cache.context(model, "cond"):
                flow: torch.Tensor = model(hidden_states=latents, **{**inputs, "timestep": t.expand(1)}).sample
            latents = latents + (t_next - t) * flow
    assert isinstance(latents, torch.Tensor)
    return latents


def test_cache_and_offload_together(tmp_path: Path) -> None:
    config = FirstBlockCacheConfig(threshold=0.8)  # skips one of the six steps on this seeded model
    cached = seeded_model(TINY)
    cache.enable(cached, config)
    expected = _denoise(cached)
    skipped = cache.stats(cached)
    assert skipped.skipped() > 0 and skipped.computed() > 0
    model = seeded_model(TINY)
    offload.enable(model, GroupOffloadingConfig(onload_device="cpu", offload_to_disk_path=tmp_path))
    cache.enable(model, config)
    assert torch.equal(_denoise(model), expected)
    assert cache.stats(model) == skipped
    cache.disable(model)
    offload.disable(model)
    assert torch.equal(_denoise(model), _denoise(seeded_model(TINY)))
