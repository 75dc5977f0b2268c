"""keep-in-fp32 on Wan: every path to a low dtype keeps diffusers' modules in float32, and bf16
outputs equal diffusers' own bf16 path on the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from diffcaps import casting, weights
from diffcaps.errors import InputError
from diffcaps.io import landing_dtype
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.models.wan import WanTransformer3DModel
from diffcaps.protocols import require, supports_keep_in_fp32
from tests.flux_fixtures import TINY as FLUX_TINY, seeded_model as seeded_flux
from tests.wan_fixtures import CONFIGS, I2V, T2V, seeded_model, wan_inputs

KEPT = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def _diffusers_class() -> Any:
    from diffusers import WanTransformer3DModel as DiffusersWan

    return DiffusersWan


def _fp32_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.state_dict().items() if p.dtype == torch.float32}


def _bf16_inputs(config: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    return wan_inputs(config, dtype=torch.bfloat16, **kwargs)


def test_wan_declares_diffusers_keep_in_fp32_modules() -> None:
    model = seeded_model(T2V)
    _, service = require(model, "keep_in_fp32")
    assert service.entries() == KEPT == tuple(_diffusers_class()._keep_in_fp32_modules)
    assert "blocks.0.norm2.weight" in model.kept_in_fp32()
    assert "condition_embedder.time_embedder.linear_2.bias" in model.kept_in_fp32()
    assert "scale_shift_table" in model.kept_in_fp32()
    assert "condition_embedder.time_proj.weight" not in model.kept_in_fp32()
    assert supports_keep_in_fp32(model) and not supports_keep_in_fp32(seeded_flux(FLUX_TINY))


@pytest.mark.parametrize("name", ["t2v", "i2v", "ti2v"])
def test_bf16_from_pretrained_equals_diffusers_bf16_path(tmp_path: Path, name: str) -> None:
    config = CONFIGS[name]
    seeded_model(config, seed=11).save_pretrained(tmp_path)
    ours = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    oracle = _diffusers_class().from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    fp32 = _fp32_names(ours)
    assert fp32 == _fp32_names(oracle) == set(ours.kept_in_fp32()) & set(ours.state_dict())
    assert fp32 and all(p.dtype == torch.bfloat16 for k, p in ours.state_dict().items() if k not in fp32)
    inputs = _bf16_inputs(config, batch=2, per_token=name == "ti2v", seed=12)
    with torch.no_grad():
        got = ours(**inputs).sample
        expected = oracle(**inputs).sample
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_casting_everything_differs_from_diffusers_bf16_path(tmp_path: Path) -> None:
    # Why the capability matters: casting every tensor with .to() does not reproduce diffusers.
    seeded_model(T2V, seed=11).save_pretrained(tmp_path)
    everything = WanTransformer3DModel.from_pretrained(tmp_path).to(torch.bfloat16)
    oracle = _diffusers_class().from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    inputs = _bf16_inputs(T2V, seed=12)
    with torch.no_grad():
        assert not torch.equal(everything(**inputs).sample, oracle(**inputs).sample)


def test_to_dtype_and_from_config_keep_the_same_modules(tmp_path: Path) -> None:
    model = seeded_model(I2V, seed=13)
    model.save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    parameter = model.get_parameter("blocks.0.attn1.to_q.weight")
    assert model.to_dtype(torch.bfloat16) is model
    assert model.get_parameter("blocks.0.attn1.to_q.weight") is parameter  # cast in place, parameters kept
    assert {k: v.dtype for k, v in model.state_dict().items()} == {k: v.dtype for k, v in loaded.state_dict().items()}
    inputs = _bf16_inputs(I2V, seed=14)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, loaded(**inputs).sample)
    built = WanTransformer3DModel.from_config(I2V, torch_dtype=torch.float16)
    assert _fp32_names(built) == _fp32_names(loaded)
    assert built.condition_embedder.time_proj.weight.dtype == torch.float16
    model.to_dtype(torch.float32)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    with pytest.raises(InputError, match="floating-point"):
        model.to_dtype(torch.int8)


def test_layerwise_casting_skips_kept_modules_like_diffusers() -> None:
    ours = seeded_model(T2V, seed=15)
    oracle = _diffusers_class()(**{k: v for k, v in T2V.to_dict().items() if not k.startswith("_")})
    oracle.load_state_dict(ours.state_dict())
    oracle.eval()
    cast = casting.enable(ours, casting.LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn))
    oracle.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    stored = {name for name, p in oracle.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert {f"{layer}.weight" for layer in cast} == {n for n in stored if n.endswith(".weight")}
    assert not any(n.startswith(("condition_embedder", "patch_embedding")) for n in cast)
    inputs = wan_inputs(T2V, seed=16)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).sample, oracle(**inputs).sample, rtol=0, atol=1e-6)
    casting.disable(ours)


def test_layerwise_casting_never_casts_kept_modules_even_with_user_patterns() -> None:
    # With no skip patterns at all, keep_in_fp32 alone protects the timestep embedder's linears
    # (diffusers, too, adds _keep_in_fp32_modules to whatever patterns it is given).
    ours = seeded_model(T2V, seed=19)
    cast = casting.enable(ours, casting.LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn, skip_patterns=()))
    assert "condition_embedder.time_proj" in cast and "patch_embedding" in cast
    assert [layer for layer in cast if "time_embedder" in layer] == []
    assert ours.get_parameter("condition_embedder.time_embedder.linear_1.weight").dtype == torch.float32
    assert ours.get_parameter("condition_embedder.time_proj.weight").dtype == torch.float8_e4m3fn
    casting.disable(ours)


def test_a_model_keeping_nothing_loads_everything_in_the_requested_dtype(tmp_path: Path) -> None:
    flux = seeded_flux(FLUX_TINY)
    assert "keep_in_fp32" not in FluxTransformer2DModel.metadata()
    assert flux.kept_in_fp32() == frozenset()
    flux.save_pretrained(tmp_path)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.state_dict().values())
    assert all(p.dtype == torch.bfloat16 for p in flux.to_dtype(torch.bfloat16).state_dict().values())


def test_landing_dtype_rule() -> None:
    assert landing_dtype(torch.bfloat16, torch.float32, torch.float16, keep_fp32=True) == torch.float32
    assert landing_dtype(torch.bfloat16, torch.float32, torch.float16) == torch.float16
    assert landing_dtype(torch.bfloat16, torch.float32, None, keep_fp32=True) == torch.float32
    assert landing_dtype(torch.int64, torch.int64, torch.float16, keep_fp32=True) == torch.int64


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_single_file_loads_keep_the_same_modules_in_fp32(tmp_path: Path, storage: torch.dtype) -> None:
    config = attrs.evolve(I2V, num_attention_heads=1, attention_head_dim=128, added_kv_proj_dim=128)  # 128: Wan's
    model = seeded_model(config, seed=17)  # head width, which single files are read with
    model.save_pretrained(tmp_path / "folder")
    folder = WanTransformer3DModel.from_pretrained(tmp_path / "folder", torch_dtype=torch.bfloat16)
    path = weights.save_single_file(model, tmp_path / "wan.safetensors", torch_dtype=storage)
    single = weights.load_single_file(WanTransformer3DModel, path, torch_dtype=torch.bfloat16)
    assert {k: v.dtype for k, v in single.state_dict().items()} == {k: v.dtype for k, v in folder.state_dict().items()}
    assert single.get_parameter("blocks.1.norm2.weight").dtype == torch.float32
    if storage == torch.float32:  # the kept tensors were never rounded to bf16 on the way
        assert torch.equal(single.get_parameter("scale_shift_table"), model.get_parameter("scale_shift_table"))
        inputs = _bf16_inputs(config, seed=18)
        with torch.no_grad():
            assert torch.equal(single(**inputs).sample, folder(**inputs).sample)


def test_plain_to_bf16_differs_from_diffusers_only_by_its_rope_tables_cast_low() -> None:
    """``.to(bfloat16)`` casts every module, the kept ones too, on both sides; diffusers also casts
    its precomputed RoPE tables (buffers) to bf16, while diffcaps computes them per call in
    float32. With diffusers' tables put back at full precision, the outputs are bit-equal."""
    model = seeded_model(T2V, seed=5)
    oracle = _diffusers_class().from_config(T2V.to_dict()).eval()
    oracle.load_state_dict(model.state_dict())
    tables = {name: buffer.clone() for name, buffer in oracle.rope.named_buffers()}
    assert tables and all(t.dtype in (torch.float32, torch.float64) for t in tables.values())
    model.to(torch.bfloat16)
    oracle.to(torch.bfloat16)
    inputs = _bf16_inputs(T2V, seed=6)
    with torch.no_grad():
        ours = model(**inputs).sample
        theirs = oracle(**inputs, return_dict=False)[0]
        assert not torch.equal(ours, theirs)  # diffusers' bf16 RoPE tables
        for name, table in tables.items():
            setattr(oracle.rope, name, table)
        assert torch.equal(ours, oracle(**inputs, return_dict=False)[0])
