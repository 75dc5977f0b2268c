"""The attention call every model routes through: SDPA on [batch, seq, heads, head_dim] tensors.

:func:`module_attention` is the one place that decides which kernel an attention module runs:
the :class:`AttentionKernel` held in that module's ``InstanceSlot`` (the attention-backend
feature sets one), or :func:`attention` (SDPA) when none is set. The hot path is one slot read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, final

import attrs
import torch.nn.functional as F
from torch import Tensor, nn

from diffcaps.slots import InstanceSlot

__all__ = ["AttentionKernel", "attention", "attention_kernel", "module_attention", "set_attention_kernel"]

@final
@attrs.frozen
class AttentionKernel:
    """One attention backend: ``run(query, key, value, mask)`` on [batch, seq, heads, head_dim].

    ``context_parallel`` says whether context parallelism may run with it: its ring merge
    needs each partial result's log-sum-exp, which only the reference kernels give.
    """

    name: str
    run: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
    context_parallel: bool = False


_SLOT: Final = InstanceSlot("attention_kernel", AttentionKernel)
"""Where an attention module holds its :class:`AttentionKernel` (``_diffcaps_attention_kernel``)."""


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


def module_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     mask: Tensor | None = None) -> Tensor:
    """:func:`attention` for ``module``, through the kernel set on it when there is one."""
    kernel = _SLOT.get(module)
    if kernel is None:
        return attention(query, key, value, mask)
    out: Tensor = kernel.run(query, key, value, mask)
    return out


def attention_kernel(module: nn.Module) -> AttentionKernel | None:
    """The kernel set on ``module``, or ``None`` when it runs :func:`attention` (SDPA)."""
    return _SLOT.get(module)


def set_attention_kernel(module: nn.Module, kernel: AttentionKernel | None) -> None:
    """Make ``module`` run ``kernel`` (``None``: back to :func:`attention`)."""
    if kernel is None:
        _SLOT.clear(module)
    else:
        _SLOT.set(module, kernel)
