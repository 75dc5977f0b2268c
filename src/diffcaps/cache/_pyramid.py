"""Pyramid Attention Broadcast: an attention module reuses its last output for N - 1 calls in N."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any, final

import attrs
from torch import nn

from diffcaps.cache._config import (
    PAB_CROSS_IDENTIFIERS,
    PAB_SPATIAL_IDENTIFIERS,
    PAB_TEMPORAL_IDENTIFIERS,
    PyramidAttentionBroadcastConfig,
)
from diffcaps.cache._session import CacheSession, Clock
from diffcaps.cache._targets import HookPlacement, attention_modules, group_of
from diffcaps.cache._service import CacheSupport
from diffcaps.errors import CacheError
from diffcaps.hooks import ContextualState, Forward, Hook, eager

__all__ = ["check_identifiers", "plan_pyramid_attention_broadcast"]

HOOK_NAME = "diffcaps.cache.pyramid_attention_broadcast"


@final
class _State:
    __slots__ = ("cache", "decisions", "iteration")

    def __init__(self) -> None:
        self.decisions: list[bool] = []
        self.iteration = 0
        self.cache: Any = None


@final
class _Broadcast(Hook):
    def __init__(self, state: ContextualState[_State], skip_range: int, timestep_range: tuple[float, float],
                 clock: Clock) -> None:
        self.state = state
        self.skip_range = skip_range
        self.low, self.high = timestep_range
        self.clock = clock

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        state = self.state.get()
        output = forward(*args, **kwargs) if self._decide(state) else state.cache
        state.cache = output
        state.iteration += 1
        return output

    @eager  # a host-side decision: a graph break
    def _decide(self, state: _State) -> bool:
        clock = self.clock
        timestep = clock.now if clock.callback is None else float(clock.callback())
        if timestep is None:
            clock.missing()
        compute = (state.cache is None or state.iteration == 0 or not self.low < timestep < self.high
                   or state.iteration % self.skip_range == 0)
        state.decisions.append(compute)
        return compute

    def reset(self) -> None:
        self.state.reset()


def check_identifiers(config_name: str, field: str, identifiers: Sequence[str], defaults: Sequence[str],
                      names: Sequence[str], search: bool = True) -> None:
    """Raise if user-given ``identifiers`` (not the defaults) include one that matches none of ``names``."""
    if tuple(identifiers) == tuple(defaults):
        return
    match = re.search if search else re.fullmatch
    unmatched = [i for i in identifiers if not any(match(i, name) for name in names)]
    if unmatched:
        shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
        raise CacheError(f"{config_name}.{field}: {unmatched} match no module of the model (candidates: {shown})")


def plan_pyramid_attention_broadcast(model: nn.Module, support: CacheSupport, config: PyramidAttentionBroadcastConfig,
                                     session: CacheSession) -> list[HookPlacement]:
    """One broadcast hook per attention module that the config's identifiers select."""
    if (config.spatial_attention_block_skip_range is None and config.temporal_attention_block_skip_range is None
            and config.cross_attention_block_skip_range is None):
        warnings.warn("PyramidAttentionBroadcastConfig sets no *_attention_block_skip_range; using "
                      "spatial_attention_block_skip_range=2", UserWarning, stacklevel=3)
        config = attrs.evolve(config, spatial_attention_block_skip_range=2)
    candidates = attention_modules(model, support)
    names = [name for name, _, _ in candidates]
    name = type(config).__name__
    kinds = (
        ("spatial", config.spatial_attention_block_identifiers, PAB_SPATIAL_IDENTIFIERS, False,
         config.spatial_attention_block_skip_range, config.spatial_attention_timestep_skip_range),
        ("temporal", config.temporal_attention_block_identifiers, PAB_TEMPORAL_IDENTIFIERS, False,
         config.temporal_attention_block_skip_range, config.temporal_attention_timestep_skip_range),
        ("cross", config.cross_attention_block_identifiers, PAB_CROSS_IDENTIFIERS, True,
         config.cross_attention_block_skip_range, config.cross_attention_timestep_skip_range),
    )
    for kind, identifiers, defaults, _, skip_range, _ in kinds:
        if skip_range is not None:
            check_identifiers(name, f"{kind}_attention_block_identifiers", identifiers, defaults, names)
    placements: list[HookPlacement] = []
    for module_name, module, is_cross in candidates:
        for _, identifiers, _, cross, skip_range, timestep_range in kinds:
            if skip_range is None or cross != is_cross:
                continue
            if any(re.search(identifier, module_name) for identifier in identifiers):
                state = session.track((group_of(support, module_name),), ContextualState(_State, session.context))
                hook = _Broadcast(state, skip_range, timestep_range, session.clock)
                placements.append((module, HOOK_NAME, hook))
                break
    if not placements:
        raise CacheError(f"{name} selects no attention module of {type(model).__name__} "
                         f"(attention modules: {', '.join(names[:4]) or 'none'})")
    return placements
