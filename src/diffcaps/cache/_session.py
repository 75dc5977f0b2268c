"""``CacheSession``: the runtime state of the cache enabled on one model instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar, final

from diffcaps.cache._config import CacheConfig
from diffcaps.cache._stats import CacheStats, Decisions, snapshot
from diffcaps.cache._targets import Placement
from diffcaps.errors import CacheError
from diffcaps.hooks import ContextualState, StateContext

__all__ = ["CONTEXT_HINT", "DEFAULT_CONTEXT", "CacheSession"]

D = TypeVar("D", bound=Decisions)

DEFAULT_CONTEXT: Final = "default"
"""The context caches that do not require one use outside ``diffcaps.cache.context``."""

CONTEXT_HINT: Final = 'call the model inside `with diffcaps.cache.context(model, "cond"):`'


@final
class CacheSession:
    """The enabled config, its hooks, the shared context, the states whose decisions count, the timestep.

    It lives on the model instance while the cache is enabled; ``disable`` removes the hooks
    it lists and then the session itself.
    """

    def __init__(self, config: CacheConfig, *, requires_context: bool) -> None:
        self.config = config
        self.context = StateContext(default=None if requires_context else DEFAULT_CONTEXT,
                                    hint=f"{type(config).__name__} keeps state per denoising pass; {CONTEXT_HINT}")
        self.tracked: list[tuple[tuple[str, ...], ContextualState[Decisions]]] = []
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

    def track(self, groups: tuple[str, ...], state: ContextualState[D]) -> ContextualState[D]:
        """Count the decisions ``state`` logs under ``groups`` in the stats; returns ``state``."""
        self.tracked.append((groups, state))
        return state

    def stats(self) -> CacheStats:
        """The decisions logged so far, per context and group."""
        return snapshot(self.config.kind, self.tracked)

    def reset(self) -> None:
        """Drop every hook's state (with its decision log) and the finished calibrations."""
        for _, _, hook in self.placements:
            hook.reset()
        self.calibrations.clear()
