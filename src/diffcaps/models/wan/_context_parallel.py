"""Wan's context-parallel plan: the video tokens are split inside the model, after the patch embedding.

Wan's tokens exist only once ``patch_embedding`` has run, and its RoPE and unpatchify follow
the latent's shape, so nothing is split at the model's inputs. Each rank embeds the whole
latent and keeps its own tokens where the first block takes them; ``rope``'s ``(cos, sin)``
rows (one per token) are split the same way; a per-token timestep embedding (Wan 2.2 TI2V,
``temb`` of [batch, tokens, 6, dim]) is split at every block, a per-sample one passes whole.
The tokens are gathered at ``norm_out``, before the output modulation, ``proj_out`` and the
unpatchify, which then run on the whole sequence. Self-attention runs the distributed
algorithm over the split tokens; cross-attention is not replaced: each rank's queries attend
to the whole text (and image) context, whose keys and values every rank computes.
"""

from __future__ import annotations

from typing import Final

from diffcaps.models.wan._attention import KERNEL, WanSelfAttention
from diffcaps.parallel.spec import ContextParallelPlan, GatherOutput, SplitAt, SplitInput
from diffcaps.services import ModuleTypes

__all__ = ["WAN_CONTEXT_PARALLEL"]

_STREAM: Final = "video"
_TOKENS: Final = SplitInput(ndim=3, dim=1, stream=_STREAM)  # [batch, tokens, dim]
_ROTARY: Final = SplitInput(ndim=2, dim=0, stream=_STREAM)  # cos and sin, [tokens, head_dim]
_PER_TOKEN: Final = SplitInput(ndim=4, dim=1, stream=_STREAM, optional=True)  # [batch, tokens, 6, dim]

WAN_CONTEXT_PARALLEL: Final = ContextParallelPlan(
    inside={
        "rope": SplitAt(output=_ROTARY),
        "blocks.0": SplitAt(inputs={"hidden_states": _TOKENS}),
        "blocks.*": SplitAt(inputs={"temb": _PER_TOKEN}),
    },
    outputs={"norm_out": GatherOutput(ndim=3, dim=1)},
    attention=ModuleTypes((WanSelfAttention,)),
    kernel=KERNEL,
)
