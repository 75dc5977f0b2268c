"""The hooks that apply a plan: split the model's inputs (and run each call as one unit), split
inside the model at a submodule's inputs or output, gather the declared outputs.

All of them have order :data:`~diffcaps.hooks.SHARDING`: on a module that other features hook
too, they run outside those hooks, so a cache sees this rank's shard both going in and coming
out, whichever feature was enabled first.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Final, final

import torch
from torch import Tensor, nn

from diffcaps.errors import ParallelError, RankFailure
from diffcaps.hooks import SHARDING, Forward, Hook, sharded
from diffcaps.parallel._layout import shard_sizes
from diffcaps.parallel._service import GatherOutput, SplitAt, SplitInput
from diffcaps.parallel._session import Session

__all__ = ["GATHER_HOOK", "SPLIT_HOOK", "GatherHook", "InsideSplitHook", "SplitHook"]

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

    order = SHARDING

    def __init__(self, session: Session, module: nn.Module) -> None:
        self.session = session
        self.signature = inspect.signature(type(module).forward)

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        session.check_usable()
        for name, placed in session.placed:
            if module.get_submodule(name) is not placed:
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
        session.start_call()
        try:
            for name, split in session.plan.inputs.items():
                if name in values and values[name] is not None:
                    values[name] = split_value(session, name, split, values[name])
        except BaseException:
            session.end_call()
            raise
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
            session.end_call()


def split_value(session: Session, name: str, split: SplitInput, value: Any) -> Any:
    """This rank's shard of ``value`` (a tensor, or a list or tuple of them), the input called ``name``."""
    if isinstance(value, (list, tuple)):
        return type(value)(split_value(session, f"{name}[{i}]", split, item) for i, item in enumerate(value))
    if not isinstance(value, Tensor):
        raise ParallelError(f"the context-parallel plan splits {name!r}, but it is a "
                            f"{type(value).__name__}, not a tensor")
    try:
        axis = split.axis(name, value)
    except ValueError as error:
        raise ParallelError(str(error)) from None
    if axis is None:
        return value
    topology = session.topology
    total = value.shape[axis]
    session.add_stream(split.stream or name.partition("[")[0], name, total)
    if total < topology.world:
        raise ParallelError(f"{name!r} has {total} token(s) along dim {axis}, fewer than the "
                            f"{topology.world} ranks sharing it: every rank needs at least one")
    sizes = shard_sizes(total, topology.world)
    start = sum(sizes[: topology.position])
    return value.narrow(axis, start, sizes[topology.position])


@final
class InsideSplitHook(Hook):
    """On a submodule the plan splits at: its declared arguments before it runs, its output after."""

    order = SHARDING

    def __init__(self, session: Session, path: str, module: nn.Module, split: SplitAt) -> None:
        self.session = session
        self.path = path
        self.split = split
        self.signature = inspect.signature(type(module).forward)

    def _check_call(self) -> None:
        if self.session.layout is None:
            raise ParallelError(f"{self.path} ran outside the model's forward; with context parallelism enabled, "
                                "call the whole model (its split hook sets up each call)")

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not self.split.inputs:
            return args, kwargs
        self._check_call()
        try:
            bound = self.signature.bind(module, *args, **kwargs)
        except TypeError as error:
            raise ParallelError(f"{self.path} ({type(module).__name__}): {error}") from None
        values = bound.arguments
        for name, split in self.split.inputs.items():
            if name in values and values[name] is not None:
                values[name] = split_value(self.session, f"{self.path}:{name}", split, values[name])
        return bound.args[1:], bound.kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.split.output is None:
            return output
        self._check_call()
        return split_value(self.session, f"{self.path} output", self.split.output, output)


@final
class GatherHook(Hook):
    """On a declared submodule: all ranks get its whole output, pieces in position order."""

    order = SHARDING

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
