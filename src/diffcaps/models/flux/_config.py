"""``FluxConfig``: Flux transformer hyper-parameters under diffusers' names and defaults."""

from __future__ import annotations

from typing import ClassVar

import attrs

from diffcaps.config import ModelConfig, at_least
from diffcaps.errors import ConfigError

__all__ = ["FluxConfig"]


@attrs.frozen(kw_only=True)
class FluxConfig(ModelConfig):
    """Hyper-parameters of ``FluxTransformer2DModel`` (defaults are FLUX.1's, without guidance).

    Sizes are positive integers (block counts may be 0); ``axes_dims_rope`` are the RoPE
    widths of the (t, h, w) position axes: even, and summing to ``attention_head_dim``.
    """

    class_name: ClassVar[str] = "FluxTransformer2DModel"

    patch_size: int = at_least(1, default=1)
    in_channels: int = at_least(1, default=64)
    out_channels: int | None = at_least(1, default=None)
    num_layers: int = at_least(0, default=19)
    num_single_layers: int = at_least(0, default=38)
    attention_head_dim: int = at_least(1, default=128)
    num_attention_heads: int = at_least(1, default=24)
    joint_attention_dim: int = at_least(1, default=4096)
    pooled_projection_dim: int = at_least(1, default=768)
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = at_least(0, default=(16, 56, 56))

    def __attrs_post_init__(self) -> None:
        axes = self.axes_dims_rope
        if sum(axes) != self.attention_head_dim or any(d % 2 for d in axes):
            raise ConfigError(
                f"field 'axes_dims_rope' = {list(axes)}: expected even widths summing to "
                f"attention_head_dim ({self.attention_head_dim})"
            )

    @property
    def inner_dim(self) -> int:
        """Width of the transformer: heads × head dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """``out_channels``, defaulting to ``in_channels``."""
        return self.out_channels or self.in_channels
