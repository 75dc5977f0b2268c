"""MagCache: skip every block while the accumulated residual-magnitude drift stays small.

The head block decides before anything runs. On a skipped step it returns its input plus
the residual (last block's output minus first block's input) of the last computed step, and
the other blocks pass their inputs through. The last block records that residual, and, in
calibration mode, the ratio of its per-token norms to the previous step's.

The running ratio and error are kept in float32, the precision of a ratio table held as a
float32 tensor, so that decisions match such an implementation bit for bit.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any, final

import torch
from torch import Tensor, nn

from diffcaps.cache._config import MagCacheConfig
from diffcaps.cache._session import CacheSession
from diffcaps.cache._targets import BlockIO, HookPlacement, block_lists
from diffcaps.cache._service import CacheSupport
from diffcaps.errors import CacheError
from diffcaps.hooks import ContextualState, Forward, Hook, eager, StateContext

__all__ = ["plan_mag_cache"]

HOOK_NAME = "diffcaps.cache.mag_cache"
_LOG = logging.getLogger("diffcaps.cache")


def _f32(value: float) -> float:
    rounded: float = struct.unpack("f", struct.pack("f", value))[0]
    return rounded


@final
class _State:
    __slots__ = ("calibration", "compute", "decisions", "error", "head_input", "previous_residual", "ratio",
                 "skipped_in_row", "step")

    def __init__(self) -> None:
        self.decisions: list[bool] = []
        self.previous_residual: Tensor | None = None
        self.head_input: Tensor | None = None
        self.compute = True
        self.ratio = 1.0
        self.error = 0.0
        self.skipped_in_row = 0
        self.step = 0
        self.calibration: list[float] = []


def _add_residual(hidden: Tensor, residual: Tensor) -> Tensor:
    if residual.device != hidden.device:
        residual = residual.to(hidden.device)
    if residual.shape == hidden.shape:
        return hidden + residual
    if hidden.ndim == 3 and residual.ndim == 3 and hidden.shape[0] == residual.shape[0] \
            and hidden.shape[2] == residual.shape[2] and hidden.shape[1] > residual.shape[1]:
        # the head takes a joined sequence whose trailing tokens are the ones the residual covers
        start = hidden.shape[1] - residual.shape[1]
        out = hidden.clone()
        out[:, start:, :] = out[:, start:, :] + residual
        return out
    raise CacheError(f"MagCache cannot add a residual of shape {tuple(residual.shape)} to hidden states of shape "
                     f"{tuple(hidden.shape)}: the first block's input and the last block's output do not line up")


def _residual(output: Tensor, head_input: Tensor) -> Tensor:
    if output.shape == head_input.shape:
        return output - head_input
    if output.ndim == 3 and head_input.ndim == 3 and output.shape[2] == head_input.shape[2] \
            and output.shape[1] > head_input.shape[1]:
        # the last block returns the joined sequence: the head's tokens are at its end
        return output[:, -head_input.shape[1]:] - head_input
    raise CacheError(f"MagCache cannot take a residual between the last block's output {tuple(output.shape)} and "
                     f"the first block's input {tuple(head_input.shape)}")


@final
class _MagBlock(Hook):
    """One block's part: ``head`` decides, ``tail`` records; a one-block model has both."""

    def __init__(self, state: ContextualState[_State], io: BlockIO, config: MagCacheConfig, *, head: bool,
                 tail: bool, finished: Callable[[tuple[float, ...]], None]) -> None:
        self.state = state
        self.io = io
        self.config = config
        self.head = head
        self.tail = tail
        self.finished = finished
        self.ratios = tuple(_f32(r) for r in config.mag_ratios or ())
        self.threshold = _f32(config.threshold)
        self.retention_step = int(config.retention_ratio * config.num_inference_steps + 0.5)

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        state = self.state.get()
        if self.head:
            hidden = self.io.hidden(args, kwargs)
            state.head_input = hidden
            if not self._decide(state):
                assert state.previous_residual is not None
                output = self.io.join(_add_residual(hidden, state.previous_residual), self.io.encoder(args, kwargs))
                if self.tail:
                    self._advance(state)
                return output
        elif not state.compute:
            if self.tail:
                self._advance(state)
            return self.io.join(self.io.hidden(args, kwargs), self.io.encoder(args, kwargs))
        output = forward(*args, **kwargs)
        if self.tail and state.head_input is not None:
            residual = _residual(self.io.split(output)[0], state.head_input)
            if self.config.calibrate:
                self._calibrate(state, residual)
            state.previous_residual = residual
            self._advance(state)
        return output

    @eager  # a data-dependent decision: a graph break
    def _decide(self, state: _State) -> bool:
        compute = True
        step = state.step
        if not self.config.calibrate and step >= self.retention_step:
            scale = self.ratios[step] if step < len(self.ratios) else 1.0
            state.ratio = _f32(state.ratio * scale)
            state.skipped_in_row += 1
            state.error = _f32(state.error + abs(_f32(1.0 - state.ratio)))
            if state.previous_residual is not None and state.error <= self.threshold \
                    and state.skipped_in_row <= self.config.max_skip_steps:
                compute = False
            else:
                state.ratio, state.error, state.skipped_in_row = 1.0, 0.0, 0
        state.compute = compute
        state.decisions.append(compute)
        return compute

    @eager  # reads norms back to the host
    def _calibrate(self, state: _State, residual: Tensor) -> None:
        if state.previous_residual is None:
            ratio = 1.0
        else:
            current = torch.linalg.norm(residual.float(), dim=-1)
            previous = torch.linalg.norm(state.previous_residual.float(), dim=-1)
            ratio = (current / (previous + 1e-8)).mean().item()
        state.calibration.append(ratio)

    def _advance(self, state: _State) -> None:
        state.step += 1
        if state.step < self.config.num_inference_steps:
            return
        if self.config.calibrate:
            self.finished(tuple(state.calibration))
        state.step, state.ratio, state.error, state.skipped_in_row = 0, 1.0, 0.0, 0
        state.previous_residual = None
        state.calibration = []

    def reset(self) -> None:
        self.state.reset()


def plan_mag_cache(model: nn.Module, support: CacheSupport, config: MagCacheConfig,
                   session: CacheSession) -> list[HookPlacement]:
    """The hooks MagCache needs: the first block decides, the last records, the others follow."""
    lists = block_lists(model, support)
    blocks = [(found.declared, block) for found in lists for block in found.blocks]
    if not blocks:
        raise CacheError(f"MagCacheConfig needs at least one transformer block; {type(model).__name__} has none")
    groups = tuple(found.path for found in lists if found.blocks)
    state = ContextualState(_State, session.context)
    context: StateContext = session.context

    session.track(groups, state)

    def finished(ratios: tuple[float, ...]) -> None:
        session.calibrations[context.current] = ratios
        _LOG.info("MagCache calibration (%s, %d steps): mag_ratios=%s", context.current, len(ratios), list(ratios))

    last = len(blocks) - 1
    return [
        (block, HOOK_NAME, _MagBlock(state, BlockIO(declared, block), config, head=index == 0, tail=index == last,
                                     finished=finished))
        for index, (declared, block) in enumerate(blocks)
    ]
