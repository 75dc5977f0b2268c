"""What a cache computed and skipped, per context and per block group."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Protocol, final

import attrs

from diffcaps.hooks import ContextualState

__all__ = ["CacheStats", "Decisions", "GroupStats", "MODEL_GROUP", "snapshot"]

MODEL_GROUP: Final = "model"
"""The group of hooked modules outside every declared block list (e.g. an output projection)."""


@final
@attrs.frozen
class GroupStats:
    """The decisions taken for one block group in one context (True = computed).

    Block-level caches (First Block Cache, MagCache) decide once per model call, listed in call
    order; module-level caches (Pyramid Attention Broadcast, FasterCache, TaylorSeer) once per
    hooked module call, listed module by module, each module's calls in order.
    """

    decisions: tuple[bool, ...]

    @property
    def computed(self) -> int:
        """How many decisions ran the work."""
        return sum(self.decisions)

    @property
    def skipped(self) -> int:
        """How many decisions reused or predicted instead."""
        return len(self.decisions) - self.computed


@final
@attrs.frozen
class CacheStats:
    """A snapshot of a cache's decisions: ``contexts[context][group]``."""

    kind: str
    contexts: Mapping[str, Mapping[str, GroupStats]]

    def _groups(self, context: str | None, group: str | None) -> list[GroupStats]:
        return [stats for c, groups in self.contexts.items() if context in (None, c)
                for g, stats in groups.items() if group in (None, g)]

    def computed(self, context: str | None = None, group: str | None = None) -> int:
        """Decisions that computed, over one context/group or all of them."""
        return sum(s.computed for s in self._groups(context, group))

    def skipped(self, context: str | None = None, group: str | None = None) -> int:
        """Decisions that skipped, over one context/group or all of them."""
        return sum(s.skipped for s in self._groups(context, group))

    def describe(self) -> str:
        """A small table: context, group, computed, skipped."""
        lines = [f"{self.kind}: computed / skipped"]
        for context, groups in self.contexts.items():
            for group, stats in groups.items():
                lines.append(f"  {context:<10} {group:<28} {stats.computed:>5} / {stats.skipped}")
        if len(lines) == 1:
            lines.append("  (no calls yet)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


class Decisions(Protocol):
    """A hook state that logs its decisions (True = computed)."""

    decisions: list[bool]


def snapshot(kind: str, tracked: Iterable[tuple[tuple[str, ...], ContextualState[Decisions]]]) -> CacheStats:
    """Gather the decisions the tracked states logged, per context and group."""
    log: dict[str, dict[str, list[bool]]] = {}
    for groups, state in tracked:
        for context, value in state.items():
            per_group = log.setdefault(context, {})
            for group in groups:
                per_group.setdefault(group, []).extend(value.decisions)
    return CacheStats(kind, {context: {group: GroupStats(tuple(d)) for group, d in groups.items()}
                             for context, groups in log.items()})
