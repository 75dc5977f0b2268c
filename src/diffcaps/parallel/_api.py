"""``enable_context_parallel``, ``disable``, ``current``: the context-parallel functions, model first."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import torch.distributed as dist
from torch import nn

from diffcaps.errors import ParallelError
from diffcaps.hooks import add_hook, remove_hook
from diffcaps.parallel._comm import Communicator
from diffcaps.parallel._hooks import GATHER_HOOK, SPLIT_HOOK, GatherHook, SplitHook
from diffcaps.parallel._kernels import ContextParallelKernel
from diffcaps.parallel._service import ContextParallelPlan
from diffcaps.parallel._session import Session
from diffcaps.parallel._topology import check_degrees, make_topology, require_process_group

if TYPE_CHECKING:
    from diffcaps.protocols import SupportsContextParallel

__all__ = ["ContextParallelConfig", "current", "disable", "disable_context_parallel", "enable_context_parallel"]

_SESSION: Final = "_diffcaps_parallel"
DEFAULT_TIMEOUT: Final = timedelta(minutes=5)
_sessions = itertools.count()  # advances alike on every rank: names this session's failure reports


@final
@attrs.frozen(kw_only=True)
class ContextParallelConfig:
    """What ``current(model)`` reports about the context parallelism enabled on a model."""

    ulysses_degree: int
    ring_degree: int
    rank: int
    position: int
    """Which shard of each split input this rank holds."""
    timeout: timedelta


def _plan(model: object) -> ContextParallelPlan:
    from diffcaps.protocols import require

    _, plan = require(model, "context_parallel")  # type: ignore[call-overload]
    assert isinstance(plan, ContextParallelPlan)
    return plan


def _session(model: object) -> Session | None:
    session: Session | None = getattr(model, "__dict__", {}).get(_SESSION)
    return session


def _timeout(value: object) -> timedelta:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ParallelError(f"timeout must be a positive number of seconds or a timedelta, got {value!r}")
    return timedelta(seconds=float(seconds))


def _targets(module: nn.Module, plan: ContextParallelPlan) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """The attention modules and the gathered submodules, checked against the model (no communication)."""
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
    return attention, gathered


def enable_context_parallel(model: SupportsContextParallel, *, ulysses_degree: int = 1, ring_degree: int = 1,
                            mesh: Any = None, timeout: timedelta | float = DEFAULT_TIMEOUT) -> None:
    """Split the model's sequence over ``ulysses_degree × ring_degree`` ranks; call it on every rank.

    Each rank keeps its shard of the inputs the model's plan splits; attention runs Ulysses
    (all-to-all over heads), ring (K/V passed around, partial results merged) or both on a
    (ring, ulysses) grid; the declared outputs are gathered, so every rank returns the whole
    result. ``mesh`` (a ``DeviceMesh``, 1-D or 2-D with dims named ``ring`` and ``ulysses``)
    replaces the default grid over all ranks. Every collective waits at most ``timeout``; a
    failing rank's error reaches the others, which raise :class:`~diffcaps.errors.RankFailure`
    naming it. Bad arguments raise before any communication and leave the model unchanged.

    Inference only: call the model under ``torch.no_grad()``. Load LoRAs before enabling.
    First Block Cache is refused (each rank would decide from its own shard); the caches that
    decide by schedule work, alike on every rank.
    """
    plan = _plan(model)
    if not isinstance(model, nn.Module):
        raise ParallelError(f"context parallelism acts on torch modules; got a {type(model).__name__}")
    ulysses, ring = check_degrees(ulysses_degree, ring_degree)
    wait = _timeout(timeout)
    if _session(model) is not None:
        raise ParallelError(f"context parallelism is already enabled on this {type(model).__name__}; "
                            "call diffcaps.parallel.disable(model) first")
    attention, gathered = _targets(model, plan)
    require_process_group()
    topology = make_topology(ulysses, ring, mesh, wait)  # the first communication: creating groups
    comm = Communicator(rank=topology.rank, session=next(_sessions), timeout=wait, world_ranks=topology.members)
    session = Session(plan, topology, comm, ulysses_degree=ulysses, ring_degree=ring, timeout=wait)
    try:
        for name, module in attention:
            original = getattr(module, plan.kernel)
            module.__dict__[plan.kernel] = ContextParallelKernel(session, name, original)
            session.kernels.append(module)
        for name, module in gathered:
            add_hook(module, GATHER_HOOK, GatherHook(session, name, plan.outputs[name]))
            session.hooks.append((module, GATHER_HOOK))
            session.gathered.append((name, module))
        add_hook(model, SPLIT_HOOK, SplitHook(session, model))
        session.hooks.append((model, SPLIT_HOOK))
    except BaseException:
        _undo(session)
        raise
    model.__dict__[_SESSION] = session


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


def disable(model: SupportsContextParallel) -> ContextParallelConfig | None:
    """Remove context parallelism: the model runs whole on each rank again, exactly as before.

    Returns what was enabled (``None`` if nothing was). Groups made by ``enable_context_parallel``
    are destroyed; call it on every rank.
    """
    config = current(model)
    session = _session(model)
    if session is None or not isinstance(model, nn.Module):
        return None
    _undo(session)
    del model.__dict__[_SESSION]
    return config


disable_context_parallel = disable


def current(model: SupportsContextParallel) -> ContextParallelConfig | None:
    """What context parallelism is enabled on ``model`` on this rank (``None`` if none)."""
    session = _session(model)
    if session is None:
        return None
    topology = session.topology
    return ContextParallelConfig(ulysses_degree=session.ulysses_degree, ring_degree=session.ring_degree,
                                 rank=topology.rank, position=topology.position, timeout=session.timeout)
