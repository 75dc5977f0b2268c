"""The two hooks that apply a plan: split the model's inputs, gather the declared outputs."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Final, final

import torch
from torch import Tensor, nn

from diffcaps.errors import ParallelError, RankFailure
from diffcaps.hooks import Forward, Hook, sharded
from diffcaps.parallel._layout import Layout, shard_sizes
from diffcaps.parallel._service import GatherOutput, SplitInput
from diffcaps.parallel._session import Session

__all__ = ["GATHER_HOOK", "SPLIT_HOOK", "GatherHook", "SplitHook"]

SPLIT_HOOK: Final = "diffcaps.parallel.split"
GATHER_HOOK: Final = "diffcaps.parallel.gather"


def _grad_needed(module: nn.Module, values: Mapping[str, Any]) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(isinstance(v, Tensor) and v.requires_grad for v in values.values()):
        return True
    return any(p.requires_grad for p in module.parameters())


@final
class SplitHook(Hook):
    """On the model: give each rank its shard of every split input, and run the call as one unit.

    A failure on this rank is reported to the others (so their collectives stop waiting and
    name this rank) and marks the session unusable.
    """

    def __init__(self, session: Session, module: nn.Module) -> None:
        self.session = session
        self.signature = inspect.signature(type(module).forward)

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        session.check_usable()
        for name, gathered in session.gathered:
            if module.get_submodule(name) is not gathered:
                raise ParallelError(
                    f"{name!r} was replaced after context parallelism was enabled (a LoRA loaded or fused since?); "
                    "call diffcaps.parallel.disable(model) and enable it again on every rank"
                )
        try:
            bound = self.signature.bind(module, *args, **kwargs)
        except TypeError as error:
            raise ParallelError(f"{type(module).__name__}: {error}") from None
        values = bound.arguments
        if _grad_needed(module, values):
            raise ParallelError("context parallelism runs inference only (its collectives carry no gradients); "
                                "call the model under torch.no_grad() or torch.inference_mode()")
        streams: dict[str, tuple[str, int]] = {}
        for name, split in session.plan.inputs.items():
            if name in values and values[name] is not None:
                values[name] = self._split(name, split, values[name], streams)
        session.layout = Layout(session.topology.position, session.topology.world,
                                (length for _, length in streams.values()))
        topology = session.topology

        def summed(statistics: Tensor) -> Tensor:
            return session.comm.all_reduce_sum(statistics, (topology.ring, topology.ulysses), "a cache decision")

        try:
            with sharded(summed):  # data-dependent decisions (First Block Cache) see every shard's totals
                return forward(*bound.args[1:], **bound.kwargs)
        except RankFailure:
            session.broken = "a peer rank failed"
            raise
        except BaseException as error:
            session.broken = f"{type(error).__name__} on this rank"
            session.comm.report(error)
            error.add_note(f"(raised on context-parallel rank {session.topology.rank}; the other ranks were told)")
            raise
        finally:
            session.layout = None

    def _split(self, name: str, split: SplitInput, value: Any, streams: dict[str, tuple[str, int]]) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._split(f"{name}[{i}]", split, item, streams) for i, item in enumerate(value))
        if not isinstance(value, Tensor):
            raise ParallelError(f"the context-parallel plan splits input {name!r}, but it is a "
                                f"{type(value).__name__}, not a tensor")
        try:
            axis = split.axis(name, value)
        except ValueError as error:
            raise ParallelError(str(error)) from None
        topology = self.session.topology
        total = value.shape[axis]
        stream = split.stream or name.partition("[")[0]
        first = streams.setdefault(stream, (name, total))
        if first[1] != total:
            raise ParallelError(f"inputs {first[0]!r} and {name!r} hold the same tokens (stream {stream!r}) but have "
                                f"{first[1]} and {total} of them")
        if total < topology.world:
            raise ParallelError(f"input {name!r} has {total} token(s) along dim {axis}, fewer than the "
                                f"{topology.world} ranks sharing it: every rank needs at least one")
        sizes = shard_sizes(total, topology.world)
        start = sum(sizes[: topology.position])
        return value.narrow(axis, start, sizes[topology.position])


@final
class GatherHook(Hook):
    """On a declared submodule: all ranks get its whole output, pieces in position order."""

    def __init__(self, session: Session, name: str, gather: GatherOutput) -> None:
        self.session = session
        self.name = name
        self.gather = gather

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if not isinstance(output, Tensor):
            raise ParallelError(f"the context-parallel plan gathers the output of {self.name!r}, but it returned a "
                                f"{type(output).__name__}, not a tensor")
        try:
            axis = self.gather.axis(self.name, output)
        except ValueError as error:
            raise ParallelError(str(error)) from None
        what = f"gather of {self.name}"
        lengths = self.session.lengths(output.shape[axis], what, output.device)
        return self.session.gather(output, axis, lambda position: lengths[position], what)
