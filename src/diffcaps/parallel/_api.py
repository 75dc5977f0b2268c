"""``enable``, ``disable``, ``active``, ``assignment``: the context-parallel functions, model first."""

from __future__ import annotations

import itertools
from typing import Final

import torch.distributed as dist
from torch import nn

from diffcaps import checks
from diffcaps.errors import ParallelError
from diffcaps.hooks import add_hook, remove_hook
from diffcaps.layers import attention_kernel
from diffcaps.parallel._comm import Communicator
from diffcaps.parallel._config import ContextParallelConfig, ShardAssignment
from diffcaps.parallel._hooks import GATHER_HOOK, SPLIT_HOOK, GatherHook, InsideSplitHook, SplitHook
from diffcaps.parallel._kernels import ContextParallelKernel
from diffcaps.parallel._service import ContextParallelPlan, SplitAt, module_paths
from diffcaps.parallel._session import Session
from diffcaps.parallel._topology import make_topology, require_process_group
from diffcaps.protocols import SupportsContextParallel, require
from diffcaps.slots import InstanceSlot

__all__ = ["active", "assignment", "disable", "enable"]

_sessions = itertools.count()  # advances alike on every rank: names this session's failure reports
_SLOT: Final = InstanceSlot("context_parallel", Session)


Targets = tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module, str, SplitAt]], list[tuple[str, nn.Module]]]


def _inside(module: nn.Module, plan: ContextParallelPlan) -> list[tuple[str, nn.Module, str, SplitAt]]:
    """(path, submodule, pattern, split) for every submodule an ``inside`` pattern matches."""
    names = [name for name, _ in module.named_modules() if name]
    found: list[tuple[str, nn.Module, str, SplitAt]] = []
    for pattern, split in plan.inside.items():
        paths = module_paths(pattern, names)
        if not paths:
            raise ParallelError(f"the context-parallel plan splits inside {pattern!r}, which matches no submodule "
                                f"of {type(module).__name__}")
        found.extend((path, module.get_submodule(path), pattern, split) for path in paths)
    return found


def _targets(module: nn.Module, plan: ContextParallelPlan) -> Targets:
    """The attention modules, the submodules split inside the model and the gathered submodules, checked
    against the model (no communication)."""
    attention = [(name, m) for name, m in module.named_modules() if plan.attention.matches(m)]
    if not attention:
        raise ParallelError(f"{type(module).__name__} has no {', '.join(plan.attention.entries())} module for "
                            "context parallelism to run its attention in")
    for name, m in attention:
        if not callable(getattr(type(m), plan.kernel, None)):
            raise ParallelError(f"{type(m).__name__} ({name}) has no {plan.kernel!r} method to replace")
        if plan.kernel in m.__dict__:
            raise ParallelError(f"{name}.{plan.kernel} is already replaced on this instance by another feature")
    gathered = []
    for name in plan.outputs:
        try:
            gathered.append((name, module.get_submodule(name)))
        except AttributeError:
            raise ParallelError(f"the context-parallel plan gathers {name!r}, which {type(module).__name__} lacks") \
                from None
    return attention, _inside(module, plan), gathered


def enable(model: SupportsContextParallel, config: ContextParallelConfig | None = None) -> None:
    """Split the model's sequence over the config's ranks; call it on every rank.

    Each rank keeps its shard of what the model's plan splits (its inputs, or a submodule's
    inputs or output inside it); attention runs the
    distributed algorithm; the declared outputs are gathered, so every rank returns the whole
    result. A failing rank's error reaches the others, which raise
    :class:`~diffcaps.errors.RankFailure` naming it. Bad arguments raise before any
    communication and leave the model unchanged.

    Inference only: call the model under ``torch.no_grad()``. Load LoRAs before enabling.
    Caches decide alike on every rank: those that decide by schedule need nothing more, and
    First Block Cache sums its residual statistics over the ranks before deciding.
    """
    config = ContextParallelConfig() if config is None else config
    checks.instance(config, ContextParallelConfig, "config", ParallelError)
    module, plan = require(model, "context_parallel")
    if _SLOT.get(module) is not None:
        raise ParallelError(f"context parallelism is already enabled on this {type(module).__name__}; "
                            "call diffcaps.parallel.disable(model) first")
    attention, inside, gathered = _targets(module, plan)
    for name, target in attention:
        kernel = attention_kernel(target)
        if kernel is not None and not kernel.context_parallel:
            raise ParallelError(f"{name} runs the {kernel.name!r} attention backend, which ring attention cannot "
                                "merge (it needs the log-sum-exp only 'sdpa' and 'math' give); "
                                "call diffcaps.attention.disable(model) first")
    require_process_group()
    topology = make_topology(config.ulysses_degree, config.ring_degree, config.mesh, config.timeout)  # first communication
    comm = Communicator(rank=topology.rank, session=next(_sessions), timeout=config.timeout,
                        world_ranks=topology.members)
    session = Session(plan, topology, comm, config)
    try:
        for name, target in attention:
            original = getattr(target, plan.kernel)
            target.__dict__[plan.kernel] = ContextParallelKernel(session, name, original)
            session.kernels.append(target)
        for path, target, pattern, split in inside:
            add_hook(target, f"{SPLIT_HOOK}@{pattern}", InsideSplitHook(session, path, target, split))
            session.hooks.append((target, f"{SPLIT_HOOK}@{pattern}"))
            session.placed.append((path, target))
        for name, target in gathered:
            add_hook(target, GATHER_HOOK, GatherHook(session, name, plan.outputs[name]))
            session.hooks.append((target, GATHER_HOOK))
            session.placed.append((name, target))
        add_hook(module, SPLIT_HOOK, SplitHook(session, module))
        session.hooks.append((module, SPLIT_HOOK))
    except BaseException:
        _undo(session)
        raise
    _SLOT.set(module, session)


def _undo(session: Session) -> None:
    while session.hooks:
        module, name = session.hooks.pop()
        remove_hook(module, name)
    while session.kernels:
        del session.kernels.pop().__dict__[session.plan.kernel]
    for group in session.topology.owned_groups:
        try:
            dist.destroy_process_group(group)
        except Exception:  # already gone with the default group
            pass


def disable(model: SupportsContextParallel) -> None:
    """Remove context parallelism: the model runs whole on each rank again, exactly as before.

    Groups made by ``enable`` are destroyed; call it on every rank. Nothing happens if it is off.
    """
    module, _ = require(model, "context_parallel")
    session = _SLOT.clear(module)
    if session is not None:
        _undo(session)


def active(model: SupportsContextParallel) -> ContextParallelConfig | None:
    """The config context parallelism runs with on ``model``, or ``None`` when it is off."""
    module, _ = require(model, "context_parallel")
    session = _SLOT.get(module)
    return None if session is None else session.config


def assignment(model: SupportsContextParallel) -> ShardAssignment | None:
    """Which shard this rank holds while context parallelism is on (``None`` when it is off)."""
    module, _ = require(model, "context_parallel")
    session = _SLOT.get(module)
    if session is None:
        return None
    topology = session.topology
    return ShardAssignment(rank=topology.rank, position=topology.position, ranks=topology.world)
