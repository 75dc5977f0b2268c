"""The cache-support service type: where a model's blocks are, for inference caches."""

from __future__ import annotations

from typing import final

import attrs

__all__ = ["CacheSupport"]


@final
@attrs.frozen(kw_only=True)
class CacheSupport:
    """Declares the block lists caches act on and the cache kinds the model supports."""

    block_lists: tuple[str, ...]
    kinds: tuple[str, ...]

    def entries(self) -> tuple[str, ...]:
        """The supported cache kinds."""
        return self.kinds
