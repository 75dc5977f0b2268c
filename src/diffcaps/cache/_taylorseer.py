"""TaylorSeer: between full steps, predict module outputs from finite-difference derivatives.

A hooked module counts its calls. On a computed call it stores its output as the order-0
factor and the divided differences with the previous computed call as the higher orders;
on a predicted call it returns ``sum_k f_k * d**k / k!`` with ``d`` the calls since the last
computed one. A "skip" module (``skip_predict_identifiers``) returns zeros of the recorded
shapes instead, for outputs that a predicted module downstream makes irrelevant.
"""

from __future__ import annotations

import math
import re
from typing import Any, final

import torch
from torch import Tensor, nn

from diffcaps.cache._config import TaylorSeerCacheConfig
from diffcaps.cache._session import CacheSession
from diffcaps.cache._targets import HookPlacement, attention_modules, block_lists, group_of, submodule
from diffcaps.cache._service import CacheSupport
from diffcaps.errors import CacheError
from diffcaps.hooks import ContextualState, Forward, Hook, eager

__all__ = ["plan_taylorseer_cache"]

HOOK_NAME = "diffcaps.cache.taylorseer_cache"


@final
class _State:
    __slots__ = ("decisions", "device", "dtypes", "factors", "last_update", "shapes", "step")

    def __init__(self) -> None:
        self.decisions: list[bool] = []
        self.step = -1
        self.last_update: int | None = None
        self.factors: list[list[Tensor]] = []
        self.dtypes: tuple[torch.dtype, ...] = ()
        self.shapes: tuple[torch.Size, ...] = ()
        self.device: torch.device | None = None


@final
class _Taylor(Hook):
    def __init__(self, state: ContextualState[_State], config: TaylorSeerCacheConfig, *, skip: bool) -> None:
        self.state = state
        self.config = config
        self.skip = skip

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        state = self.state.get()
        if self._decide(state):
            output = forward(*args, **kwargs)
            self._update(state, (output,) if isinstance(output, Tensor) else tuple(output))
            return output
        predicted = self._predict(state)
        return predicted[0] if len(predicted) == 1 else tuple(predicted)

    @eager  # a host-side counter: a graph break
    def _decide(self, state: _State) -> bool:
        config = self.config
        state.step += 1
        step = state.step
        compute = (state.last_update is None or step < config.disable_cache_before_step
                   or (step - config.disable_cache_before_step - 1) % config.cache_interval == 0
                   or (config.disable_cache_after_step is not None and step >= config.disable_cache_after_step))
        state.decisions.append(compute)
        return compute

    def _update(self, state: _State, outputs: tuple[Tensor, ...]) -> None:
        state.dtypes = tuple(output.dtype for output in outputs)
        state.device = outputs[0].device
        if self.skip:
            state.shapes = tuple(output.shape for output in outputs)
        else:
            dtype = self.config.taylor_factors_dtype
            factors = []
            for index, features in enumerate(outputs):
                orders = [features]
                if state.last_update is not None:
                    distance = state.step - state.last_update
                    previous = state.factors[index] if index < len(state.factors) else []
                    for order in range(min(self.config.max_order, len(previous))):
                        if previous[order].shape != orders[order].shape:
                            break  # the output changed shape: start the expansion again
                        orders.append((orders[order] - previous[order].to(features.dtype)) / distance)
                factors.append([f if dtype is None else f.to(dtype) for f in orders])
            state.factors = factors
        state.last_update = state.step

    @eager  # host-side coefficients: a graph break
    def _predict(self, state: _State) -> list[Tensor]:
        if self.skip:
            return [torch.zeros(shape, dtype=dtype, device=state.device)
                    for shape, dtype in zip(state.shapes, state.dtypes, strict=True)]
        assert state.last_update is not None
        distance = state.step - state.last_update
        outputs = []
        for factors, dtype in zip(state.factors, state.dtypes, strict=True):
            output = torch.zeros_like(factors[0], dtype=dtype)
            for order, factor in enumerate(factors):
                output = output + factor.to(dtype) * (distance**order / math.factorial(order))
            outputs.append(output)
        return outputs

    def reset(self) -> None:
        self.state.reset()


def _matching(model: nn.Module, patterns: tuple[str, ...], field: str) -> list[tuple[str, nn.Module]]:
    names = [(name, module) for name, module in model.named_modules() if name]
    unmatched = [p for p in patterns if not any(re.fullmatch(p, name) for name, _ in names)]
    if unmatched:
        raise CacheError(f"TaylorSeerCacheConfig.{field}: {unmatched} fully match no module name of "
                         f"{type(model).__name__} (names look like {', '.join(n for n, _ in names[:3])}, …)")
    return [(name, module) for name, module in names if any(re.fullmatch(p, name) for p in patterns)]


def _targets(model: nn.Module, support: CacheSupport,
             config: TaylorSeerCacheConfig) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """(skipped modules, predicted modules), by name."""
    if config.use_lite_mode:
        if support.output_projection is None:
            raise CacheError(f"TaylorSeerCacheConfig(use_lite_mode=True) predicts the output projection, but "
                             f"{type(model).__name__}'s CacheSupport declares no output_projection")
        projection = submodule(model, support.output_projection, what="its declared output_projection")
        skipped = [(f"{found.path}.{index}", block) for found in block_lists(model, support)
                   for index, block in enumerate(found.blocks)]
        return skipped, [(support.output_projection, projection)]
    skipped = _matching(model, config.skip_predict_identifiers or (), "skip_predict_identifiers")
    if config.cache_identifiers:
        predicted = _matching(model, config.cache_identifiers, "cache_identifiers")
    else:
        predicted = [(name, module) for name, module, _ in attention_modules(model, support)]
    skipped_ids = {id(module) for _, module in skipped}
    return skipped, [(name, module) for name, module in predicted if id(module) not in skipped_ids]


def plan_taylorseer_cache(model: nn.Module, support: CacheSupport, config: TaylorSeerCacheConfig,
                          session: CacheSession) -> list[HookPlacement]:
    """One TaylorSeer hook per selected module: skipped ones return zeros, the others are predicted."""
    skipped, predicted = _targets(model, support, config)
    if not predicted and not skipped:
        raise CacheError(f"TaylorSeerCacheConfig selects no module of {type(model).__name__}")
    placements: list[HookPlacement] = []
    for modules, skip in ((skipped, True), (predicted, False)):
        for name, module in modules:
            state = session.track((group_of(support, name),), ContextualState(_State, session.context))
            hook = _Taylor(state, config, skip=skip)
            placements.append((module, HOOK_NAME, hook))
    return placements
