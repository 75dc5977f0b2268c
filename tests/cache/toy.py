"""A toy image denoiser (outputs [batch, channels, height, width]) declaring its own CacheSupport.

Its blocks return a bare tensor and its attention is diffusers' ``Attention`` class, so that
diffusers' FasterCache hooks the same modules as ours: it exercises the parts Flux does not
(single-tensor blocks, a spatial output, the unconditional-branch approximation).
"""

from __future__ import annotations

from typing import Any, ClassVar, final

import attrs
import torch
from torch import Tensor, nn

from diffcaps import Capabilities, Model, ModelConfig, ModuleTypes, capability
from diffcaps.cache.spec import BlockList, CacheSupport


def _attention_class() -> type[nn.Module]:
    from diffusers.models.attention_processor import Attention

    cls: type[nn.Module] = Attention
    return cls


def toy_support() -> CacheSupport:
    """Blocks in ``blocks``, diffusers' ``Attention`` as attention, a BCHW output."""
    return CacheSupport(blocks=(BlockList(path="blocks"),), attention=ModuleTypes((_attention_class(),)),
                        sample_format="BCHW")


@final
@attrs.frozen(kw_only=True)
class ToyCapabilities(Capabilities):
    """The toy declares only caches."""

    cache: CacheSupport = capability(toy_support())


@attrs.frozen(kw_only=True)
class ToyConfig(ModelConfig):
    """The toy's sizes."""

    class_name: ClassVar[str] = "ToyDenoiser"
    channels: int = 4
    dim: int = 16
    depth: int = 3


class ToyBlock(nn.Module):
    """A pre-norm self-attention block with a residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _attention_class()(query_dim=dim, heads=2, dim_head=dim // 2)

    def forward(self, hidden_states: Tensor) -> Tensor:
        out: Tensor = self.attn(self.norm(hidden_states))
        return hidden_states + out


@attrs.frozen
class ToyOutput:
    """The prediction, as a frozen attrs object (like ``FluxOutput``)."""

    sample: Tensor


@final
class ToyDenoiser(Model[ToyConfig, ToyCapabilities]):
    """Patchless image denoiser: pixels are tokens; the condition is added to every token."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        channels, dim, depth = config.channels, config.dim, config.depth
        self.proj_in = nn.Linear(channels, dim)
        self.cond = nn.Linear(8, dim)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, timestep: Tensor,
                return_dict: bool = True) -> Any:
        batch, channels, height, width = hidden_states.shape
        tokens: Tensor = self.proj_in(hidden_states.flatten(2).transpose(1, 2))
        tokens = tokens + self.cond(encoder_hidden_states)[:, None] + self.time(timestep[:, None])[:, None]
        for block in self.blocks:
            tokens = block(tokens)
        out: Tensor = self.proj_out(tokens)
        sample = out.transpose(1, 2).reshape(batch, channels, height, width)
        return ToyOutput(sample) if return_dict else (sample,)


def seeded_toy(seed: int = 0) -> ToyDenoiser:
    """A toy denoiser with reproducible weights."""
    torch.manual_seed(seed)
    return ToyDenoiser(ToyConfig()).eval()
