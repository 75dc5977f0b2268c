"""Parity with diffusers' GGUF path on the same file, with and without a LoRA.

diffusers (0.42.1) loads a GGUF Flux file with ``from_single_file(path, config=<folder>,
quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))``. Its Flux converter
hard-codes FLUX.1's width (3072) for the single blocks' fused ``linear1``, so the file is
FLUX.1-wide with one block of each kind (about 0.5 B parameters, 365 MB in K-quants and Q8_0).

diffusers dequantizes in float16 arithmetic on CPU, so its weights differ from the exact
ones (the gguf package's, and diffcaps') by about one float16 step. Recorded on this file
(largest difference / largest value): weights Q4_K 1.23e-3, Q5_K 1.25e-3, Q6_K 7.8e-4,
Q8_0 3.2e-4; outputs 3.3e-4 (3.9e-3 at outputs up to 11.9), the same with the LoRA. The
bounds below are those, with a margin.

Wan needs no particular width: ``WanTransformer3DModel.from_single_file`` reads the small Wan
file of ``test_gguf_load`` (its matrices in all ten block types) the same way. Recorded:
weights Q5_K 1.28e-3, Q4_K 9.0e-4, Q5_1 8.9e-4, Q2_K 8.7e-4, Q4_1 7.2e-4, Q6_K 6.9e-4,
Q3_K 4.6e-4, Q8_0 3.1e-4, Q5_0 2.2e-4, Q4_0 2.2e-4; outputs 3.5e-4 (at outputs up to 6.2).
Both keep every linear layer the file quantizes packed, except that diffusers decodes the
modules Wan keeps in float32 (its time embedder) on load, where diffcaps keeps them packed and
decodes them into float32 at each call (the same values).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from diffcaps import lora
from diffcaps.io import save_safetensors
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.models.wan import WanTransformer3DModel
from diffcaps.quantization.spec import packed_linears
from diffcaps.weights import load_single_file
from tests.flux_fixtures import flux_inputs
from tests.quantization.gguf_files import mixed_types, wan_gguf, wide_gguf
from tests.quantization.test_gguf_load import WAN
from tests.wan_fixtures import wan_inputs

WIDE = FluxConfig(num_layers=1, num_single_layers=1, num_attention_heads=24, attention_head_dim=128,
                  joint_attention_dim=256, pooled_projection_dim=256, in_channels=64, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
_BIG = ("Q4_K", "Q6_K", "Q5_K", "Q8_0")


def _types(name: str, shape: tuple[int, ...]) -> str:
    if len(shape) < 2:
        return "F32"
    if shape[-1] % 256:
        return "F16"
    if name.endswith("attn.proj.weight"):  # 3072 × 3072: numpy's Q8_0 quantizer is slow on the larger ones
        return "Q8_0"
    return _BIG[sum(map(ord, name)) % 3]


@pytest.fixture(scope="module")
def wide_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wide_gguf(tmp_path_factory.mktemp("wide") / "flux-wide.gguf", FluxTransformer2DModel, WIDE, _types,
                     architecture="flux")


@pytest.fixture(scope="module")
def diffusers_model(wide_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from diffusers import FluxTransformer2DModel as DiffusersFlux, GGUFQuantizationConfig

    folder = tmp_path_factory.mktemp("config")
    (folder / "config.json").write_text(json.dumps(WIDE.to_dict()))
    return DiffusersFlux.from_single_file(
        str(wide_file), config=str(folder), local_files_only=True, torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))


def _relative(ours: Tensor, theirs: Tensor) -> float:
    return (ours - theirs).abs().max().item() / theirs.abs().max().item()


def test_weights_and_outputs_match_diffusers_within_its_float16_dequantisation(wide_file: Path,
                                                                              diffusers_model: Any,
                                                                              tmp_path: Path) -> None:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    model = load_single_file(FluxTransformer2DModel, wide_file)
    packed = dict(packed_linears(model))
    assert {layer.codec.name for layer in packed.values()} == set(_BIG)
    for name, layer in packed.items():
        ours = layer.dense_weight()
        theirs = dequantize_gguf_tensor(diffusers_model.get_submodule(name).weight).float().reshape(ours.shape)
        assert _relative(ours, theirs) <= 2e-3, name  # about one float16 step
    inputs = flux_inputs(WIDE)
    with torch.no_grad():
        ours_out: Tensor = model(**inputs).sample
        theirs_out: Tensor = diffusers_model(**inputs, return_dict=False)[0]
    assert _relative(ours_out, theirs_out) <= 1e-3

    # the same LoRA (diffusers/PEFT keys) through both libraries
    generator = torch.Generator().manual_seed(3)
    tensors: dict[str, Tensor] = {}
    for path in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                 "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn.to_k"):
        layer = packed[path]
        tensors[f"transformer.{path}.lora_A.weight"] = 0.05 * torch.randn(4, layer.in_features, generator=generator)
        tensors[f"transformer.{path}.lora_B.weight"] = 0.05 * torch.randn(layer.out_features, 4, generator=generator)
    lora.load_adapter(model, save_safetensors(tensors, tmp_path / "lora.safetensors"), adapter_name="a")
    lora.set_adapters(model, ["a"], [0.7])
    diffusers_model.load_lora_adapter({k: v.clone() for k, v in tensors.items()}, prefix="transformer",
                                      adapter_name="a")
    diffusers_model.set_adapters(["a"], [0.7])
    with torch.no_grad():
        ours_lora: Tensor = model(**inputs).sample
        theirs_lora: Tensor = diffusers_model(**inputs, return_dict=False)[0]
    assert (ours_lora - ours_out).abs().max().item() > 0.01  # the adapter matters
    assert _relative(ours_lora, theirs_lora) <= 1e-3


BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def test_wan_weights_and_outputs_match_diffusers_within_its_float16_dequantisation(tmp_path: Path) -> None:
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel as DiffusersWan
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    path = wan_gguf(tmp_path / "wan2.1-t2v-mixed.gguf", WAN, mixed_types(BLOCK_TYPES), prefix="model.diffusion_model.")
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(WAN.to_dict()))
    theirs_model: Any = DiffusersWan.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    model = load_single_file(WanTransformer3DModel, path)
    packed = dict(packed_linears(model))
    assert {layer.codec.name for layer in packed.values()} == set(BLOCK_TYPES)
    for name, layer in packed.items():
        held = theirs_model.get_submodule(name).weight
        ours = layer.dense_weight()
        if f"{name}.weight" in model.kept_in_fp32():  # diffusers decodes these on load
            assert layer.compute_dtype == torch.float32 and held.dtype == torch.float32, name
            theirs = held.detach().float()
        else:
            assert held.quant_type.name == layer.codec.name, name  # diffusers keeps it packed in the same type
            theirs = dequantize_gguf_tensor(held).float().reshape(ours.shape)
        assert _relative(ours, theirs) <= 2e-3, name  # about one float16 step
    inputs = wan_inputs(WAN)
    with torch.no_grad():
        ours_out: Tensor = model(**inputs).sample
        theirs_out: Tensor = theirs_model(**inputs, return_dict=False)[0]
    assert ours_out.shape == theirs_out.shape
    assert _relative(ours_out, theirs_out) <= 1e-3
