"""Conditioning embeddings: sinusoidal timestep features and the MLPs that project them."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TextProjection", "TimestepEmbedding", "timestep_embedding"]


def timestep_embedding(
    t: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> Tensor:
    """Sinusoidal features [n, dim] of a 1-D tensor of (possibly fractional) steps.

    Frequencies are ``max_period ** (-i / (dim // 2 - downscale_freq_shift))``; the halves are
    ``[sin | cos]``, or ``[cos | sin]`` with ``flip_sin_to_cos``; an odd ``dim`` gets a zero
    last column. Defaults are diffusers' ``get_timestep_embedding``'s.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor, got shape {list(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    frequencies = torch.exp(exponent / (half - downscale_freq_shift))
    angles = scale * (t[:, None].float() * frequencies[None, :])
    halves = [torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos else [torch.sin(angles), torch.cos(angles)]
    embedding = torch.cat(halves, dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


class TimestepEmbedding(nn.Module):
    """``linear_1`` → SiLU → ``linear_2``: projects sinusoidal features to the model width."""

    def __init__(self, in_channels: int, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        """Embed features [..., in_channels]."""
        hidden: Tensor = self.act(self.linear_1(x))
        out: Tensor = self.linear_2(hidden)
        return out


class TextProjection(nn.Module):
    """``linear_1`` → activation → ``linear_2``: projects a text embedding to the model width.

    ``activation`` is SiLU or tanh-approximated GELU (diffusers' default for this layer).
    """

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        out_features: int | None = None,
        *,
        activation: Literal["silu", "gelu_tanh"] = "gelu_tanh",
    ) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1: nn.Module = nn.SiLU() if activation == "silu" else nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, out_features or hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """Project features [..., in_features]."""
        hidden: Tensor = self.act_1(self.linear_1(x))
        out: Tensor = self.linear_2(hidden)
        return out
