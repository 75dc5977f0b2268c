"""What a cache computed and skipped, per context and per block group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, final

import attrs

from diffcaps.hooks import StateContext

__all__ = ["CacheStats", "GroupStats", "MODEL_GROUP"]

MODEL_GROUP: Final = "model"
"""The group of hooked modules outside every declared block list (e.g. an output projection)."""


@final
@attrs.frozen
class GroupStats:
    """The decisions taken for one block group in one context, in call order (True = computed).

    Block-level caches (First Block Cache, MagCache) decide once per model call; module-level
    caches (Pyramid Attention Broadcast, FasterCache, TaylorSeer) once per hooked module call.
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


@final
class StatsRecorder:
    """Collects decisions as hooks take them, keyed by the active context."""

    __slots__ = ("_context", "_log")

    def __init__(self, context: StateContext) -> None:
        self._context = context
        self._log: dict[str, dict[str, list[bool]]] = {}

    def record(self, groups: tuple[str, ...], computed: bool) -> None:
        """Log one decision for each of ``groups`` in the current context."""
        context = self._context.current
        per_group = self._log.get(context)
        if per_group is None:
            per_group = self._log[context] = {}
        for group in groups:
            decisions = per_group.get(group)
            if decisions is None:
                decisions = per_group[group] = []
            decisions.append(computed)

    def clear(self) -> None:
        """Forget every decision."""
        self._log.clear()

    def snapshot(self, kind: str) -> CacheStats:
        """The decisions so far, frozen."""
        return CacheStats(kind, {
            context: {group: GroupStats(tuple(d)) for group, d in groups.items()}
            for context, groups in self._log.items()
        })
