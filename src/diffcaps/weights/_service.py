"""The weight-mapping service type: how a model's original single-file layout maps to its own."""

from __future__ import annotations

from typing import Protocol, final

import attrs

__all__ = ["WeightMapper", "WeightVariant"]


class WeightVariant(Protocol):
    """One checkpoint variant a model can be loaded from (``flux-dev``, ``flux-fill``, …)."""

    @property
    def name(self) -> str:
        """The variant's name."""
        ...


@final
@attrs.frozen(kw_only=True)
class WeightMapper:
    """Declares the original-layout variants a model reads and writes."""

    variants: tuple[WeightVariant, ...]

    def entries(self) -> tuple[str, ...]:
        """The variant names, sorted."""
        return tuple(sorted(v.name for v in self.variants))
