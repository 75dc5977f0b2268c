"""A small model outside ``diffcaps.models`` that gets LoRA from one capabilities line (``DIFFUSERS_PEFT``)."""

from __future__ import annotations

from typing import ClassVar, final

import attrs
import torch
from torch import Tensor, nn

from diffcaps import Capabilities, Model, ModelConfig, capability
from diffcaps.lora.spec import DIFFUSERS_PEFT, DiffusersLayout, LoRAService


@attrs.frozen(kw_only=True)
class MixerConfig(ModelConfig):
    """Hyper-parameters of the mixer."""

    class_name: ClassVar[str] = "Mixer"
    width: int = 12
    depth: int = 2


class MixerBlock(nn.Module):
    """A residual block: RMS norm, then a two-layer MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        hidden: Tensor = self.up(self.norm(x))
        out: Tensor = self.down(torch.nn.functional.gelu(hidden))
        return x + out


@final
@attrs.frozen(kw_only=True)
class MixerCapabilities(Capabilities):
    """LoRA in the diffusers/PEFT format, read and written; nothing else."""

    lora: LoRAService = capability(LoRAService(formats=(DIFFUSERS_PEFT,), layouts=(DiffusersLayout(),)))


@final
class Mixer(Model[MixerConfig, MixerCapabilities]):
    """An input projection and a stack of blocks."""

    def __init__(self, config: MixerConfig) -> None:
        super().__init__(config)
        self.proj_in = nn.Linear(config.width, config.width)
        self.blocks = nn.ModuleList(MixerBlock(config.width) for _ in range(config.depth))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return x


def seeded_mixer(seed: int = 0) -> Mixer:
    """A mixer with reproducible weights."""
    torch.manual_seed(seed)
    return Mixer(MixerConfig()).eval()
