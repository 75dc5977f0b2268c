"""``Session``: the runtime state context parallelism keeps on one model instance while enabled."""

from __future__ import annotations

from collections.abc import Callable
from typing import final

import torch
from torch import Tensor, nn

from diffcaps.errors import ParallelError
from diffcaps.parallel._comm import Communicator
from diffcaps.parallel._config import ContextParallelConfig
from diffcaps.parallel._layout import Layout
from diffcaps.parallel._service import ContextParallelPlan
from diffcaps.parallel._topology import Axis, Topology

__all__ = ["Session"]


@final
class Session:
    """The plan, the rank grid, the communicator, the current call's layout, what was installed.

    ``layout`` is set by the model's split hook for the duration of one forward call and grows
    with each token stream split during it (at the model's inputs or inside it); attention
    kernels and gather hooks read it. ``broken`` holds the reason once a forward failed part-way:
    collectives may then be out of step, so later calls refuse to run.
    """

    def __init__(self, plan: ContextParallelPlan, topology: Topology, comm: Communicator,
                 config: ContextParallelConfig) -> None:
        self.plan = plan
        self.topology = topology
        self.comm = comm
        self.config = config
        self.layout: Layout | None = None
        self.streams: dict[str, tuple[str, int]] = {}
        self.broken: str | None = None
        self.hooks: list[tuple[nn.Module, str]] = []
        self.kernels: list[nn.Module] = []
        self.placed: list[tuple[str, nn.Module]] = []
        """Submodules hooked by path (split inside or gathered): they must still be there at each call."""

    def start_call(self) -> None:
        """Begin one forward call: no stream is split yet."""
        self.streams = {}
        self.layout = Layout(self.topology.position, self.topology.world, ())

    def end_call(self) -> None:
        """End the forward call."""
        self.streams = {}
        self.layout = None

    def add_stream(self, stream: str, name: str, total: int) -> None:
        """Record that ``name`` is split from ``total`` tokens of ``stream`` in this call.

        Raises if another split of the same stream had a different length.
        """
        first = self.streams.get(stream)
        if first is not None:
            if first[1] != total:
                raise ParallelError(f"{first[0]!r} and {name!r} hold the same tokens (stream {stream!r}) but "
                                    f"have {first[1]} and {total} of them")
            return
        self.streams[stream] = (name, total)
        self.layout = Layout(self.topology.position, self.topology.world,
                             (length for _, length in self.streams.values()))

    def lengths(self, local: int, what: str, device: torch.device) -> tuple[int, ...]:
        """Every rank's length (in position order) of the sequence this rank holds ``local`` tokens of."""
        layout = self.layout
        if layout is None:
            raise ParallelError(f"{what} ran outside the model's forward; with context parallelism enabled, "
                                "call the whole model (its split hook sets up each call)")
        try:
            found = layout.lengths(local)
        except LookupError:
            raise ParallelError(
                f"{what} got a sequence of {local} tokens on rank {self.topology.rank}, which is not made of the "
                f"split streams' shards ({', '.join(self.streams) or 'none split yet'}); the plan does not cover "
                "this sequence"
            ) from None
        if found is None:
            found = self.exchange(local, what, device)
        return found

    def exchange(self, local: int, what: str, device: torch.device) -> tuple[int, ...]:
        """Every rank's ``local`` value, in position order (two small all-gathers)."""
        mine = torch.tensor([local], dtype=torch.int64, device=device)
        return tuple(int(v) for v in self.gather(mine, 0, lambda _: 1, f"length exchange in {what}").tolist())

    def gather(self, tensor: Tensor, axis: int, length_of: Callable[[int], int], what: str) -> Tensor:
        """All ranks' ``tensor`` concatenated along ``axis`` in position order.

        ``length_of(position)`` is each rank's length along ``axis``; shorter pieces are padded
        for the all-gathers and trimmed after.
        """
        topology = self.topology
        ulysses, ring = topology.ulysses, topology.ring
        pieces = [length_of(ring.index * ulysses.size + u) for u in range(ulysses.size)]
        block = _gather_axis(self.comm, tensor, axis, pieces, ulysses, what)
        blocks = [sum(length_of(r * ulysses.size + u) for u in range(ulysses.size)) for r in range(ring.size)]
        return _gather_axis(self.comm, block, axis, blocks, ring, what)

    def check_usable(self) -> None:
        """Raise if a failed call left the collectives out of step."""
        if self.broken is not None:
            raise ParallelError(
                f"context parallelism on rank {self.topology.rank} stopped after a failed call ({self.broken}); "
                "call diffcaps.parallel.disable(model) and enable it again on every rank"
            )


def _gather_axis(comm: Communicator, tensor: Tensor, axis: int, lengths: list[int], along: Axis, what: str) -> Tensor:
    if along.size == 1:
        return tensor
    longest = max(lengths)
    padded = tensor
    if tensor.shape[axis] < longest:
        shape = list(tensor.shape)
        shape[axis] = longest - tensor.shape[axis]
        padded = torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)
    pieces = comm.all_gather(padded, along, f"{what} ({along.name} all-gather)")
    return torch.cat([piece.narrow(axis, 0, length) for piece, length in zip(pieces, lengths, strict=True)], dim=axis)
