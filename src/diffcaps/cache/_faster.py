"""FasterCache: extrapolated attention outputs, and an approximated unconditional branch.

Attention hooks compute every ``N``-th call inside the timestep range and otherwise return
``t + (t - t_prev) * w`` from their last two outputs. For a model run with classifier-free
guidance as one batch (unconditional first, conditional second) and not guidance-distilled,
a hook on the model itself runs only the conditional half on most steps, and rebuilds the
unconditional half from it by adding the low- and high-frequency differences between the
two halves measured on the last full step.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, final

import attrs
import torch
from torch import Tensor, nn

from diffcaps.cache._config import (
    FASTER_SPATIAL_IDENTIFIERS,
    FASTER_TEMPORAL_IDENTIFIERS,
    FasterCacheConfig,
    ModuleWeightCallback,
)
from diffcaps.cache._pyramid import check_identifiers
from diffcaps.cache._session import CacheSession, Clock
from diffcaps.cache._targets import HookPlacement, attention_modules, batch_size, group_of
from diffcaps.cache._service import CacheSupport
from diffcaps.errors import CacheError
from diffcaps.hooks import ContextualState, Forward, Hook, eager

__all__ = ["UNCONDITIONAL_GROUP", "plan_faster_cache"]

ATTENTION_HOOK = "diffcaps.cache.faster_cache.attention"
DENOISER_HOOK = "diffcaps.cache.faster_cache.denoiser"
UNCONDITIONAL_GROUP = "unconditional_batch"
"""The stats group of the denoiser-level decision (computed = both halves ran)."""


@final
class _AttentionState:
    __slots__ = ("batch_size", "cache", "decisions", "iteration")

    def __init__(self) -> None:
        self.decisions: list[bool] = []
        self.iteration = 0
        self.batch_size: int | None = None
        self.cache: tuple[Any, Any] | None = None


def _conditional(value: Tensor, batch: int) -> Tensor:
    if value.size(0) == batch:
        return value
    if value.size(0) != 2 * batch:
        raise CacheError(f"FasterCache: a cached attention output has batch {value.size(0)}, expected {batch} "
                         f"or {2 * batch}")
    return value[batch:]


def _extrapolate(older: Tensor, newer: Tensor, weight: float, batch: int) -> Tensor:
    older, newer = _conditional(older, batch), _conditional(newer, batch)
    return newer + (newer - older) * weight


@final
class _Attention(Hook):
    def __init__(self, state: ContextualState[_AttentionState], skip_range: int,
                 timestep_range: tuple[float, float], distilled: bool, weight: ModuleWeightCallback,
                 clock: Clock) -> None:
        self.state = state
        self.skip_range = skip_range
        self.low, self.high = timestep_range
        self.distilled = distilled
        self.weight = weight
        self.clock = clock

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        state = self.state.get()
        batch = batch_size(args, kwargs)
        if state.batch_size is None:
            state.batch_size = batch
        if self._decide(state, batch):
            output = forward(*args, **kwargs)
        else:
            assert state.cache is not None
            older, newer = state.cache
            if isinstance(newer, Tensor):
                output = _extrapolate(older, newer, self.weight(module), batch)
            else:
                output = tuple(_extrapolate(o, n, self.weight(module), batch) for o, n in zip(older, newer))
        kept = self._conditional_half(output, state.batch_size)
        state.cache = (kept, kept) if state.cache is None else (state.cache[1], kept)
        state.iteration += 1
        return output

    def _conditional_half(self, output: Any, full_batch: int) -> Any:
        def half(value: Tensor) -> Tensor:
            if not self.distilled and value.size(0) == full_batch:
                return value.chunk(2, dim=0)[1]
            return value
        if isinstance(output, Tensor):
            return half(output)
        return tuple(half(value) for value in output)

    @eager  # a host-side decision: a graph break
    def _decide(self, state: _AttentionState, batch: int) -> bool:
        clock = self.clock
        timestep = clock.now if clock.callback is None else float(clock.callback())
        if timestep is None:
            clock.missing()
        skip = self.low < timestep < self.high and not (state.iteration > 0 and state.iteration % self.skip_range == 0)
        # a full (unconditional + conditional) batch cannot be served from conditional-only outputs
        skip = skip and (self.distilled or state.batch_size != batch) and state.cache is not None
        state.decisions.append(not skip)
        return not skip

    def reset(self) -> None:
        self.state.reset()


@final
class _DenoiserState:
    __slots__ = ("decisions", "high_delta", "iteration", "low_delta")

    def __init__(self) -> None:
        self.decisions: list[bool] = []
        self.iteration = 0
        self.low_delta: Tensor | None = None
        self.high_delta: Tensor | None = None


def _frames(x: Tensor, layout: str) -> Tensor:
    if layout == "BCFHW":
        x = x.permute(0, 2, 1, 3, 4)
    return x.flatten(0, 1) if layout in ("BCFHW", "BFCHW") else x


def _unframes(x: Tensor, layout: str, batch: int) -> Tensor:
    if layout in ("BCFHW", "BFCHW"):
        x = x.reshape(batch, -1, *x.shape[1:])
    return x.permute(0, 2, 1, 3, 4) if layout == "BCFHW" else x


def _low_high(x: Tensor) -> tuple[Tensor, Tensor]:
    """The centred 2-D spectrum of ``x`` split into a low-frequency disc and the rest."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    height, width = x.shape[-2:]
    radius = min(height, width) // 5
    rows = torch.arange(height, device=x.device)[:, None]
    cols = torch.arange(width, device=x.device)[None, :]
    low = (cols - width // 2) ** 2 + (rows - height // 2) ** 2 <= radius**2
    return spectrum * low, spectrum * ~low


def _spatial(spectrum: Tensor) -> Tensor:
    real: Tensor = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real
    return real


def _sample(output: Any, field: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        first: Tensor = output[0]
        return first
    value: Tensor = getattr(output, field)
    return value


def _with_sample(output: Any, field: str, sample: Tensor) -> Any:
    if isinstance(output, Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    if isinstance(output, list):
        return [sample, *output[1:]]
    if attrs.has(type(output)):
        return attrs.evolve(output, **{field: sample})
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return dataclasses.replace(output, **{field: sample})
    setattr(output, field, sample)
    return output


@final
class _Denoiser(Hook):
    def __init__(self, state: ContextualState[_DenoiserState], config: FasterCacheConfig, sample_field: str,
                 clock: Clock) -> None:
        self.state = state
        self.config = config
        self.sample_field = sample_field
        self.clock = clock
        self.split_kwargs = frozenset(config.unconditional_conditional_input_kwargs_identifiers)

    def _alpha(self, alpha: float, timestep_range: tuple[float, float]) -> float:
        return alpha if timestep_range[0] < self.clock.read() < timestep_range[1] else 1.0

    def _low_weight(self, module: nn.Module) -> float:
        if self.config.low_frequency_weight_callback is not None:
            return self.config.low_frequency_weight_callback(module)
        return self._alpha(self.config.alpha_low_frequency, self.config.low_frequency_weight_update_timestep_range)

    def _high_weight(self, module: nn.Module) -> float:
        if self.config.high_frequency_weight_callback is not None:
            return self.config.high_frequency_weight_callback(module)
        return self._alpha(self.config.alpha_high_frequency, self.config.high_frequency_weight_update_timestep_range)

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        state = self.state.get()
        skip = self._decide(state, kwargs)
        if skip:
            args = tuple(value.chunk(2, dim=0)[1] if isinstance(value, Tensor) else value for value in args)
            kwargs = {key: value.chunk(2, dim=0)[1] if key in self.split_kwargs else value
                      for key, value in kwargs.items()}
        output = forward(*args, **kwargs)
        sample = _sample(output, self.sample_field)
        layout = self.config.tensor_format
        if skip:
            assert state.low_delta is not None and state.high_delta is not None
            state.low_delta = state.low_delta * self._low_weight(module)
            state.high_delta = state.high_delta * self._high_weight(module)
            low, high = _low_high(_frames(sample, layout).float())
            unconditional = _spatial((state.low_delta + low) + (state.high_delta + high))
            unconditional = _unframes(unconditional, layout, sample.size(0)).to(sample.dtype)
            sample = torch.cat([unconditional, sample], dim=0)
        else:
            unconditional, conditional = sample.chunk(2, dim=0)
            low_u, high_u = _low_high(_frames(unconditional, layout).float())
            low_c, high_c = _low_high(_frames(conditional, layout).float())
            state.low_delta, state.high_delta = low_u - low_c, high_u - high_c
        state.iteration += 1
        return _with_sample(output, self.sample_field, sample)

    @eager  # a host-side decision: a graph break
    def _decide(self, state: _DenoiserState, kwargs: dict[str, Any]) -> bool:
        low, high = self.config.unconditional_batch_timestep_skip_range
        skip = (state.iteration > 0 and low < self.clock.read() < high
                and state.iteration % self.config.unconditional_batch_skip_range != 0
                and state.low_delta is not None and any(key in self.split_kwargs for key in kwargs))
        state.decisions.append(not skip)
        return skip

    def reset(self) -> None:
        self.state.reset()


def plan_faster_cache(model: nn.Module, support: CacheSupport, config: FasterCacheConfig,
                      session: CacheSession) -> list[HookPlacement]:
    """Attention hooks for the selected modules, and (unless guidance-distilled) one on the model."""
    name = type(config).__name__
    candidates = [(n, m) for n, m, cross in attention_modules(model, support) if not cross]
    names = [n for n, _ in candidates]
    check_identifiers(name, "spatial_attention_block_identifiers", config.spatial_attention_block_identifiers,
                      FASTER_SPATIAL_IDENTIFIERS, names)
    if config.temporal_attention_block_skip_range is not None:
        check_identifiers(name, "temporal_attention_block_identifiers", config.temporal_attention_block_identifiers,
                          FASTER_TEMPORAL_IDENTIFIERS, names)
    weight: ModuleWeightCallback = config.attention_weight_callback or (lambda _: 0.5)
    kinds = (
        (config.spatial_attention_block_identifiers, config.spatial_attention_block_skip_range,
         config.spatial_attention_timestep_skip_range),
        (config.temporal_attention_block_identifiers, config.temporal_attention_block_skip_range,
         config.temporal_attention_timestep_skip_range),
    )
    placements: list[HookPlacement] = []
    for module_name, module in candidates:
        for identifiers, skip_range, timestep_range in kinds:
            if skip_range is None or not any(re.search(i, module_name) for i in identifiers):
                continue
            state = session.track((group_of(support, module_name),),
                                  ContextualState(_AttentionState, session.context))
            hook = _Attention(state, skip_range, timestep_range, config.is_guidance_distilled, weight, session.clock)
            placements.append((module, ATTENTION_HOOK, hook))
            break
    if not placements:
        raise CacheError(f"{name} selects no attention module of {type(model).__name__} "
                         f"(attention modules: {', '.join(names[:4]) or 'none'})")
    if not config.is_guidance_distilled:
        if support.sample_format == "BSC":
            raise CacheError(
                f"{name}: approximating the unconditional branch splits the output's spatial frequencies, but "
                f"{type(model).__name__} outputs a token sequence (BSC); set is_guidance_distilled=True to use "
                "FasterCache's attention caching alone"
            )
        if support.sample_format != config.tensor_format:
            raise CacheError(f"{name}: tensor_format is {config.tensor_format!r} but {type(model).__name__} "
                             f"outputs {support.sample_format!r}")
        denoiser_state = session.track((UNCONDITIONAL_GROUP,), ContextualState(_DenoiserState, session.context))
        denoiser = _Denoiser(denoiser_state, config, support.sample_field, session.clock)
        placements.append((model, DENOISER_HOOK, denoiser))
    return placements
