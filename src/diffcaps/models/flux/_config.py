"""``FluxConfig``: Flux transformer hyper-parameters under diffusers' names and defaults."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from diffcaps.config import ModelConfig

__all__ = ["FluxConfig"]


def _axes(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _check_axes(config: FluxConfig, attribute: attrs.Attribute[tuple[int, ...]], value: tuple[int, ...]) -> None:
    # attrs runs validators once every field is set, so the head dim is there to compare with.
    if sum(value) != config.attention_head_dim or any(d % 2 for d in value):
        raise ValueError(
            f"axes_dims_rope {list(value)} must be even and sum to attention_head_dim "
            f"({config.attention_head_dim})"
        )


@attrs.frozen(kw_only=True)
class FluxConfig(ModelConfig):
    """Hyper-parameters of ``FluxTransformer2DModel`` (defaults are FLUX.1's, without guidance)."""

    class_name: ClassVar[str] = "FluxTransformer2DModel"

    patch_size: int = attrs.field(default=1, validator=_positive)
    in_channels: int = attrs.field(default=64, validator=_positive)
    out_channels: int | None = None
    num_layers: int = attrs.field(default=19, validator=_non_negative)
    num_single_layers: int = attrs.field(default=38, validator=_non_negative)
    attention_head_dim: int = attrs.field(default=128, validator=_positive)
    num_attention_heads: int = attrs.field(default=24, validator=_positive)
    joint_attention_dim: int = attrs.field(default=4096, validator=_positive)
    pooled_projection_dim: int = attrs.field(default=768, validator=_positive)
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = attrs.field(default=(16, 56, 56), converter=_axes, validator=_check_axes)

    @property
    def inner_dim(self) -> int:
        """Width of the transformer: heads × head dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """``out_channels``, defaulting to ``in_channels``."""
        return self.out_channels or self.in_channels
