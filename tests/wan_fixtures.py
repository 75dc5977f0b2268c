"""Small seeded Wan models, inputs and diffusers twins shared by the tests."""

from __future__ import annotations

from typing import Any

import torch

from diffcaps.models.wan import WanConfig, WanTransformer3DModel

DIFFUSERS_TEXT_TOKENS = 512
"""diffusers' Wan attention assumes 512 text tokens when it splits off image tokens."""

T2V = WanConfig(
    num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=32,
    ffn_dim=40, num_layers=2, rope_max_seq_len=32,
)
I2V = WanConfig(
    num_attention_heads=2, attention_head_dim=12, in_channels=6, out_channels=4, text_dim=16, freq_dim=32,
    ffn_dim=40, num_layers=2, image_dim=20, added_kv_proj_dim=24, rope_max_seq_len=32,
)
FLF2V = WanConfig(
    num_attention_heads=2, attention_head_dim=12, in_channels=6, out_channels=4, text_dim=16, freq_dim=32,
    ffn_dim=40, num_layers=1, image_dim=20, added_kv_proj_dim=24, rope_max_seq_len=32, pos_embed_seq_len=10,
)
TI2V = WanConfig(
    patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=8, in_channels=8, out_channels=8,
    text_dim=12, freq_dim=16, ffn_dim=36, num_layers=2, cross_attn_norm=False, rope_max_seq_len=16,
)

CONFIGS: dict[str, WanConfig] = {"t2v": T2V, "i2v": I2V, "flf2v": FLF2V, "ti2v": TI2V}


def seeded_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A reproducible state dict for ``model``: normal weights scaled so activations stay sane."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        values = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        scale = 1.0 / max(1, tensor.shape[-1]) ** 0.5 if tensor.ndim > 1 else 0.1
        if name.endswith("patch_embedding.weight"):
            scale = 1.0 / (tensor[0].numel() ** 0.5)
        parts = name.split(".")
        if len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight":
            values, scale = 1.0 + 0.1 * values, 1.0
        state[name] = (values * scale).to(tensor.dtype)
    return state


def seeded_model(config: WanConfig, seed: int = 0) -> WanTransformer3DModel:
    """A diffcaps Wan model holding ``seeded_state`` weights."""
    model = WanTransformer3DModel.from_config(config)
    model.load_state_dict(seeded_state(model, seed))
    return model.eval()


def diffusers_wan(config: WanConfig, state: dict[str, torch.Tensor]) -> Any:
    """diffusers' ``WanTransformer3DModel`` with the same config and weights (the oracle)."""
    from diffusers import WanTransformer3DModel as DiffusersWan

    kwargs = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    oracle = DiffusersWan(**kwargs)
    oracle.load_state_dict(state)
    return oracle.eval()


def wan_inputs(config: WanConfig, *, batch: int = 1, frames: int = 3, height: int = 4, width: int = 6,
               text: int = 7, image: int = 5, per_token: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded forward inputs; image tokens for image-conditioned configs (text padded to 512 for them)."""
    generator = torch.Generator().manual_seed(seed)
    p_t, p_h, p_w = config.patch_size
    tokens = (frames // p_t) * (height // p_h) * (width // p_w)
    inputs: dict[str, torch.Tensor] = {
        "hidden_states": torch.randn(batch, config.in_channels, frames, height, width, generator=generator),
    }
    if per_token:
        inputs["timestep"] = torch.randint(0, 1000, (batch, tokens), generator=generator).float()
    else:
        inputs["timestep"] = torch.tensor([999.0, 437.0, 12.0][:batch] + [500.0] * max(0, batch - 3))
    if config.image_dim is not None:
        text = DIFFUSERS_TEXT_TOKENS
        pairs = 2 if config.pos_embed_seq_len is not None else 1
        inputs["encoder_hidden_states_image"] = torch.randn(
            batch * pairs, (config.pos_embed_seq_len or 2 * image) // 2 if pairs == 2 else image, config.image_dim,
            generator=generator,
        )
    inputs["encoder_hidden_states"] = torch.randn(batch, text, config.text_dim, generator=generator)
    return {k: (v.to(dtype) if v.is_floating_point() and k != "timestep" else v) for k, v in inputs.items()}
