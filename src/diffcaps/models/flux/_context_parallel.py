"""Flux's context-parallel plan: the streams and their position ids are split, ``proj_out`` is gathered.

Each rank embeds its own text and image tokens and computes RoPE from its own ids, so the
ids are split exactly like the tokens they belong to. ControlNet residuals are added to the
image stream, so they are split like it.
"""

from __future__ import annotations

from typing import Final

from diffcaps.services import ModuleTypes
from diffcaps.models.flux._attention import KERNEL, FluxAttention
from diffcaps.parallel.spec import ContextParallelPlan, GatherOutput, SplitInput

__all__ = ["FLUX_CONTEXT_PARALLEL"]

_IMAGE: Final = SplitInput(ndim=3, dim=1, stream="image")  # [batch, tokens, channels]
_IMAGE_IDS: Final = SplitInput(ndim=2, dim=0, stream="image")  # [tokens, 3]
_TEXT: Final = SplitInput(ndim=3, dim=1, stream="text")
_TEXT_IDS: Final = SplitInput(ndim=2, dim=0, stream="text")

FLUX_CONTEXT_PARALLEL: Final = ContextParallelPlan(
    inputs={
        "hidden_states": _IMAGE,
        "encoder_hidden_states": _TEXT,
        "img_ids": _IMAGE_IDS,
        "txt_ids": _TEXT_IDS,
        "controlnet_block_samples": _IMAGE,
        "controlnet_single_block_samples": _IMAGE,
    },
    outputs={"proj_out": GatherOutput(ndim=3, dim=1)},
    attention=ModuleTypes((FluxAttention,)),
    kernel=KERNEL,
)
