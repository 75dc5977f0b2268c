"""``WanConfig``: Wan transformer hyper-parameters under diffusers' names and defaults."""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs

from diffcaps.config import ModelConfig, at_least
from diffcaps.errors import ConfigError

__all__ = ["WanConfig"]


@attrs.frozen(kw_only=True)
class WanConfig(ModelConfig):
    """Hyper-parameters of ``WanTransformer3DModel`` (defaults are diffusers', i.e. Wan 2.1 14B's).

    Sizes are positive integers (``num_layers`` may be 0); ``attention_head_dim`` is even (RoPE
    rotates channel pairs). ``qk_norm`` is ``"rms_norm_across_heads"`` or null: diffusers
    0.42.1 builds the same across-heads RMSNorm for both (it does not read the value), and
    so does diffcaps.

    Wan 2.1 T2V 1.3B: ``num_attention_heads=12``, ``ffn_dim=8960``, ``num_layers=30``; I2V
    adds ``image_dim=1280`` and ``added_kv_proj_dim=5120``; Wan 2.2 TI2V-5B:
    ``num_attention_heads=24``, ``in_channels=out_channels=48``, ``ffn_dim=14336``,
    ``num_layers=30``. The A14B experts use the defaults with ``in_channels=36`` (I2V) or 16.
    """

    class_name: ClassVar[str] = "WanTransformer3DModel"

    patch_size: tuple[int, int, int] = at_least(1, default=(1, 2, 2))
    num_attention_heads: int = at_least(1, default=40)
    attention_head_dim: int = at_least(2, default=128)
    in_channels: int = at_least(1, default=16)
    out_channels: int | None = at_least(1, default=16)
    text_dim: int = at_least(1, default=4096)
    freq_dim: int = at_least(1, default=256)
    ffn_dim: int = at_least(1, default=13824)
    num_layers: int = at_least(0, default=40)
    cross_attn_norm: bool = True
    qk_norm: Literal["rms_norm_across_heads"] | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = at_least(1, default=None)
    added_kv_proj_dim: int | None = at_least(1, default=None)
    rope_max_seq_len: int = at_least(1, default=1024)
    pos_embed_seq_len: int | None = at_least(1, default=None)

    def __attrs_post_init__(self) -> None:
        if self.attention_head_dim % 2:
            raise ConfigError(f"field 'attention_head_dim' = {self.attention_head_dim}: expected an even "
                              f"number (RoPE rotates channel pairs)")
        if len(self.patch_size) != 3:
            raise ConfigError(f"field 'patch_size' = {list(self.patch_size)}: expected three sizes "
                              f"(frames, height, width)")

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
