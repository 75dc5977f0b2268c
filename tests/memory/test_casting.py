"""Layerwise casting: low-precision storage, declared patterns and peft layers skipped, outputs close."""

from __future__ import annotations

import pytest
import torch

from diffcaps import casting
from diffcaps.casting import LayerwiseCastingConfig
from diffcaps.errors import CapabilityError, CastingError
from diffcaps.models.flux import FluxTransformer2DModel
from tests.custom_model import seeded_tiny_dit
from tests.flux_fixtures import TINY, diffusers_flux, flux_inputs, seeded_model


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(**flux_inputs(TINY, batch=2)).sample
    return result


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.bfloat16])
def test_storage_dtype_memory_and_skips(storage: torch.dtype) -> None:
    model = seeded_model(TINY)
    reference = _out(model)
    full = _param_bytes(model)
    cast = casting.enable(model, LayerwiseCastingConfig(storage_dtype=storage))
    assert "transformer_blocks.0.attn.to_q" in cast and "context_embedder" in cast
    assert not [n for n in cast if "norm" in n or n == "proj_out"]
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            assert weight.dtype == (storage if name in cast else torch.float32), name
    cast_bytes = sum(p.numel() * 4 for n, m in model.named_modules() if n in cast for p in m.parameters())
    expected = full - cast_bytes + cast_bytes * storage.itemsize // 4
    assert _param_bytes(model) == expected
    got = _out(model)
    assert got.dtype == torch.float32
    # Measured on this seeded model (outputs ~N(0, 1)): mean abs error 0.04 with fp8 e4m3
    # storage (max 0.17), 0.005 with bf16 (max 0.02).
    tolerance = 0.06 if storage == torch.float8_e4m3fn else 0.008
    assert (got - reference).abs().mean().item() < tolerance
    assert not torch.equal(got, reference)


def test_matches_diffusers_layerwise_casting() -> None:
    model = seeded_model(TINY)
    oracle = diffusers_flux(TINY, model.state_dict())
    casting.enable(model, LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32))
    oracle.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    ours = {n: p.dtype for n, p in model.named_parameters()}
    theirs = {n: p.dtype for n, p in oracle.named_parameters()}
    assert ours == theirs
    torch.testing.assert_close(_out(model), _out(oracle), rtol=0, atol=1e-5)


def test_peft_layers_are_never_cast() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    model = seeded_model(TINY)
    casting.enable(model, LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "proj_mlp"]), model)
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for _, p in lora)
    assert _out(model).isfinite().all()


def test_casting_after_peft_skips_adapter_layers() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    model = seeded_model(TINY)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), model)
    cast = casting.enable(model, LayerwiseCastingConfig(storage_dtype=torch.bfloat16))
    assert not [n for n in cast if "lora_" in n]
    assert "transformer_blocks.0.attn.to_q.base_layer" in cast


def test_disable_upcasts_and_removes_hooks() -> None:
    model = seeded_model(TINY)
    casting.enable(model, LayerwiseCastingConfig(storage_dtype=torch.bfloat16))
    rounded = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    assert casting.active(model) == LayerwiseCastingConfig(storage_dtype=torch.bfloat16)
    casting.disable(model)
    assert casting.active(model) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(p, rounded[n]) for n, p in model.named_parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_bad_input_leaves_model_untouched() -> None:
    model = seeded_model(TINY)
    state = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(CastingError, match="floating-point"):
        LayerwiseCastingConfig(storage_dtype=torch.int8)
    with pytest.raises(CastingError, match="not a regular expression"):
        LayerwiseCastingConfig(skip_patterns=["(unclosed"])
    with pytest.raises(CastingError, match="skip_patterns entry 5 is not a string"):
        LayerwiseCastingConfig(skip_patterns=[5])  # type: ignore[list-item]
    with pytest.raises(CastingError, match="list of regular expressions"):
        LayerwiseCastingConfig(skip_patterns="norm")
    with pytest.raises(CastingError, match="nothing would be saved"):
        LayerwiseCastingConfig(storage_dtype=torch.float32, compute_dtype=torch.float32)
    with pytest.raises(CastingError, match="nothing would be saved"):
        casting.enable(model, LayerwiseCastingConfig(storage_dtype=torch.float32))
    assert all(torch.equal(v, state[k]) and v.dtype == state[k].dtype for k, v in model.state_dict().items())
    assert casting.active(model) is None
    casting.enable(model)
    with pytest.raises(CastingError, match="already enabled"):
        casting.enable(model)
    casting.disable(model)
    casting.disable(model)  # nothing on: a no-op
    assert casting.active(model) is None and all("forward" not in m.__dict__ for m in model.modules())


def test_model_without_the_capability() -> None:
    with pytest.raises(CapabilityError, match="layerwise_casting"):
        casting.enable(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(CapabilityError, match="not the class"):
        casting.enable(FluxTransformer2DModel)  # type: ignore[arg-type]
    assert seeded_tiny_dit().capabilities.layerwise_casting.skip_patterns == ("norm",)
