"""Flux's declaration for the inference caches: its two block lists, its attention, its output."""

from __future__ import annotations

from typing import Final

from diffcaps.services import ModuleTypes
from diffcaps.cache.spec import BlockList, CacheSupport
from diffcaps.models.flux._attention import FluxAttention

__all__ = ["FLUX_CACHE", "FLUX_MAG_RATIOS"]



def _flux_blocks(path: str) -> BlockList:
    # Both block kinds take (hidden_states, encoder_hidden_states, temb, ...) and return
    # (encoder_hidden_states, hidden_states): text first.
    return BlockList(path=path, hidden_states="hidden_states", encoder_hidden_states="encoder_hidden_states",
                     outputs=("encoder_hidden_states", "hidden_states"))


FLUX_CACHE: Final = CacheSupport(
    blocks=(_flux_blocks("transformer_blocks"), _flux_blocks("single_transformer_blocks")),
    attention=ModuleTypes((FluxAttention,)),
    output_projection="proj_out",
    sample_field="sample",
    sample_format="BSC",
)
"""Flux outputs packed latent tokens, [batch, tokens, channels]."""

FLUX_MAG_RATIOS: Final = (
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344, 0.98047,
    1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828, 0.96484,
    0.95703, 0.93359, 0.89062,
)
"""MagCache ratios measured for FLUX.1 at 28 steps (from the MagCache authors,
github.com/Zehong-Ma/MagCache); resample with ``diffcaps.cache.interpolate_mag_ratios``."""
