"""Seeded Flux models of every variant, at two sizes, and the original-layout files made from them."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Final

import torch

from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.models.flux._weight_mapping import rope_axes
from diffcaps.weights import save_single_file
from tests.flux_fixtures import seeded_model

VARIANTS: Final = ("flux-dev", "flux-schnell", "flux-fill", "flux-depth")
PREFIXES: Final = ("", "model.diffusion_model.", "diffusion_model.")
FILE_DTYPES: Final = (torch.float32, torch.bfloat16, torch.float8_e4m3fn)

# What each variant changes from FLUX.1-dev: input channels, output channels, guidance.
VARIANT_SHAPES: Final[dict[str, dict[str, object]]] = {
    "flux-dev": {"in_channels": 64, "out_channels": None, "guidance_embeds": True},
    "flux-schnell": {"in_channels": 64, "out_channels": None, "guidance_embeds": False},
    "flux-fill": {"in_channels": 384, "out_channels": 64, "guidance_embeds": True},
    "flux-depth": {"in_channels": 128, "out_channels": 64, "guidance_embeds": True},
}

# Two sizes, neither of them FLUX.1's: depth, heads, head width, text and pooled widths differ.
SIZES: Final[dict[str, dict[str, int]]] = {
    "small": {"num_layers": 1, "num_single_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
              "joint_attention_dim": 24, "pooled_projection_dim": 20},
    "medium": {"num_layers": 3, "num_single_layers": 2, "num_attention_heads": 3, "attention_head_dim": 32,
               "joint_attention_dim": 40, "pooled_projection_dim": 12},
}


def variant_config(variant: str, size: str) -> FluxConfig:
    """The config of a ``variant`` model at ``size``."""
    shape = SIZES[size]
    values = {"patch_size": 1, "axes_dims_rope": rope_axes(shape["attention_head_dim"]), **shape,
              **VARIANT_SHAPES[variant]}
    return FluxConfig.from_dict(values)


@functools.cache
def variant_model(variant: str, size: str, seed: int = 0) -> FluxTransformer2DModel:
    """A seeded ``variant`` model at ``size`` (built once per process: do not change it)."""
    return seeded_model(variant_config(variant, size), seed=seed)


def original_file(path: Path, model: FluxTransformer2DModel, *, prefix: str = "",
                  dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` in BFL's original layout through the reverse mapping."""
    return save_single_file(model, path, prefix=prefix, torch_dtype=dtype)


def as_stored(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model's state dict as a file in ``dtype`` holds it, read back in float32."""
    return {k: (v.to(dtype) if dtype is not None else v).to(torch.float32) for k, v in model.state_dict().items()}
