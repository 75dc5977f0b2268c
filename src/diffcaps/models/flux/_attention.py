"""Flux attention: per-stream projections, RMS-normed queries and keys, RoPE, joint attention."""

from __future__ import annotations

from typing import Any, Final

import torch
from torch import Tensor, nn

from diffcaps.attention.spec import QKVFusion, QKVGroup, project_qkv
from diffcaps.layers import RMSNorm, apply_rope, module_attention
from diffcaps.services import ModuleTypes

__all__ = ["FLUX_QKV_FUSION", "KERNEL", "PROCESSOR", "FluxAttention"]

KERNEL: Final = "kernel"
"""The method joint attention runs through: ``kernel(query, key, value)`` on [batch, seq, heads, head_dim].

It calls :func:`diffcaps.layers.module_attention` (SDPA, or the attention backend set on the
instance). A feature may replace it on one instance with an
instance attribute of this name (context parallelism does, to run the distributed algorithm)
and delete it to restore.
"""

PROCESSOR: Final = "processor"
"""Where a feature attaches a module that adds an image-stream output to a joint attention.

Absent by default. When present, it is called with the image query (after ``norm_q``, before
RoPE) and the attention's keyword arguments, and its result is returned as a third output
that the double block adds to the image stream after its feed-forward. IP-Adapter uses it;
the name is the one diffusers' state dicts use for that attention's IP-Adapter weights.
"""


IMAGE_QKV: Final = QKVGroup(("to_q", "to_k", "to_v"), fused="to_qkv")
TEXT_QKV: Final = QKVGroup(("add_q_proj", "add_k_proj", "add_v_proj"), fused="to_added_qkv")


class FluxAttention(nn.Module):
    """Attention of a double block (``joint=True``: a second, text stream) or a single block."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, joint: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.joint = joint
        if joint:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
            self.norm_added_q = RMSNorm(head_dim, eps=eps)
            self.norm_added_k = RMSNorm(head_dim, eps=eps)
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_add_out = nn.Linear(inner, dim)

    def kernel(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Attention over the joint sequence (see ``KERNEL``), unless replaced on this instance."""
        return module_attention(self, query, key, value)

    def _heads(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:-1], -1, self.head_dim)

    def _qkv(self, x: Tensor, group: QKVGroup, norm_q: nn.Module, norm_k: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = project_qkv(self, x, group)
        query: Tensor = norm_q(self._heads(q))
        key: Tensor = norm_k(self._heads(k))
        return query, key, self._heads(v)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """Attend over ``[text; image]`` tokens; a joint block returns (image, text) outputs,
        plus the attached ``processor``'s output when there is one (see ``PROCESSOR``).
        """
        query, key, value = self._qkv(hidden_states, IMAGE_QKV, self.norm_q, self.norm_k)
        image_query = query
        text_len = 0
        if encoder_hidden_states is not None and self.joint:
            text_len = encoder_hidden_states.shape[1]
            t_query, t_key, t_value = self._qkv(encoder_hidden_states, TEXT_QKV, self.norm_added_q, self.norm_added_k)
            query = torch.cat([t_query, query], dim=1)
            key = torch.cat([t_key, key], dim=1)
            value = torch.cat([t_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rope(query, image_rotary_emb)
            key = apply_rope(key, image_rotary_emb)
        out = self.kernel(query, key, value).flatten(2, 3).to(query.dtype)
        if not text_len:
            return out
        text_out, image_out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image: Tensor = self.to_out[1](self.to_out[0](image_out.contiguous()))
        text: Tensor = self.to_add_out(text_out.contiguous())
        processor: nn.Module | None = getattr(self, PROCESSOR, None)
        if processor is None:
            return image, text
        extra: Tensor = processor(image_query, **kwargs)
        return image, text, extra


FLUX_QKV_FUSION: Final = QKVFusion(modules=ModuleTypes((FluxAttention,)), groups=(IMAGE_QKV, TEXT_QKV))
"""Both streams of a double block fuse separately (image ``to_qkv``, text ``to_added_qkv``, as in
diffusers); a single block has only the image group."""
