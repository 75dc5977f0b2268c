"""Rotary position embeddings over any number of integer position axes (N-D RoPE).

Each token has one integer position per axis (Flux: (index, row, column); a video model:
(frame, row, column)). Axis ``i`` owns ``axes_dim[i]`` channels of the head dimension,
rotated in adjacent pairs ``(x[2j], x[2j+1])`` by ``position * theta ** (-2j / axes_dim[i])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "apply_rope", "grid_position_ids", "rope_frequencies"]


def rope_frequencies(ids: Tensor, axes_dim: Sequence[int], theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each [seq, sum(axes_dim)] float32, for position ids [seq, len(axes_dim)].

    Each angle is repeated for the two channels of its pair, the layout :func:`apply_rope` expects.
    """
    if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"position ids must be [seq, {len(axes_dim)}], got {list(ids.shape)}")
    # float64 frequencies match the reference implementations on CPU/CUDA; MPS has no float64.
    freq_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    positions = ids.float()
    cos_parts: list[Tensor] = []
    sin_parts: list[Tensor] = []
    for axis, dim in enumerate(axes_dim):
        if dim % 2:
            raise ValueError(f"every RoPE axis needs an even channel count, got {list(axes_dim)}")
        exponents = torch.arange(0, dim, 2, dtype=freq_dtype, device=ids.device) / dim
        inv_freq = 1.0 / (theta**exponents)
        angles = torch.outer(positions[:, axis], inv_freq)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rope(x: Tensor, freqs: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate ``x`` [batch, seq, heads, head_dim] by ``(cos, sin)`` [seq, head_dim] from :func:`rope_frequencies`.

    Computed in float32 and returned in ``x``'s dtype.
    """
    cos, sin = (f[None, :, None, :].to(x.device) for f in freqs)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def grid_position_ids(*sizes: int, device: torch.device | None = None) -> Tensor:
    """Position ids [prod(sizes), len(sizes)] of a row-major grid, e.g. ``(frames, height, width)``."""
    axes = [torch.arange(size, device=device) for size in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


class RotaryEmbedding(nn.Module):
    """:func:`rope_frequencies` as a module (it has no weights): ``forward(ids) -> (cos, sin)``."""

    def __init__(self, axes_dim: Sequence[int], theta: float = 10000.0) -> None:
        super().__init__()
        self.axes_dim = tuple(axes_dim)
        self.theta = theta

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Frequencies for position ids [seq, len(axes_dim)]."""
        return rope_frequencies(ids, self.axes_dim, self.theta)
