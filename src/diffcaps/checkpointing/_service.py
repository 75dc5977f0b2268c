"""The gradient-checkpointing service: which block classes run under activation checkpointing."""

from __future__ import annotations

from typing import final

import attrs

from diffcaps.services import ModuleTypes

__all__ = ["GradientCheckpointing"]


@final
@attrs.frozen(kw_only=True)
class GradientCheckpointing:
    """Declares the blocks whose activations are recomputed in backward instead of stored."""

    blocks: ModuleTypes

    def entries(self) -> tuple[str, ...]:
        """The checkpointed block classes."""
        return self.blocks.entries()
