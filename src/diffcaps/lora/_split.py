"""Splitting an update of a fused module into its parts by rows, and joining parts back.

One file module can be several model modules stacked by rows (Flux's original ``qkv`` and
``linear1``). LoRA, LoKr and LoHa updates split exactly, each in its own way; a LoRA whose
up matrix is block-diagonal (kohya's ``split_qkv``) splits in the rank too.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

from diffcaps.lora._service import LoHaWeights, LoKrWeights, LoRAWeights, TargetWeights

__all__ = ["join_lora", "lokr_as_loha", "split_rows", "split_target", "swap_halves", "swapped"]


def split_rows(t: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """``t`` cut into consecutive row blocks of these sizes."""
    return list(torch.split(t, list(sizes), dim=0))


def swapped(t: Tensor) -> Tensor:
    """``t`` with its two row halves swapped."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _pair(factor: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    # a factor as a product u @ v (a full matrix is itself times the identity)
    if isinstance(factor, tuple):
        return factor
    return factor, torch.eye(factor.shape[1], dtype=factor.dtype)


def _padded(t: Tensor, rank: int, dim: int) -> Tensor:
    if t.shape[dim] == rank:
        return t
    shape = list(t.shape)
    shape[dim] = rank - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def lokr_as_loha(w: LoKrWeights) -> LoHaWeights:
    """The same update as a LoHa: ``kron(w1, w2) = kron(w1, 1) ⊙ kron(1, w2)``, both low rank.

    With ``w1 = u1 @ v1`` ([a, p] @ [p, b]) and ``w2 = u2 @ v2`` ([c, q] @ [q, d]):
    ``kron(w1, 1_{c×d}) = kron(u1, 1_c) @ kron(v1, 1_d^T)`` and
    ``kron(1_{a×b}, w2) = kron(1_a, u2) @ kron(1_b^T, v2)``; the smaller rank is zero-padded.
    Unlike a Kronecker product, this splits on any row boundary, so a LoKr on a fused module
    whose parts cut through rows of ``w1`` stays exact and small.
    """
    (u1, v1), (u2, v2) = _pair(w.w1), _pair(w.w2)
    a, b, c, d = u1.shape[0], v1.shape[1], u2.shape[0], v2.shape[1]
    rank = max(u1.shape[1], u2.shape[1])
    ones = u1.new_ones
    w1_a = torch.kron(u1, ones(c, 1))
    w1_b = torch.kron(v1, ones(1, d))
    w2_a = torch.kron(ones(a, 1), u2)
    w2_b = torch.kron(ones(1, b), v2)
    return LoHaWeights(w1_a=_padded(w1_a, rank, 1), w1_b=_padded(w1_b, rank, 0),
                       w2_a=_padded(w2_a, rank, 1), w2_b=_padded(w2_b, rank, 0), scale=w.scale)


def _rows_of(factor: Tensor | tuple[Tensor, Tensor], rows: slice) -> Tensor | tuple[Tensor, Tensor]:
    if isinstance(factor, tuple):
        return factor[0][rows], factor[1]
    return factor[rows]


def _factor_rows(factor: Tensor | tuple[Tensor, Tensor]) -> int:
    return factor[0].shape[0] if isinstance(factor, tuple) else factor.shape[0]


def swap_halves(w: TargetWeights) -> TargetWeights:
    """The same update with the two halves of its output rows swapped."""
    if isinstance(w, LoRAWeights):
        bias = swapped(w.bias) if w.bias is not None else None
        return attrs.evolve(w, up=swapped(w.up), bias=bias)
    if isinstance(w, LoHaWeights):
        return attrs.evolve(w, w1_a=swapped(w.w1_a), w2_a=swapped(w.w2_a))
    if _factor_rows(w.w1) % 2 == 0:
        half = _factor_rows(w.w1) // 2
        order = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
        w1 = (w.w1[0][order], w.w1[1]) if isinstance(w.w1, tuple) else w.w1[order]
        return attrs.evolve(w, w1=w1)
    return swap_halves(lokr_as_loha(w))


def split_target(w: TargetWeights, sizes: Sequence[int]) -> list[TargetWeights]:
    """Split an update of a fused module into consecutive row blocks, one per target.

    A LoRA whose up matrix is block-diagonal (each part uses only its own share of the rank,
    as kohya's ``split_qkv`` writes it) is split in the rank too; otherwise every part keeps
    the whole down matrix. LoHa splits its two left factors; LoKr splits its left factor when
    the blocks fall on its rows, and otherwise becomes the equivalent LoHa (:func:`lokr_as_loha`).
    """
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    if isinstance(w, LoRAWeights):
        return list(_split_lora(w, sizes, offsets))
    if isinstance(w, LoHaWeights):
        return [attrs.evolve(w, w1_a=w.w1_a[o:o + n], w2_a=w.w2_a[o:o + n]) for o, n in zip(offsets, sizes)]
    block = w.shape[0] // _factor_rows(w.w1)
    if all(o % block == 0 and n % block == 0 for o, n in zip(offsets, sizes)):
        return [attrs.evolve(w, w1=_rows_of(w.w1, slice(o // block, (o + n) // block)))
                for o, n in zip(offsets, sizes)]
    return split_target(lokr_as_loha(w), sizes)


def _split_lora(w: LoRAWeights, sizes: Sequence[int], offsets: Sequence[int]) -> list[LoRAWeights]:
    ups = split_rows(w.up, sizes)
    biases = split_rows(w.bias, sizes) if w.bias is not None else [None] * len(sizes)
    parts, share = len(sizes), w.rank // len(sizes)
    if w.rank % parts == 0 and _block_diagonal(ups, share):
        downs = split_rows(w.down, [share] * parts)
        return [LoRAWeights(down=d, up=u[:, i * share:(i + 1) * share], scale=w.scale, bias=b)
                for i, (d, u, b) in enumerate(zip(downs, ups, biases))]
    return [LoRAWeights(down=w.down, up=u, scale=w.scale, bias=b) for u, b in zip(ups, biases)]


def _block_diagonal(ups: Sequence[Tensor], share: int) -> bool:
    for i, up in enumerate(ups):
        if bool(up[:, : i * share].any()) or bool(up[:, (i + 1) * share:].any()):
            return False
    return True


def join_lora(parts: Sequence[LoRAWeights | None], sizes: Sequence[int]) -> LoRAWeights:
    """One LoRA for a fused module from the LoRAs of its row blocks (``None``: no update there).

    Parts that share one down matrix and one scale are joined by stacking their up matrices;
    otherwise the down matrices are stacked and the up matrix is block-diagonal, each part's
    scale folded into its block when the scales differ.
    """
    present = [(i, p) for i, p in enumerate(parts) if p is not None]
    if not present:
        raise ValueError("join_lora needs at least one part")
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    scales = {p.scale for _, p in present}
    scale = scales.pop() if len(scales) == 1 else 1.0
    first = present[0][1]
    dtype = first.up.dtype
    any_bias = any(p.bias is not None for _, p in present)
    bias = torch.zeros(sum(sizes), dtype=dtype) if any_bias else None
    shared = len(present) == len(parts) and all(p.down is first.down or torch.equal(p.down, first.down)
                                                 for _, p in present)
    rank = first.rank if shared else sum(p.rank for _, p in present)
    up = torch.zeros(sum(sizes), rank, dtype=dtype)
    column = 0
    downs = []
    for i, p in present:
        factor = p.scale / scale
        rows = slice(offsets[i], offsets[i] + sizes[i])
        width = first.rank if shared else p.rank
        up[rows, column:column + width] = p.up * factor if factor != 1.0 else p.up
        if bias is not None and p.bias is not None:
            bias[rows] = p.bias * factor if factor != 1.0 else p.bias
        if not shared:
            downs.append(p.down)
            column += p.rank
    down = first.down if shared else torch.cat(downs, dim=0)
    return LoRAWeights(down=down, up=up, scale=scale, bias=bias)
