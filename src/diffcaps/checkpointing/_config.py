"""``CheckpointingConfig``: how gradient checkpointing runs (one setting today)."""

from __future__ import annotations

from typing import final

import attrs

__all__ = ["CheckpointingConfig"]


@final
@attrs.frozen(kw_only=True)
class CheckpointingConfig:
    """Gradient checkpointing of the declared blocks: non-reentrant, only while grad is enabled."""
