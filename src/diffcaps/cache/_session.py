"""``CacheSession``: the runtime state of the cache enabled on one model instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NoReturn, TypeVar, final

from diffcaps.cache._config import CacheConfig
from diffcaps.cache._stats import CacheStats, Decisions, snapshot
from diffcaps.cache._targets import HookPlacement
from diffcaps.errors import CacheError
from diffcaps.hooks import ContextualState, StateContext

__all__ = ["CONTEXT_HINT", "DEFAULT_CONTEXT", "CacheSession", "Clock"]

D = TypeVar("D", bound=Decisions)

DEFAULT_CONTEXT: Final = "default"
"""The context caches that do not require one use outside ``diffcaps.cache.context``."""

CONTEXT_HINT: Final = 'call the model inside `with diffcaps.cache.context(model, "cond"):`'


@final
class Clock:
    """The current timestep that attention caches compare with their timestep ranges.

    ``now`` is set by ``diffcaps.cache.context(model, name, timestep=...)``; a config's
    ``current_timestep_callback`` becomes ``callback`` and is asked instead.
    """

    __slots__ = ("callback", "now", "owner")

    def __init__(self, owner: str, callback: Callable[[], float] | None = None) -> None:
        self.owner = owner
        self.callback = callback
        self.now: float | None = None

    def read(self) -> float:
        """The current timestep (hooks inline this on their hot path)."""
        value = self.now if self.callback is None else float(self.callback())
        if value is None:
            self.missing()
        return value

    def missing(self) -> NoReturn:
        """Raise the error for a call made without a timestep."""
        raise CacheError(f"{self.owner} needs the current timestep: pass it as "
                         "`diffcaps.cache.context(model, name, timestep=t)` or set current_timestep_callback")


@final
class CacheSession:
    """The enabled config, its hooks, the shared context, the states whose decisions count, the clock.

    It lives on the model instance while the cache is enabled; ``disable`` removes the hooks
    it lists and then the session itself.
    """

    def __init__(self, config: CacheConfig, *, requires_context: bool) -> None:
        self.config = config
        self.context = StateContext(default=None if requires_context else DEFAULT_CONTEXT,
                                    hint=f"{type(config).__name__} keeps state per denoising pass; {CONTEXT_HINT}")
        self.tracked: list[tuple[tuple[str, ...], ContextualState[Decisions]]] = []
        self.clock = Clock(type(config).__name__, getattr(config, "current_timestep_callback", None))
        self.placements: list[HookPlacement] = []
        self.calibrations: dict[str, tuple[float, ...]] = {}

    def track(self, groups: tuple[str, ...], state: ContextualState[D]) -> ContextualState[D]:
        """Count the decisions ``state`` logs under ``groups`` in the stats; returns ``state``."""
        self.tracked.append((groups, state))
        return state

    def stats(self) -> CacheStats:
        """The decisions logged so far, per context and group."""
        return snapshot(self.config.kind, self.tracked)

    def reset(self) -> None:
        """Drop every hook's state (with its decision log).

        Finished calibrations are kept: they are a run's result, and a pipeline resets the
        cache at the end of every call, before its caller can read them.
        """
        for _, _, hook in self.placements:
            hook.reset()
