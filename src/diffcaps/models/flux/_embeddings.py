"""Flux's conditioning vector: timestep (and guidance) embeddings plus the pooled text projection."""

from __future__ import annotations

from typing import Final

from torch import Tensor, nn

from diffcaps.layers import TextProjection, TimestepEmbedding, timestep_embedding

__all__ = ["TimeTextEmbedding"]

TIMESTEP_CHANNELS: Final = 256


def _sinusoidal(steps: Tensor) -> Tensor:
    return timestep_embedding(steps, TIMESTEP_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)


class TimeTextEmbedding(nn.Module):
    """The conditioning vector: timestep (+ guidance) embedding plus the pooled text projection."""

    def __init__(self, dim: int, pooled_projection_dim: int, *, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, dim)
        self.guidance_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, dim) if guidance else None
        self.text_embedder = TextProjection(pooled_projection_dim, dim, activation="silu")

    def forward(self, timestep: Tensor, guidance: Tensor | None, pooled: Tensor) -> Tensor:
        """Embed the (already ×1000) ``timestep`` and ``guidance`` and add the ``pooled`` text projection."""
        dtype = pooled.dtype
        emb: Tensor = self.timestep_embedder(_sinusoidal(timestep).to(dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model embeds guidance (guidance_embeds=True): pass `guidance`")
            emb = emb + self.guidance_embedder(_sinusoidal(guidance).to(dtype))
        text: Tensor = self.text_embedder(pooled)
        return emb + text
