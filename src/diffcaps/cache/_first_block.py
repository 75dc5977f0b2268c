"""First Block Cache: the first block decides whether the remaining blocks run.

The head block always runs. Its hidden-states residual is compared with the one of the last
step that ran everything; if the relative change is at most ``threshold`` the remaining
blocks return their inputs and the head adds the residual the remaining blocks produced on
that step.
"""

from __future__ import annotations

from typing import Any, final

import torch
from torch import Tensor, nn

from diffcaps.cache._config import FirstBlockCacheConfig
from diffcaps.cache._session import CacheSession
from diffcaps.cache._targets import BlockIO, HookPlacement, block_lists
from diffcaps.cache._service import CacheSupport
from diffcaps.errors import CacheError
from diffcaps.hooks import ContextualState, Forward, Hook, eager, sum_over_shards, summing_over_shards

__all__ = ["plan_first_block_cache"]

HOOK_NAME = "diffcaps.cache.first_block_cache"


@final
class _State:
    __slots__ = ("compute", "decisions", "head_output", "head_residual", "tail_residuals")

    def __init__(self) -> None:
        self.compute = True
        self.decisions: list[bool] = []
        self.head_residual: Tensor | None = None
        self.head_output: tuple[Tensor, Tensor | None] | None = None
        self.tail_residuals: tuple[Tensor, Tensor | None] | None = None


def _plus(residual: Tensor | None, value: Tensor | None) -> Tensor | None:
    return None if residual is None or value is None else residual + value


def _minus(value: Tensor | None, base: Tensor | None) -> Tensor | None:
    return None if value is None or base is None else value - base


@final
class _Head(Hook):
    def __init__(self, state: ContextualState[_State], io: BlockIO, threshold: float) -> None:
        self.state = state
        self.io = io
        self.threshold = threshold

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        state = self.state.get()
        hidden_in = self.io.hidden(args, kwargs)
        output = forward(*args, **kwargs)
        hidden, encoder = self.io.split(output)
        residual = hidden - hidden_in
        if self._decide(state, residual):
            state.head_output = (hidden, encoder)
            state.head_residual = residual
            return output
        assert state.tail_residuals is not None
        tail_hidden, tail_encoder = state.tail_residuals
        return self.io.join(tail_hidden + hidden, _plus(tail_encoder, encoder))

    @eager  # a data-dependent decision: a graph break
    def _decide(self, state: _State, residual: Tensor) -> bool:
        previous = state.head_residual
        if previous is None or state.tail_residuals is None:
            compute = True
        else:
            if summing_over_shards():  # a sharded call: every shard decides from the same totals
                totals = sum_over_shards(torch.stack([(residual - previous).abs().sum(), previous.abs().sum()]).double())
                change = (totals[0] / totals[1]).item()
            else:
                change = ((residual - previous).abs().mean() / previous.abs().mean()).item()
            compute = change > self.threshold
        state.compute = compute
        state.decisions.append(compute)
        return compute

    def reset(self) -> None:
        self.state.reset()


@final
class _Rest(Hook):
    def __init__(self, state: ContextualState[_State], io: BlockIO, *, tail: bool) -> None:
        self.state = state
        self.io = io
        self.tail = tail

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        state = self.state.get()
        if not state.compute:
            return self.io.join(self.io.hidden(args, kwargs), self.io.encoder(args, kwargs))
        output = forward(*args, **kwargs)
        if self.tail:
            assert state.head_output is not None
            hidden, encoder = self.io.split(output)
            head_hidden, head_encoder = state.head_output
            state.tail_residuals = (hidden - head_hidden, _minus(encoder, head_encoder))
        return output


def plan_first_block_cache(model: nn.Module, support: CacheSupport, config: FirstBlockCacheConfig,
                           session: CacheSession) -> list[HookPlacement]:
    """The hooks First Block Cache needs: a head on the first block, followers on all others."""
    lists = block_lists(model, support)
    blocks = [(found.declared, block) for found in lists for block in found.blocks]
    if len(blocks) < 2:
        raise CacheError(f"FirstBlockCacheConfig needs at least two transformer blocks; "
                         f"{type(model).__name__} has {len(blocks)}")
    groups = tuple(found.path for found in lists if found.blocks)
    state = ContextualState(_State, session.context)
    session.track(groups, state)
    (head_declared, head), *rest = blocks
    placements: list[HookPlacement] = [(head, HOOK_NAME, _Head(state, BlockIO(head_declared, head), config.threshold))]
    for index, (declared, block) in enumerate(rest):
        placements.append((block, HOOK_NAME, _Rest(state, BlockIO(declared, block), tail=index == len(rest) - 1)))
    return placements
