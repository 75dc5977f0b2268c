"""Flux's two repeated blocks: the double-stream (image + text) block and the single-stream block."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffcaps.layers import AdaLayerNormZero, AdaLayerNormZeroSingle, FeedForward, modulate
from diffcaps.models.flux._attention import FluxAttention

__all__ = ["FluxSingleTransformerBlock", "FluxTransformerBlock"]

_EPS = 1e-6
_FP16_MAX = 65504.0


def _clip_fp16(x: Tensor) -> Tensor:
    return x.clip(-_FP16_MAX, _FP16_MAX) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """A double-stream block: image and text keep their own weights and attend jointly."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, heads, head_dim, joint=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=_EPS)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=_EPS)
        self.ff_context = FeedForward(dim)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        temb: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(encoder_hidden_states, hidden_states)``, text first."""
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        normed_ctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)
        outputs = self.attn(normed, normed_ctx, image_rotary_emb, **(joint_attention_kwargs or {}))
        attn_out, ctx_attn_out = outputs[0], outputs[1]

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
        normed = modulate(self.norm2(hidden_states), shift_mlp[:, None], scale_mlp[:, None])
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(normed)
        if len(outputs) == 3:  # an attention that also returns an image-prompt residual
            hidden_states = hidden_states + outputs[2]

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * ctx_attn_out
        normed_ctx = modulate(self.norm2_context(encoder_hidden_states), c_shift_mlp[:, None], c_scale_mlp[:, None])
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(normed_ctx)
        return _clip_fp16(encoder_hidden_states), hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """A single-stream block: text and image tokens share weights; attention and MLP run in parallel."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, self.mlp_hidden_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, joint=False)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        temb: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(encoder_hidden_states, hidden_states)``, text first."""
        text_len = encoder_hidden_states.shape[1]
        joined = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        normed, gate = self.norm(joined, temb)
        mlp: Tensor = self.act_mlp(self.proj_mlp(normed))
        attn_out: Tensor = self.attn(normed, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
        mixed: Tensor = self.proj_out(torch.cat([attn_out, mlp], dim=2))
        joined = _clip_fp16(joined + gate.unsqueeze(1) * mixed)
        return joined[:, :text_len], joined[:, text_len:]
