"""Small seeded Flux models, inputs and folders shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel

TINY = FluxConfig(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    in_channels=8,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

PARITY_CONFIGS: dict[str, FluxConfig] = {
    "dev-like": TINY,
    "schnell-like": FluxConfig(
        num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=16, pooled_projection_dim=12, in_channels=16, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ),
    "patch2-odd-channels": FluxConfig(
        patch_size=2, in_channels=12, out_channels=6, num_layers=2, num_single_layers=1,
        attention_head_dim=12, num_attention_heads=3, joint_attention_dim=20,
        pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(4, 4, 4),
    ),
}


def seeded_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A reproducible state dict for ``model``: normal weights, scaled so activations stay sane."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        values = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        scale = 1.0 / max(1, tensor.shape[-1]) ** 0.5 if tensor.ndim > 1 else 0.1
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            values = 1.0 + 0.1 * values
            scale = 1.0
        state[name] = (values * scale).to(tensor.dtype)
    return state


def seeded_model(config: FluxConfig, seed: int = 0) -> FluxTransformer2DModel:
    """A diffcaps Flux model holding ``seeded_state`` weights."""
    model = FluxTransformer2DModel.from_config(config)
    model.load_state_dict(seeded_state(model, seed))
    return model.eval()


def flux_inputs(config: FluxConfig, *, batch: int = 1, height: int = 4, width: int = 4,
                text_tokens: int = 5, seed: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Forward keyword arguments for a ``height``×``width`` grid of packed latents."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    image_tokens = height * width
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    inputs: dict[str, Any] = {
        "hidden_states": randn(batch, image_tokens, config.in_channels),
        "encoder_hidden_states": randn(batch, text_tokens, config.joint_attention_dim),
        "pooled_projections": randn(batch, config.pooled_projection_dim),
        "timestep": torch.rand(batch, generator=generator).to(dtype),
        "img_ids": img_ids.reshape(image_tokens, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, dtype=dtype)
    return inputs


def diffusers_flux(config: FluxConfig, state: dict[str, torch.Tensor]) -> Any:
    """The oracle: diffusers' Flux transformer with the same config and weights."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel as DiffusersFlux

    kwargs = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    model = DiffusersFlux(**kwargs)
    model.load_state_dict(state)
    return model.eval()


def save_tiny_folder(path: Path, config: FluxConfig = TINY, seed: int = 0, **save: Any) -> FluxTransformer2DModel:
    """Save a seeded model as a diffusers folder and return it."""
    model = seeded_model(config, seed)
    model.save_pretrained(path, **save)
    return model
