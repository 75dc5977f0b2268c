"""Wan's declaration for the inference caches: its one block list, its attention, its output."""

from __future__ import annotations

from typing import Final

from diffcaps.cache.spec import BlockList, CacheSupport
from diffcaps.models.wan._attention import WanCrossAttention, WanSelfAttention
from diffcaps.services import ModuleTypes

__all__ = ["WAN_CACHE"]

WAN_CACHE: Final = CacheSupport(
    # Each block takes (hidden_states, encoder_hidden_states, temb, rotary_emb, ...) and returns
    # the hidden states alone; the text stream is not changed by the blocks.
    blocks=(BlockList(path="blocks"),),
    attention=ModuleTypes((WanSelfAttention, WanCrossAttention)),
    cross_attention=ModuleTypes((WanCrossAttention,)),
    output_projection="proj_out",
    sample_field="sample",
    sample_format="BCFHW",
)
"""Wan outputs a video latent, [batch, channels, frames, height, width]."""
