"""Flux's declared table: variants and configs read from real-sized headers, without any weights."""

from __future__ import annotations

import pytest
import torch

from diffcaps.errors import CheckpointError
from diffcaps.io import expected_tensors
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.models.flux._weight_mapping import rope_axes
from diffcaps.weights.spec import TensorSpec, WeightMapper

FLUX_WEIGHTS = FluxTransformer2DModel.declared_capabilities().weight_mapping

# FLUX.1's published transformer configs (the ``transformer/config.json`` of each repository).
FLUX1 = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
         "joint_attention_dim": 4096, "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56), "patch_size": 1}
RELEASED = {
    "flux-dev": FluxConfig.from_dict({**FLUX1, "in_channels": 64, "guidance_embeds": True}),
    "flux-schnell": FluxConfig.from_dict({**FLUX1, "in_channels": 64, "guidance_embeds": False}),
    "flux-fill": FluxConfig.from_dict({**FLUX1, "in_channels": 384, "out_channels": 64, "guidance_embeds": True}),
    "flux-depth": FluxConfig.from_dict({**FLUX1, "in_channels": 128, "out_channels": 64, "guidance_embeds": True}),
}


def original_header(config: FluxConfig, *, prefix: str = "",
                    dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """The header an original-layout file of this config has: shapes only, from a meta-device model."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(config)
    specs = {key: TensorSpec(shape=shape, dtype=dtype) for key, (shape, _) in expected_tensors(model).items()}
    plan = FLUX_WEIGHTS.plan(specs, "to_original", add=prefix)
    assert not plan.unused and not plan.missing
    return plan.target_specs(specs)


@pytest.mark.parametrize("variant", sorted(RELEASED))
def test_released_variants_are_recognised_and_configured_from_shapes(variant: str) -> None:
    config = RELEASED[variant]
    header = original_header(config, prefix="model.diffusion_model.")
    assert len(header) == 780 - (4 if variant == "flux-schnell" else 0)  # the tensor count of BFL's files
    assert header["model.diffusion_model.single_blocks.37.linear1.weight"].shape == (21504, 3072)
    found = FLUX_WEIGHTS.identify(header)
    assert (found.variant.name, found.layout, found.prefix) == (variant, "original", "model.diffusion_model.")
    assert FluxConfig.from_dict(found.config) == config


def test_any_depth_and_width_is_read_from_the_file() -> None:
    bigger = FluxConfig.from_dict({**FLUX1, "num_layers": 2, "num_single_layers": 41, "num_attention_heads": 40,
                                   "attention_head_dim": 96, "joint_attention_dim": 2048, "in_channels": 64,
                                   "axes_dims_rope": rope_axes(96), "guidance_embeds": True})
    found = FLUX_WEIGHTS.identify(original_header(bigger, prefix="diffusion_model."))
    assert found.variant.name == "flux-dev"
    assert FluxConfig.from_dict(found.config) == bigger


def test_a_file_in_diffusers_layout_is_recognised_as_such() -> None:
    with torch.device("meta"):
        model = FluxTransformer2DModel(RELEASED["flux-fill"])
    header = {k: TensorSpec(shape=s, dtype=torch.bfloat16) for k, (s, _) in expected_tensors(model).items()}
    found = FLUX_WEIGHTS.identify(header)
    assert (found.variant.name, found.layout, found.prefix) == ("flux-fill", "diffusers", "")
    assert FluxConfig.from_dict(found.config) == RELEASED["flux-fill"]
    assert all(step.sources == step.targets for step in found.plan.steps)


def test_rope_axes_are_even_and_fill_the_head() -> None:
    assert rope_axes(128) == (16, 56, 56)
    for head_dim in range(6, 258, 2):
        axes = rope_axes(head_dim)
        assert sum(axes) == head_dim and all(a % 2 == 0 and a > 0 for a in axes), head_dim


def test_inconsistent_width_is_a_clear_error() -> None:
    header = original_header(RELEASED["flux-dev"])
    header["double_blocks.0.img_attn.norm.query_norm.scale"] = TensorSpec(shape=(100,), dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="Flux flux-dev checkpoint, but cannot read num_attention_heads "
                                              r"\(width 3072 is not a multiple of the head width 100\)"):
        FLUX_WEIGHTS.identify(header)


def test_flux_declares_weight_mapping_in_its_metadata() -> None:
    assert isinstance(FluxTransformer2DModel.declared_capabilities().weight_mapping, WeightMapper)
    row = FluxTransformer2DModel.metadata()["weight_mapping"]
    assert row.entries == ("flux-depth", "flux-dev", "flux-fill", "flux-schnell")
    assert row.value == "flux-depth, flux-dev, flux-fill, flux-schnell"
    assert "flux-depth, flux-dev, flux-fill, flux-schnell" in FluxTransformer2DModel.metadata().describe()
