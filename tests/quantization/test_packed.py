"""PackedLinear: a uint8-packed weight decoded per call, and the quantization capability row."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from diffcaps import quantization
from diffcaps.errors import CapabilityError
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.models.wan import WanTransformer3DModel
from diffcaps.quantization.spec import PackedLinear, packed_linears
from tests.custom_model import TinyDiT, TinyDiTConfig


class _Float16Bytes:
    """A codec for tests: the packed bytes are a float16 weight's raw bytes."""

    name = "F16_BYTES"

    def decode(self, packed: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        return packed.view(torch.float16).reshape(shape).to(dtype)


def test_packed_linear_equals_linear_on_the_decoded_weight() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=generator).to(torch.float16)
    bias = torch.randn(6, generator=generator)
    layer = PackedLinear(weight.view(torch.uint8).flatten(), weight.shape, _Float16Bytes(), bias=bias,
                         compute_dtype=torch.float32)
    x = torch.randn(3, 4, generator=generator, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias).to(torch.bfloat16)
    assert torch.equal(layer(x), expected)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 6 * 4 * 2
    assert (layer.in_features, layer.out_features) == (4, 6)
    layer.to(torch.bfloat16)  # a dtype cast leaves the packed bytes alone
    assert layer.weight.dtype == torch.uint8


def test_packed_linear_refuses_non_byte_storage_and_non_matrix_shapes() -> None:
    with pytest.raises(TypeError, match="uint8"):
        PackedLinear(torch.zeros(4), torch.Size((2, 2)), _Float16Bytes(), bias=None, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="2-D"):
        PackedLinear(torch.zeros(8, dtype=torch.uint8), torch.Size((4,)), _Float16Bytes(), bias=None,
                     compute_dtype=torch.float32)


def test_active_counts_packed_layers_by_type() -> None:
    model = FluxTransformer2DModel.from_config(FluxConfig(
        num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        pooled_projection_dim=8, in_channels=4, axes_dims_rope=(2, 2, 4)))
    assert quantization.active(model) is None
    target = model.get_submodule("transformer_blocks.0.ff.net.2")
    assert isinstance(target, torch.nn.Linear)
    weight = target.weight.detach().to(torch.float16)
    packed = PackedLinear(weight.view(torch.uint8).flatten(), weight.shape, _Float16Bytes(), bias=target.bias,
                          compute_dtype=torch.float32)
    model.set_submodule("transformer_blocks.0.ff.net.2", packed)
    report = quantization.active(model)
    assert report is not None and report.packed == {"F16_BYTES": 1} and report.torchao is None
    assert [name for name, _ in packed_linears(model)] == ["transformer_blocks.0.ff.net.2"]


def test_flux_and_wan_declare_the_row_and_a_model_without_it_is_refused() -> None:
    for cls in (FluxTransformer2DModel, WanTransformer3DModel):
        row = cls.metadata()["quantization"]
        assert row.entries[:3] == ("gguf", "scaled_fp8", "torchao")
        assert any(entry.startswith("keep:") for entry in row.entries)
    tiny = TinyDiT.from_config(TinyDiTConfig())
    with pytest.raises(CapabilityError, match="quantization"):
        quantization.active(tiny)  # type: ignore[arg-type]
