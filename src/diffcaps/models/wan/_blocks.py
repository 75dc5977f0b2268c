"""Wan's one repeated block: modulated self-attention, cross-attention, modulated feed-forward.

The residual stream is updated in float32 and kept in the input's dtype; the modulation
vectors come from the block's ``scale_shift_table`` plus the projected timestep (one per
sample, or one per token for Wan 2.2 TI2V).
"""

from __future__ import annotations

from torch import Tensor, nn

from diffcaps.layers import FeedForward, FP32LayerNorm, modulate, modulation_table, table_modulation
from diffcaps.models.wan._attention import WanCrossAttention, WanSelfAttention

__all__ = ["MODULATIONS", "WanTransformerBlock"]

MODULATIONS = 6
"""Vectors per block: shift, scale and gate for attention, then for the feed-forward."""


class WanTransformerBlock(nn.Module):
    """One Wan block (diffusers' parameter names: ``attn1``, ``attn2``, ``ffn``, ``norm2``, ``scale_shift_table``)."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, *, cross_attn_norm: bool, eps: float,
                 added_kv_proj_dim: int | None) -> None:
        super().__init__()
        head_dim = dim // heads
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanSelfAttention(dim, heads, head_dim, eps)
        self.attn2 = WanCrossAttention(dim, heads, head_dim, eps, added_kv_proj_dim)
        self.norm2: nn.Module = FP32LayerNorm(dim, eps) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = modulation_table(MODULATIONS, dim)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        temb: Tensor,
        rotary_emb: tuple[Tensor, Tensor],
        encoder_hidden_states_image: Tensor | None = None,
    ) -> Tensor:
        """Update ``hidden_states`` [batch, seq, dim].

        ``temb`` is the projected timestep, [batch, 6, dim] or per token [batch, seq, 6, dim];
        ``encoder_hidden_states`` the embedded text, ``encoder_hidden_states_image`` the
        embedded image tokens of an image-to-video model.
        """
        dtype = hidden_states.dtype
        shift, scale, gate, ff_shift, ff_scale, ff_gate = table_modulation(self.scale_shift_table, temb.float())
        normed = modulate(self.norm1(hidden_states.float()), shift, scale).to(dtype)
        attn_out: Tensor = self.attn1(normed, rotary_emb)
        hidden_states = (hidden_states.float() + attn_out * gate).to(dtype)
        normed = self.norm2(hidden_states.float()).to(dtype)
        cross_out: Tensor = self.attn2(normed, encoder_hidden_states, encoder_hidden_states_image)
        hidden_states = hidden_states + cross_out
        normed = modulate(self.norm3(hidden_states.float()), ff_shift, ff_scale).to(dtype)
        ff_out: Tensor = self.ffn(normed)
        return (hidden_states.float() + ff_out.float() * ff_gate).to(dtype)
