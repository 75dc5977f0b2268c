"""Model-agnostic building blocks that model folders compose.

Layers that own parameters keep diffusers' parameter names, so a model built from them has
a diffusers-compatible state dict. Tensors are [batch, seq, heads, head_dim] for attention
and [batch, seq, dim] elsewhere.

- :func:`attention`: scaled dot-product attention, with an optional mask;
  :func:`module_attention` runs it for one module through the :class:`AttentionKernel` set on
  it (:func:`set_attention_kernel`, :func:`attention_kernel`), the attention backends' hook point.
- :class:`RotaryEmbedding`, :func:`rope_frequencies`, :func:`apply_rope`,
  :func:`grid_position_ids`: N-D RoPE from integer position ids, one axis per id column.
- :func:`timestep_embedding`, :class:`TimestepEmbedding`, :class:`TextProjection`:
  sinusoidal features and the MLPs that project conditioning to the model width.
- :class:`FeedForward`, :class:`GELU`: the transformer MLP and its GELU projection.
- :class:`RMSNorm`, :class:`AdaLayerNormZero`, :class:`AdaLayerNormZeroSingle`,
  :class:`AdaLayerNormContinuous`, :class:`FP32LayerNorm`, :func:`modulate`,
  :func:`modulation_table`, :func:`table_modulation`: norms and adaptive modulation (from a projection of the
  conditioning, or a learned ``scale_shift_table`` plus the conditioning).
"""

from diffcaps.layers._attention import (
    AttentionKernel as AttentionKernel,
    attention as attention,
    attention_kernel as attention_kernel,
    module_attention as module_attention,
    set_attention_kernel as set_attention_kernel,
)
from diffcaps.layers._embeddings import (
    TextProjection as TextProjection,
    TimestepEmbedding as TimestepEmbedding,
    timestep_embedding as timestep_embedding,
)
from diffcaps.layers._mlp import GELU as GELU, FeedForward as FeedForward
from diffcaps.layers._norms import (
    AdaLayerNormContinuous as AdaLayerNormContinuous,
    AdaLayerNormZero as AdaLayerNormZero,
    AdaLayerNormZeroSingle as AdaLayerNormZeroSingle,
    FP32LayerNorm as FP32LayerNorm,
    RMSNorm as RMSNorm,
    modulate as modulate,
    modulation_table as modulation_table,
    table_modulation as table_modulation,
)
from diffcaps.layers._rope import (
    RotaryEmbedding as RotaryEmbedding,
    apply_rope as apply_rope,
    grid_position_ids as grid_position_ids,
    rope_frequencies as rope_frequencies,
)

__all__ = [
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "AttentionKernel",
    "FP32LayerNorm",
    "FeedForward",
    "GELU",
    "RMSNorm",
    "RotaryEmbedding",
    "TextProjection",
    "TimestepEmbedding",
    "apply_rope",
    "attention",
    "attention_kernel",
    "grid_position_ids",
    "modulate",
    "modulation_table",
    "module_attention",
    "rope_frequencies",
    "set_attention_kernel",
    "table_modulation",
    "timestep_embedding",
]
