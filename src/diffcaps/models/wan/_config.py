"""``WanConfig``: Wan transformer hyper-parameters under diffusers' names and defaults."""

from __future__ import annotations

from typing import Any, ClassVar, Final

import attrs

from diffcaps.config import ModelConfig

__all__ = ["QK_NORMS", "WanConfig"]

QK_NORMS: Final = ("rms_norm_across_heads", None)
"""Accepted ``qk_norm`` values. diffusers 0.42.1 builds the same across-heads RMSNorm for
both (it does not read the value), so diffcaps does too."""


def _patch(value: Any) -> tuple[int, int, int]:
    sizes = tuple(int(v) for v in value)
    if len(sizes) != 3 or any(v <= 0 for v in sizes):
        raise ValueError(f"patch_size must be three positive sizes (frames, height, width), got {list(value)}")
    return sizes[0], sizes[1], sizes[2]


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _optional_positive(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be positive or null, got {value}")


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _even(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0 or value % 2:
        raise ValueError(f"{attribute.name} must be a positive even number (RoPE rotates channel pairs), got {value}")


def _check_qk_norm(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in QK_NORMS:
        raise ValueError(f"qk_norm must be one of {list(QK_NORMS)}, got {value!r}")


@attrs.frozen(kw_only=True)
class WanConfig(ModelConfig):
    """Hyper-parameters of ``WanTransformer3DModel`` (defaults are diffusers', i.e. Wan 2.1 14B's).

    Wan 2.1 T2V 1.3B: ``num_attention_heads=12``, ``ffn_dim=8960``, ``num_layers=30``; I2V
    adds ``image_dim=1280`` and ``added_kv_proj_dim=5120``; Wan 2.2 TI2V-5B:
    ``num_attention_heads=24``, ``in_channels=out_channels=48``, ``ffn_dim=14336``,
    ``num_layers=30``. The A14B experts use the defaults with ``in_channels=36`` (I2V) or 16.
    """

    class_name: ClassVar[str] = "WanTransformer3DModel"

    patch_size: tuple[int, int, int] = attrs.field(default=(1, 2, 2), converter=_patch)
    num_attention_heads: int = attrs.field(default=40, validator=_positive)
    attention_head_dim: int = attrs.field(default=128, validator=_even)
    in_channels: int = attrs.field(default=16, validator=_positive)
    out_channels: int | None = attrs.field(default=16, validator=_optional_positive)
    text_dim: int = attrs.field(default=4096, validator=_positive)
    freq_dim: int = attrs.field(default=256, validator=_positive)
    ffn_dim: int = attrs.field(default=13824, validator=_positive)
    num_layers: int = attrs.field(default=40, validator=_non_negative)
    cross_attn_norm: bool = True
    qk_norm: str | None = attrs.field(default="rms_norm_across_heads", validator=_check_qk_norm)
    eps: float = 1e-6
    image_dim: int | None = attrs.field(default=None, validator=_optional_positive)
    added_kv_proj_dim: int | None = attrs.field(default=None, validator=_optional_positive)
    rope_max_seq_len: int = attrs.field(default=1024, validator=_positive)
    pos_embed_seq_len: int | None = attrs.field(default=None, validator=_optional_positive)

    @property
    def inner_dim(self) -> int:
        """Width of the transformer: heads × head dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """``out_channels``, defaulting to ``in_channels``."""
        return self.out_channels or self.in_channels

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head channels per RoPE axis (frame, height, width): height and width get
        ``2 * (head_dim // 6)`` each, frames the rest."""
        spatial = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * spatial, spatial, spatial
