"""Wan's position and condition embeddings: 3-D RoPE from the latent's grid, and the timestep,
text and image embedders (``condition_embedder``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffcaps.errors import InputError
from diffcaps.layers import (
    FeedForward,
    FP32LayerNorm,
    TextProjection,
    TimestepEmbedding,
    grid_position_ids,
    rope_frequencies,
    timestep_embedding,
)

__all__ = ["WanImageEmbedding", "WanRotaryEmbedding", "WanTimeTextImageEmbedding"]


class WanRotaryEmbedding(nn.Module):
    """RoPE over (frame, row, column) of the patch grid; holds no tensors.

    ``forward(latents)`` returns ``(cos, sin)`` [tokens, head_dim] in float32 for latents
    [batch, channels, frames, height, width]. Positions past ``max_seq_len`` on any axis are
    refused (diffusers precomputes that many).
    """

    def __init__(self, axes_dim: tuple[int, int, int], patch_size: tuple[int, int, int], max_seq_len: int) -> None:
        super().__init__()
        self.axes_dim = axes_dim
        self.patch_size = patch_size
        self.max_seq_len = max_seq_len

    def forward(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Frequencies for every patch of ``latents``, in token order."""
        grid = [size // patch for size, patch in zip(latents.shape[2:], self.patch_size, strict=True)]
        if max(grid) > self.max_seq_len:
            raise InputError(f"the patch grid {grid} (frames, height, width) exceeds rope_max_seq_len "
                             f"{self.max_seq_len} on some axis")
        ids = grid_position_ids(*grid, device=latents.device)
        return rope_frequencies(ids, self.axes_dim)


class WanImageEmbedding(nn.Module):
    """Projects image-encoder tokens to the model width: ``norm1`` → ``ff`` (GELU, width kept) → ``norm2``.

    With ``pos_embed_seq_len`` (Wan FLF2V), pairs of samples' tokens (first and last frame) are
    joined into one sequence and a learned ``pos_embed`` is added: the batch halves.
    """

    def __init__(self, in_features: int, out_features: int, pos_embed_seq_len: int | None) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(in_features)
        self.ff = FeedForward(in_features, out_features, mult=1, approximate="none")
        self.norm2 = FP32LayerNorm(out_features)
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_features)) if pos_embed_seq_len is not None else None
        )

    def forward(self, image: Tensor) -> Tensor:
        """Embed image tokens [batch, tokens, in_features]."""
        if self.pos_embed is not None:
            image = image.reshape(-1, 2 * image.shape[1], image.shape[2]) + self.pos_embed
        hidden: Tensor = self.ff(self.norm1(image))
        out: Tensor = self.norm2(hidden)
        return out


class WanTimeTextImageEmbedding(nn.Module):
    """The conditioning: timestep embedding and its 6-way projection, the text and image tokens."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, image_dim: int | None,
                 pos_embed_seq_len: int | None, modulations: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, modulations * dim)
        self.text_embedder = TextProjection(text_dim, dim, activation="gelu_tanh")
        self.image_embedder = (
            WanImageEmbedding(image_dim, dim, pos_embed_seq_len) if image_dim is not None else None
        )

    def forward(
        self,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_image: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(temb, projected timestep, text tokens, image tokens)``.

        ``timestep`` is [batch] or per token [batch, seq]; ``temb`` and the projection keep
        that leading shape. ``temb`` is in the text input's dtype; the timestep MLP runs in
        its own weights' dtype (float32 when kept there).
        """
        features = timestep_embedding(timestep.flatten(), self.freq_dim, flip_sin_to_cos=True,
                                      downscale_freq_shift=0).reshape(*timestep.shape, self.freq_dim)
        weight_dtype = self.time_embedder.linear_1.weight.dtype
        if weight_dtype.is_floating_point:  # not for integer-quantized weights
            features = features.to(weight_dtype)
        temb: Tensor = self.time_embedder(features)
        temb = temb.to(encoder_hidden_states.dtype)
        projected: Tensor = self.time_proj(self.act_fn(temb))
        text: Tensor = self.text_embedder(encoder_hidden_states)
        image: Tensor | None = None
        if encoder_hidden_states_image is not None:
            if self.image_embedder is None:
                raise InputError("encoder_hidden_states_image was passed, but this model has no image embedder "
                                 "(image_dim is null)")
            image = self.image_embedder(encoder_hidden_states_image)
        return temb, projected, text, image
