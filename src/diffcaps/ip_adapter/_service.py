"""The IP-Adapter protocol: shared by all models, implemented in each model's folder."""

from __future__ import annotations

from typing import Protocol

__all__ = ["IPAdapterSupport"]


class IPAdapterSupport(Protocol):
    """A model's IP-Adapter implementation, as its capabilities declare it."""

    def entries(self) -> tuple[str, ...]:
        """The IP-Adapter file layouts this model reads."""
        ...
