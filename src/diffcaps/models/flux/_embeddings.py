"""Flux's conditioning embeddings: sinusoidal timesteps, their MLPs, and 3-axis RoPE."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["FluxPosEmbed", "TimeTextEmbedding", "sinusoidal_embedding"]

TIMESTEP_CHANNELS = 256


def sinusoidal_embedding(values: Tensor, channels: int = TIMESTEP_CHANNELS, max_period: float = 10000.0) -> Tensor:
    """Embed a 1-D tensor of (possibly fractional) steps as ``[cos | sin]`` features."""
    half = channels // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    angles = values[:, None].float() * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear → SiLU → Linear, as used for timestep, guidance and pooled-text embeddings."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        hidden: Tensor = self.act(self.linear_1(x))
        out: Tensor = self.linear_2(hidden)
        return out


class TimeTextEmbedding(nn.Module):
    """The conditioning vector: timestep (+ guidance) embedding plus the pooled text projection."""

    def __init__(self, dim: int, pooled_projection_dim: int, *, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim)
        self.guidance_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_projection_dim, dim)

    def forward(self, timestep: Tensor, guidance: Tensor | None, pooled: Tensor) -> Tensor:
        dtype = pooled.dtype
        emb: Tensor = self.timestep_embedder(sinusoidal_embedding(timestep).to(dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model embeds guidance (guidance_embeds=True): pass `guidance`")
            emb = emb + self.guidance_embedder(sinusoidal_embedding(guidance).to(dtype))
        text: Tensor = self.text_embedder(pooled)
        return emb + text


class FluxPosEmbed(nn.Module):
    """Rotary position frequencies over the (t, h, w) id axes; has no weights."""

    def __init__(self, axes_dim: tuple[int, ...], theta: float = 10000.0) -> None:
        super().__init__()
        self.axes_dim = tuple(axes_dim)
        self.theta = theta

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        # float64 frequencies match the reference on CPU/CUDA; MPS has no float64.
        freq_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
        positions = ids.float()
        cos_parts, sin_parts = [], []
        for axis, dim in enumerate(self.axes_dim):
            exponents = torch.arange(0, dim, 2, dtype=freq_dtype, device=ids.device) / dim
            inv_freq = 1.0 / (self.theta**exponents)
            angles = torch.outer(positions[:, axis], inv_freq)
            cos_parts.append(angles.cos().repeat_interleave(2, dim=1).float())
            sin_parts.append(angles.sin().repeat_interleave(2, dim=1).float())
        return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rope(x: Tensor, freqs: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate ``x`` [batch, seq, heads, head_dim] by interleaved-pair RoPE frequencies [seq, head_dim]."""
    cos, sin = (f[None, :, None, :].to(x.device) for f in freqs)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
