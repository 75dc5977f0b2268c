"""Layerwise casting: weights stored in a low-precision dtype, upcast only for their own forward."""

from __future__ import annotations

from typing import Any, Final, final

import attrs
import torch
from torch import nn

from diffcaps.casting._config import LayerwiseCastingConfig
from diffcaps.casting._layers import GENERIC_SKIP_PATTERNS, cast_layers
from diffcaps import checks
from diffcaps.errors import CastingError
from diffcaps.hooks import Hook, add_hook, get_hook, remove_hook
from diffcaps.protocols import SupportsLayerwiseCasting, require, supports_keep_in_fp32
from diffcaps.slots import InstanceSlot

__all__ = ["active", "disable", "enable"]

HOOK_NAME: Final = "layerwise_casting"
_ABSENT: Final = object()


class CastHook(Hook):
    """Upcasts the layer's parameters to ``compute_dtype`` for the call, then puts the stored ones back."""

    def __init__(self, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        self.storage_dtype = storage_dtype
        self.compute_dtype = compute_dtype
        self.stored: dict[str, torch.Tensor] = {}
        self.previous_compute_dtype: object = _ABSENT

    def attach(self, module: nn.Module) -> None:
        for name, param in module.named_parameters(recurse=False):
            self.stored[name] = param.data.to(self.storage_dtype)
            param.data = self.stored[name]
        # peft creates adapters in a base layer's ``compute_dtype`` when it has one (as for
        # bitsandbytes layers), so adapters added later are not created in the storage dtype.
        self.previous_compute_dtype = module.__dict__.get("compute_dtype", _ABSENT)
        module.__dict__["compute_dtype"] = self.compute_dtype

    def detach(self, module: nn.Module) -> None:
        for name, param in module.named_parameters(recurse=False):
            param.data = self.stored[name].to(self.compute_dtype)
        self.stored.clear()
        if self.previous_compute_dtype is _ABSENT:
            del module.__dict__["compute_dtype"]
        else:
            module.__dict__["compute_dtype"] = self.previous_compute_dtype

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for name, param in module.named_parameters(recurse=False):
            param.data = self.stored[name].to(self.compute_dtype)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        for name, param in module.named_parameters(recurse=False):
            param.data = self.stored[name]
        return output


@final
@attrs.define
class _Cast:
    """What ``enable`` did on one model instance: its config and the layers it cast."""

    config: LayerwiseCastingConfig
    layers: list[nn.Module]


_SLOT: Final = InstanceSlot("layerwise_casting", _Cast)


def enable(model: SupportsLayerwiseCasting, config: LayerwiseCastingConfig | None = None) -> list[str]:
    """Store the weights of Linear/Conv/Embedding layers low; returns the cast layers' names.

    See :class:`LayerwiseCastingConfig` (the default stores fp8, computes in the model's
    dtype). peft adapter layers and the modules the model keeps in float32
    (``keep_in_fp32``) are never cast. Enabling twice is an error: ``disable`` first.
    """
    config = LayerwiseCastingConfig() if config is None else config
    checks.instance(config, LayerwiseCastingConfig, "config", CastingError)
    module, service = require(model, "layerwise_casting")
    if _SLOT.get(module) is not None:
        raise CastingError(f"layerwise casting is already enabled on this {type(module).__name__}; disable it first")
    first = next((p for p in module.parameters() if p.is_floating_point()), None)
    compute = config.compute_dtype or (first.dtype if first is not None else torch.float32)
    if not compute.is_floating_point:
        raise CastingError(f"compute_dtype must be a floating-point torch.dtype, got {compute!r}")
    if config.storage_dtype == compute:
        raise CastingError(f"storage_dtype and compute_dtype are both {compute}: nothing would be saved")
    patterns = config.skip_patterns
    if patterns is None:
        patterns = service.skip_patterns + GENERIC_SKIP_PATTERNS
    keep = model.capabilities.keep_in_fp32 if supports_keep_in_fp32(model) else None  # never cast
    layers = [(name, layer) for name, layer in cast_layers(module, patterns) if keep is None or not keep.matches(name)]
    for layer_name, layer in layers:  # checked before anything is cast
        for name, param in layer.named_parameters(recurse=False):
            if not param.dtype.is_floating_point:
                raise CastingError(f"cannot cast non-float parameter {layer_name}.{name} ({param.dtype})")
            if type(param) not in (torch.Tensor, nn.Parameter):  # torchao's quantized weights, say
                raise CastingError(f"cannot cast quantized parameter {layer_name}.{name} "
                                   f"({type(param).__qualname__}): it is not a plain tensor")
    for _, layer in layers:
        add_hook(layer, HOOK_NAME, CastHook(config.storage_dtype, compute))
    _SLOT.set(module, _Cast(config=config, layers=[layer for _, layer in layers]))
    return [name for name, _ in layers]


def disable(model: SupportsLayerwiseCasting) -> None:
    """Remove the casting hooks and upcast the stored weights to the compute dtype.

    The weights keep the rounding of the storage dtype: reload the model for the exact
    original values. Nothing happens if casting is off.
    """
    module, _ = require(model, "layerwise_casting")
    state = _SLOT.clear(module)
    for layer in [] if state is None else state.layers:
        if get_hook(layer, HOOK_NAME) is not None:
            remove_hook(layer, HOOK_NAME)


def active(model: SupportsLayerwiseCasting) -> LayerwiseCastingConfig | None:
    """The config casting runs with, or ``None`` when it is off."""
    module, _ = require(model, "layerwise_casting")
    state = _SLOT.get(module)
    return None if state is None else state.config
