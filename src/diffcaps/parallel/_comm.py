"""Collectives with a deadline, and failure reports that name the rank that failed.

Every collective is started asynchronously. On gloo (CPU) this rank polls it: it returns as
soon as the collective completes, raises :class:`~diffcaps.errors.RankFailure` as soon as
another rank has reported a failure in the process group's key-value store, and gives up at
the deadline. On other backends (NCCL) the wait stays asynchronous on the device and the
group's own timeout applies (the groups diffcaps makes carry the ``timeout`` given to
``enable_context_parallel``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Final, final

import torch
import torch.distributed as dist
from torch import Tensor

from diffcaps.errors import RankFailure
from diffcaps.parallel._topology import Axis

__all__ = ["Communicator"]

_PREFIX: Final = "diffcaps.parallel"
_STORE_EVERY: Final = 0.05  # seconds between looks at the store while a collective is pending
_MAX_SLEEP: Final = 0.002


def _default_store() -> Any:
    # torch keeps the process group's key-value store behind a private accessor
    try:
        from torch.distributed import distributed_c10d

        return getattr(distributed_c10d, "_get_default_store")()
    except Exception:  # no store to share reports through: errors still name this rank
        return None


@final
class Communicator:
    """Runs this rank's collectives for one context-parallel session."""

    def __init__(self, *, rank: int, session: int, timeout: timedelta, world_ranks: Sequence[int]) -> None:
        self.rank = rank
        self.timeout = timeout.total_seconds()
        self.world_ranks = tuple(world_ranks)
        self._key = f"{_PREFIX}/{session}/failed"
        self._store = _default_store()
        self._polled: dict[int, bool] = {}

    # --- failure reports ------------------------------------------------------------------
    def report(self, error: BaseException) -> None:
        """Tell the other ranks that this rank failed, and why."""
        if self._store is None:
            return
        text = f"{type(error).__name__}: {error}"
        try:
            self._store.set(f"{self._key}/{self.rank}", text[:2000])
            self._store.add(f"{self._key}/count", 1)
        except Exception:  # the store itself is gone: nothing more to tell
            pass

    def _any_failure(self) -> bool:
        if self._store is None:
            return False
        try:
            return int(self._store.add(f"{self._key}/count", 0)) > 0
        except Exception:
            return False

    def failures(self) -> dict[int, str]:
        """The ranks that reported a failure in this session, with their errors."""
        if self._store is None:
            return {}
        found: dict[int, str] = {}
        try:
            for rank in self.world_ranks:
                key = f"{self._key}/{rank}"
                if rank != self.rank and self._store.check([key]):
                    found[rank] = bytes(self._store.get(key)).decode("utf-8", "replace")
        except Exception:
            return found
        return found

    def _error(self, what: str, cause: str) -> RankFailure:
        failed = self.failures()
        if failed:
            who = "; ".join(f"rank {rank} failed: {text}" for rank, text in sorted(failed.items()))
            message = f"rank {self.rank}: {what} did not complete because {who}"
        else:
            message = (f"rank {self.rank}: {what} did not complete ({cause}); no other rank reported an error, "
                       "so a rank is stalled, exited, or running a different sequence of calls")
        return RankFailure(message, rank=self.rank, failed=failed)

    # --- waiting --------------------------------------------------------------------------
    def wait(self, works: Sequence[Any], what: str, group: Any) -> None:
        """Wait for ``works``; raise ``RankFailure`` on a peer's failure, an error or the deadline."""
        polled = self._polled.get(id(group))
        if polled is None:
            polled = self._polled[id(group)] = dist.get_backend(group) == "gloo"
        if not polled:
            for work in works:
                work.wait()
            return
        deadline = time.monotonic() + self.timeout
        next_look = time.monotonic() + _STORE_EVERY
        pause = 0.0
        pending = list(works)
        while pending:
            pending = [work for work in pending if not work.is_completed()]
            if not pending:
                break
            now = time.monotonic()
            if now >= next_look:
                next_look = now + _STORE_EVERY
                if self._any_failure():
                    raise self._error(what, "a rank failed")
            if now >= deadline:
                raise self._error(what, f"timed out after {self.timeout:g} s")
            pause = min(_MAX_SLEEP, max(2e-5, pause * 2))
            time.sleep(pause)
        for work in works:
            try:
                work.wait()
            except RuntimeError as error:
                raise self._error(what, f"{type(error).__name__}: {error}") from error

    # --- collectives ----------------------------------------------------------------------
    def all_to_all(self, output: Tensor, source: Tensor, output_splits: list[int], input_splits: list[int],
                   axis: Axis, what: str) -> None:
        """Uneven all-to-all of flat tensors over ``axis``."""
        work = dist.all_to_all_single(output, source, output_splits, input_splits, group=axis.group, async_op=True)
        self.wait([work], what, axis.group)

    def shift(self, send: Tensor, receive: Tensor, axis: Axis) -> Any:
        """Start sending ``send`` to the next member of ``axis`` while receiving ``receive`` from the previous one.

        Returns the pending work for :meth:`wait`. It is an all-to-all in which only those two
        pieces are non-empty: unlike gloo's point-to-point work, a collective can be polled.
        """
        after, before = (axis.index + 1) % axis.size, (axis.index - 1) % axis.size
        send_sizes, receive_sizes = [0] * axis.size, [0] * axis.size
        send_sizes[after] = send.numel()
        receive_sizes[before] = receive.numel()
        return dist.all_to_all_single(receive.view(-1), send.reshape(-1), receive_sizes, send_sizes,
                                      group=axis.group, async_op=True)

    def all_reduce_sum(self, tensor: Tensor, axes: Sequence[Axis], what: str) -> Tensor:
        """``tensor`` summed element-wise over every member of ``axes`` (a new tensor)."""
        total = tensor.clone()
        for axis in axes:
            if axis.size > 1:
                work = dist.all_reduce(total, op=dist.ReduceOp.SUM, group=axis.group, async_op=True)
                self.wait([work], what, axis.group)
        return total

    def all_gather(self, tensor: Tensor, axis: Axis, what: str) -> list[Tensor]:
        """Every member's ``tensor`` (all of the same shape), in member order."""
        out = [torch.empty_like(tensor) for _ in range(axis.size)]
        work = dist.all_gather(out, tensor.contiguous(), group=axis.group, async_op=True)
        self.wait([work], what, axis.group)
        return out
