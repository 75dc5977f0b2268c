"""The public namespace of ``diffcaps.layers``."""

from __future__ import annotations

import diffcaps.layers


def test_all_is_pinned() -> None:
    assert sorted(diffcaps.layers.__all__) == [
        "AdaLayerNormContinuous", "AdaLayerNormZero", "AdaLayerNormZeroSingle", "FP32LayerNorm", "FeedForward",
        "GELU", "RMSNorm", "RotaryEmbedding", "TextProjection", "TimestepEmbedding", "apply_rope", "attention",
        "grid_position_ids", "modulate", "rope_frequencies", "table_modulation", "timestep_embedding",
    ]
    assert all(hasattr(diffcaps.layers, name) for name in diffcaps.layers.__all__)
