"""Wan attention: self-attention over video tokens (with RoPE) and cross-attention to the text
(and, for image-to-video models, to the image tokens too).

Queries and keys are RMS-normalised across all heads at once, before the heads are split.
"""

from __future__ import annotations

from typing import Final

from torch import Tensor, nn

from diffcaps.attention.spec import QKVFusion, QKVGroup, project_qkv
from diffcaps.errors import InputError
from diffcaps.layers import RMSNorm, apply_rope, module_attention
from diffcaps.services import ModuleTypes

__all__ = ["KERNEL", "WAN_QKV_FUSION", "WanCrossAttention", "WanSelfAttention"]

KERNEL: Final = "kernel"
"""The method attention runs through: ``kernel(query, key, value)`` on [batch, seq, heads, head_dim].
It calls :func:`diffcaps.layers.module_attention` (SDPA, or the attention backend set on the
instance); a feature may replace it on one instance with an
instance attribute of this name and delete it to restore."""


SELF_QKV: Final = QKVGroup(("to_q", "to_k", "to_v"), fused="to_qkv")


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.reshape(*x.shape[:2], heads, -1)


def _output(dim: int, inner: int) -> nn.ModuleList:
    return nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])


class WanSelfAttention(nn.Module):
    """A block's ``attn1``: the video tokens attend to each other, rotated by 3-D RoPE."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = _output(dim, inner)
        self.norm_q = RMSNorm(inner, eps=eps)
        self.norm_k = RMSNorm(inner, eps=eps)

    def kernel(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Attention over the token sequence (see ``KERNEL``), unless replaced on this instance."""
        return module_attention(self, query, key, value)

    def forward(self, hidden_states: Tensor, rotary_emb: tuple[Tensor, Tensor]) -> Tensor:
        """Attend over ``hidden_states`` [batch, seq, dim] with RoPE ``(cos, sin)`` [seq, head_dim]."""
        q, k, v = project_qkv(self, hidden_states, SELF_QKV)
        query = apply_rope(_heads(self.norm_q(q), self.heads), rotary_emb)
        key = apply_rope(_heads(self.norm_k(k), self.heads), rotary_emb)
        value = _heads(v, self.heads)
        out = self.kernel(query, key, value).flatten(2, 3).type_as(query)
        projected: Tensor = self.to_out[1](self.to_out[0](out))
        return projected


class WanCrossAttention(nn.Module):
    """A block's ``attn2``: the video tokens attend to the text tokens, and, when the model has
    an image embedder (``added_kv_proj_dim``), separately to the image tokens; the two results
    are summed before the output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, added_kv_proj_dim: int | None) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = _output(dim, inner)
        self.norm_q = RMSNorm(inner, eps=eps)
        self.norm_k = RMSNorm(inner, eps=eps)
        self.add_k_proj: nn.Linear | None = None
        self.add_v_proj: nn.Linear | None = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner)
            self.norm_added_k = RMSNorm(inner, eps=eps)

    def kernel(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Attention to the context (see ``KERNEL``), unless replaced on this instance."""
        return module_attention(self, query, key, value)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor,
                encoder_hidden_states_image: Tensor | None = None) -> Tensor:
        """Attend from ``hidden_states`` [batch, seq, dim] to the embedded text [batch, text, dim]
        and, for an image-to-video model, to the embedded image tokens [batch, image, dim]."""
        query = _heads(self.norm_q(self.to_q(hidden_states)), self.heads)
        key = _heads(self.norm_k(self.to_k(encoder_hidden_states)), self.heads)
        value = _heads(self.to_v(encoder_hidden_states), self.heads)
        image_out: Tensor | None = None
        if self.add_k_proj is not None and self.add_v_proj is not None:
            if encoder_hidden_states_image is None:
                raise InputError("this model attends to image tokens (added_kv_proj_dim is set): "
                                 "pass encoder_hidden_states_image")
            image_key = _heads(self.norm_added_k(self.add_k_proj(encoder_hidden_states_image)), self.heads)
            image_value = _heads(self.add_v_proj(encoder_hidden_states_image), self.heads)
            image_out = self.kernel(query, image_key, image_value).flatten(2, 3).type_as(query)
        out = self.kernel(query, key, value).flatten(2, 3).type_as(query)
        if image_out is not None:
            out = out + image_out
        projected: Tensor = self.to_out[1](self.to_out[0](out))
        return projected


WAN_QKV_FUSION: Final = QKVFusion(modules=ModuleTypes((WanSelfAttention,)), groups=(SELF_QKV,))
"""Self-attention only: cross-attention projects its query from the video tokens and its key
and value from the text (or image) tokens, so there is no one input to fuse over."""
