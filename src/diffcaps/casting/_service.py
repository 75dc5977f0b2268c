"""The layerwise-casting service: which modules keep full precision when weights are stored low."""

from __future__ import annotations

from typing import final

import attrs

__all__ = ["LayerwiseCasting"]


def _patterns(value: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(value)


@final
@attrs.frozen(kw_only=True)
class LayerwiseCasting:
    """Declares the module-name patterns (regular expressions) that are never downcast."""

    skip_patterns: tuple[str, ...] = attrs.field(converter=_patterns)

    def entries(self) -> tuple[str, ...]:
        """The skip patterns."""
        return self.skip_patterns
