"""The group-offloading service: which module lists form the groups that move between devices."""

from __future__ import annotations

from typing import final

import attrs

__all__ = ["GroupOffloading"]


def _names(value: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(value)


@final
@attrs.frozen(kw_only=True)
class GroupOffloading:
    """Declares the attribute names of the model's block lists (``transformer_blocks``, …)."""

    block_lists: tuple[str, ...] = attrs.field(converter=_names, validator=attrs.validators.min_len(1))

    def entries(self) -> tuple[str, ...]:
        """The block lists that are offloaded group by group."""
        return self.block_lists
