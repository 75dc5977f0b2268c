"""``CacheSession``: the runtime state of the cache enabled on one model instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, final

from diffcaps.cache._config import CacheConfig
from diffcaps.cache._stats import StatsRecorder
from diffcaps.cache._targets import Placement
from diffcaps.errors import CacheError
from diffcaps.hooks import StateContext

__all__ = ["CONTEXT_HINT", "DEFAULT_CONTEXT", "CacheSession"]

DEFAULT_CONTEXT: Final = "default"
"""The context caches that do not require one use outside ``diffcaps.cache.context``."""

CONTEXT_HINT: Final = 'call the model inside `with diffcaps.cache.context(model, "cond"):`'


@final
class CacheSession:
    """The enabled config, its hooks, the shared context, the decision log and the current timestep.

    It lives on the model instance while the cache is enabled; ``disable`` removes the hooks
    it lists and then the session itself.
    """

    def __init__(self, config: CacheConfig, *, requires_context: bool) -> None:
        self.config = config
        self.context = StateContext(default=None if requires_context else DEFAULT_CONTEXT,
                                    hint=f"{type(config).__name__} keeps state per denoising pass; {CONTEXT_HINT}")
        self.stats = StatsRecorder(self.context)
        self.timestep: float | None = None
        self.placements: list[Placement] = []
        self.calibrations: dict[str, tuple[float, ...]] = {}

    def timestep_source(self, callback: Callable[[], float] | None) -> Callable[[], float]:
        """Where hooks read the current timestep: ``callback`` if given, else the open context."""
        if callback is not None:
            call = callback
            return lambda: float(call())

        def from_context() -> float:
            if self.timestep is None:
                raise CacheError(
                    f"{type(self.config).__name__} needs the current timestep: pass it as "
                    "`diffcaps.cache.context(model, name, timestep=t)` or set current_timestep_callback"
                )
            return self.timestep
        return from_context

    def recorder(self, groups: tuple[str, ...]) -> Callable[[bool], None]:
        """A callback that logs one decision for ``groups`` in the current context."""
        stats = self.stats

        def record(computed: bool) -> None:
            stats.record(groups, computed)
        return record

    def reset(self) -> None:
        """Drop every hook's state, the decision log and unfinished calibrations."""
        for _, _, hook in self.placements:
            hook.reset()
        self.stats.clear()
        self.calibrations.clear()
