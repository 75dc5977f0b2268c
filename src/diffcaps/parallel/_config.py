"""``ContextParallelConfig``: how many ranks share one sequence, on which grid, how long to wait."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final, cast, final

import attrs

from diffcaps.errors import ParallelError
from diffcaps.parallel._topology import check_degrees

__all__ = ["DEFAULT_TIMEOUT", "ContextParallelConfig", "ShardAssignment"]

DEFAULT_TIMEOUT: Final = timedelta(minutes=5)


def _timeout(value: timedelta | float) -> timedelta:
    given = cast(object, value)
    seconds = given.total_seconds() if isinstance(given, timedelta) else given
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ParallelError(f"timeout must be a positive number of seconds or a timedelta, got {given!r}")
    return timedelta(seconds=float(seconds))


@final
@attrs.frozen(kw_only=True)
class ContextParallelConfig:
    """One sequence split over ``ulysses_degree × ring_degree`` ranks.

    Attention runs Ulysses (all-to-all over heads), ring (K/V passed around, partial results
    merged) or both on a (ring, ulysses) grid. ``mesh`` (a ``DeviceMesh``, 1-D or 2-D with
    dims named ``ring`` and ``ulysses``) replaces the default grid over all ranks. Every
    collective waits at most ``timeout`` (a ``timedelta`` or seconds).
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    mesh: Any = attrs.field(default=None, eq=False)
    timeout: timedelta = attrs.field(default=DEFAULT_TIMEOUT, converter=_timeout)

    def __attrs_post_init__(self) -> None:
        check_degrees(self.ulysses_degree, self.ring_degree)


@final
@attrs.frozen(kw_only=True)
class ShardAssignment:
    """Which shard of the sequence this rank holds while context parallelism is on."""

    rank: int
    """This process's global rank."""
    position: int
    """Which shard of each split input this rank holds (ring-major over the grid)."""
    ranks: int
    """How many ranks share the sequence."""
