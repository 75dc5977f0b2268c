"""The attention call every model routes through: SDPA on [batch, seq, heads, head_dim] tensors."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention"]


def attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention on [batch, seq, heads, head_dim] tensors.

    ``mask`` broadcasts to [batch, heads, query_seq, key_seq]: a boolean mask keeps the
    positions that are ``True``, a float mask is added to the attention logits.
    Returns [batch, query_seq, heads, head_dim].
    """
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)
