"""A user-defined model outside ``diffcaps.models`` that declares its own capabilities.

It is the README's "compose your own model" example, kept here so that it is run
(``tests/test_custom_model.py``) and type-checked (``mypy`` covers ``tests/``).
"""

from __future__ import annotations

from typing import ClassVar, final

import attrs
import torch
from torch import Tensor, nn

from diffcaps import Capabilities, Model, ModelConfig, ModuleTypes, capability
from diffcaps.casting.spec import LayerwiseCasting


@attrs.frozen(kw_only=True)
class TinyDiTConfig(ModelConfig):
    """Hyper-parameters of the example model."""

    class_name: ClassVar[str] = "TinyDiT"
    width: int = 32
    depth: int = 2


class TinyBlock(nn.Module):
    """A residual MLP block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.mlp(self.norm(x))
        return x + out


TINY_BLOCKS = ModuleTypes((TinyBlock,))


@final
@attrs.frozen(kw_only=True)
class TinyDiTCapabilities(Capabilities):
    """The example declares three features and nothing else."""

    no_split_modules: ModuleTypes = capability(TINY_BLOCKS)
    layerwise_casting: LayerwiseCasting = capability(LayerwiseCasting(skip_patterns=("norm",)))
    repeated_blocks: ModuleTypes = capability(TINY_BLOCKS)


@final
class TinyDiT(Model[TinyDiTConfig, TinyDiTCapabilities]):
    """A stack of residual blocks: enough to show how a model declares capabilities."""

    def __init__(self, config: TinyDiTConfig) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(TinyBlock(config.width) for _ in range(config.depth))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def seeded_tiny_dit(seed: int = 0) -> TinyDiT:
    """An example model with reproducible weights."""
    torch.manual_seed(seed)
    return TinyDiT(TinyDiTConfig())
