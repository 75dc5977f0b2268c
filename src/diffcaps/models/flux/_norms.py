"""Adaptive layer norms: the conditioning vector sets each block's shift, scale and gate."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AdaLayerNormContinuous", "AdaLayerNormZero", "AdaLayerNormZeroSingle"]

EPS = 1e-6


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """Modulation for a double block: six vectors, the first pair applied here."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        params: Tensor = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = params.chunk(6, dim=1)
        normed: Tensor = self.norm(x)
        return _modulate(normed, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """Modulation for a single block: shift, scale and one gate."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        params: Tensor = self.linear(self.silu(emb))
        shift, scale, gate = params.chunk(3, dim=1)
        normed: Tensor = self.norm(x)
        return _modulate(normed, shift, scale), gate


class AdaLayerNormContinuous(nn.Module):
    """The output norm: scale then shift (in that order in the weight), no gate."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        params: Tensor = self.linear(self.silu(emb).to(x.dtype))
        scale, shift = torch.chunk(params, 2, dim=1)
        normed: Tensor = self.norm(x)
        return _modulate(normed, shift, scale)
