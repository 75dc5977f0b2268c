"""Decisions on sharded data: statistics summed over every shard of a split call.

A feature that splits one call over several processes (context parallelism) installs a
reducer for the duration of the call with :func:`sharded`; a hook that decides from the
data it sees (First Block Cache's residual change) sums its statistics with
:func:`sum_over_shards`, so every process decides from the same totals. Outside such a
call the statistics pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import Tensor

__all__ = ["Reducer", "sharded", "sum_over_shards", "summing_over_shards"]

Reducer = Callable[[Tensor], Tensor]
"""Takes this shard's statistics tensor, returns the element-wise sum over all shards."""

_reducer: ContextVar[Reducer | None] = ContextVar("diffcaps_shard_reducer", default=None)


@contextmanager
def sharded(reducer: Reducer) -> Generator[None]:
    """Within the block, :func:`sum_over_shards` sums with ``reducer``."""
    token = _reducer.set(reducer)
    try:
        yield
    finally:
        _reducer.reset(token)


def summing_over_shards() -> bool:
    """Whether the current call is split over shards whose statistics must be summed."""
    return _reducer.get() is not None


def sum_over_shards(statistics: Tensor) -> Tensor:
    """``statistics`` summed element-wise over every shard of the current call (itself if unsplit)."""
    reducer = _reducer.get()
    return statistics if reducer is None else reducer(statistics)
