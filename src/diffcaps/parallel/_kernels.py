"""The distributed attention kernels: Ulysses (all-to-all over heads), ring (K/V passed around the
ring, partial results merged by their log-sum-exp), and both on a 2-D grid.

All three take and return this rank's shard of the joint sequence as [batch, seq, heads,
head_dim]. Shards may have any length (a rank may even hold none) and the head count need not
divide by the Ulysses degree: the all-to-alls move uneven pieces, so nothing is padded or masked.
Attention over a sequence does not depend on the order of its keys, so each rank's shard may
mix text and image tokens: every query sees every key exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import final

import torch
from torch import Tensor

from diffcaps.errors import ParallelError
from diffcaps.parallel._layout import shard_sizes
from diffcaps.parallel._session import Session
from diffcaps.parallel._topology import Axis

__all__ = ["ContextParallelKernel", "attention_with_lse", "merge_partials"]

Kernel = Callable[[Tensor, Tensor, Tensor], Tensor]


def attention_with_lse(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention on [batch, heads, seq, dim] and the log-sum-exp of each query's scores (float32)."""
    batch, heads, length, dim = query.shape
    if query.numel() == 0 or key.shape[2] == 0:
        # the fused kernels fault on empty inputs; no keys means weight 0 in the merge
        out = query.new_zeros(batch, heads, length, value.shape[-1])
        return out, torch.full((batch, heads, length), float("-inf"), device=query.device)
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)
        return out, lse.float()
    if query.device.type == "cuda":
        try:
            out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True)
            return out, lse[..., :length].float()
        except RuntimeError:  # a dtype or shape the fused kernel does not take: use the plain math below
            pass
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * dim**-0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float()).to(query.dtype)
    return out, lse


def merge_partials(total: Tensor | None, total_lse: Tensor | None, out: Tensor,
                   lse: Tensor) -> tuple[Tensor, Tensor]:
    """Fold one partial attention result into a running one (online softmax), in float32."""
    if total is None or total_lse is None:
        return out.float(), lse
    merged = torch.logaddexp(total_lse, lse)
    total = total * torch.exp(total_lse - merged).unsqueeze(-1) + out.float() * torch.exp(lse - merged).unsqueeze(-1)
    return total, merged


def _offsets(sizes: list[int]) -> list[int]:
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    return starts


@final
class ContextParallelKernel:
    """Replaces one attention module's kernel while context parallelism is enabled."""

    def __init__(self, session: Session, name: str, original: Kernel) -> None:
        self.session = session
        self.name = name
        self.original = original

    def __call__(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        session = self.session
        topology = session.topology
        ulysses, ring = topology.ulysses, topology.ring
        if not query.shape == key.shape == value.shape:
            raise ParallelError(f"{self.name}: context parallelism runs self-attention over the split sequence "
                                "(query, key and value of one shape); "
                                f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        what = f"attention in {self.name}"
        lengths = session.lengths(query.shape[1], what, query.device)
        heads = query.shape[2]
        mine = [lengths[ring.index * ulysses.size + u] for u in range(ulysses.size)]
        head_sizes = list(shard_sizes(heads, ulysses.size))
        if ulysses.size > 1:
            stacked = torch.stack([query, key, value])
            stacked = _scatter_heads(session, stacked, mine, head_sizes, ulysses, what)
            query, key, value = stacked.unbind(0)
        if ring.size > 1:
            blocks = [sum(lengths[r * ulysses.size + u] for u in range(ulysses.size)) for r in range(ring.size)]
            out = _ring(session, query, key, value, blocks, ring, what)
        elif query.shape[2] == 0:
            out = query.new_zeros(query.shape[:3] + (value.shape[-1],))
        else:
            out = self.original(query, key, value)
        if ulysses.size > 1:
            out = _gather_heads(session, out, mine, head_sizes, ulysses, what)
        return out


def _scatter_heads(session: Session, stacked: Tensor, lengths: list[int], heads: list[int], axis: Axis,
                   what: str) -> Tensor:
    """[n, batch, own seq, all heads, dim] → [n, batch, group seq, own heads, dim]."""
    n, batch, _, _, dim = stacked.shape
    starts = _offsets(heads)
    send = torch.cat([stacked[:, :, :, s:s + h].reshape(-1) for s, h in zip(starts, heads, strict=True)])
    own = heads[axis.index]
    receive_sizes = [n * batch * length * own * dim for length in lengths]
    receive = send.new_empty(sum(receive_sizes))
    send_sizes = [n * batch * lengths[axis.index] * h * dim for h in heads]
    session.comm.all_to_all(receive, send, receive_sizes, send_sizes, axis, f"{what} (Ulysses all-to-all)")
    pieces = [piece.view(n, batch, length, own, dim)
              for piece, length in zip(torch.split(receive, receive_sizes), lengths, strict=True)]
    return torch.cat(pieces, dim=2)


def _gather_heads(session: Session, out: Tensor, lengths: list[int], heads: list[int], axis: Axis,
                  what: str) -> Tensor:
    """[batch, group seq, own heads, dim] → [batch, own seq, all heads, dim]."""
    batch, _, own, dim = out.shape
    starts = _offsets(lengths)
    send = torch.cat([out[:, s:s + n].reshape(-1) for s, n in zip(starts, lengths, strict=True)])
    mine = lengths[axis.index]
    receive_sizes = [batch * mine * h * dim for h in heads]
    receive = send.new_empty(sum(receive_sizes))
    send_sizes = [batch * n * own * dim for n in lengths]
    session.comm.all_to_all(receive, send, receive_sizes, send_sizes, axis, f"{what} (Ulysses all-to-all back)")
    pieces = [piece.view(batch, mine, h, dim) for piece, h in zip(torch.split(receive, receive_sizes), heads, strict=True)]
    return torch.cat(pieces, dim=2)


def _ring(session: Session, query: Tensor, key: Tensor, value: Tensor, blocks: list[int], axis: Axis,
          what: str) -> Tensor:
    """Ring attention: each step attends to one rank's K/V while the next block travels."""
    q = query.transpose(1, 2)
    batch, heads = q.shape[0], q.shape[1]
    kv = torch.stack([key, value]).contiguous()
    total: Tensor | None = None
    total_lse: Tensor | None = None
    for step in range(axis.size):
        incoming: Tensor | None = None
        works = None
        if step < axis.size - 1:
            origin = (axis.index - step - 1) % axis.size
            incoming = kv.new_empty((2, batch, blocks[origin], heads, kv.shape[-1]))
            works = [session.comm.shift(kv, incoming, axis)]
        k, v = kv.unbind(0)
        out, lse = attention_with_lse(q, k.transpose(1, 2), v.transpose(1, 2))
        total, total_lse = merge_partials(total, total_lse, out, lse)
        if works is not None and incoming is not None:
            session.comm.wait(works, f"{what} (ring K/V pass, step {step + 1} of {axis.size - 1})", axis.group)
            kv = incoming
    assert total is not None
    return total.to(query.dtype).transpose(1, 2)
