"""Layerwise casting: weights stored in a low-precision dtype, upcast only for their own forward."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, Final

import torch
from torch import nn

from diffcaps.casting._service import LayerwiseCasting
from diffcaps.errors import CastingError
from diffcaps.hooks import Hook, add_hook, get_hook, hook_names, hooked_modules, remove_hook
from diffcaps.protocols import SupportsLayerwiseCasting, require

__all__ = [
    "CASTABLE_LAYERS",
    "GENERIC_SKIP_PATTERNS",
    "cast_layers",
    "disable_layerwise_casting",
    "enable_layerwise_casting",
]

HOOK_NAME: Final = "layerwise_casting"
_ABSENT: Final = object()

CASTABLE_LAYERS: Final = (
    nn.Linear,
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding,
)
"""The only layer types whose weights are stored low (norms and the like stay as they are)."""

GENERIC_SKIP_PATTERNS: Final = ("patch_embed", "^proj_in$", "^proj_out$")
"""Skipped for every model in addition to the model's own patterns (input and output projections)."""

_ADAPTER_LAYER_PATTERN: Final = r"(^|\.)(lora_[A-Za-z_]+|hada_[a-z0-9_]+|lokr_[a-z0-9_]+|oft_[a-z_]+)(\.|$)"


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


def _skipped(name: str, patterns: Sequence[str]) -> bool:
    return re.search(_ADAPTER_LAYER_PATTERN, name) is not None or any(re.search(p, name) for p in patterns)


def cast_layers(model: nn.Module, skip_patterns: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """The layers layerwise casting acts on: castable types, outside every skipped subtree."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if prefix and _skipped(prefix, skip_patterns):
            return
        if isinstance(module, CASTABLE_LAYERS):
            yield prefix, module
            return
        for child_name, child in module.named_children():
            yield from walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    yield from walk(model, "")


def _check_dtype(dtype: object, role: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CastingError(f"{role} must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def enable_layerwise_casting(
    model: SupportsLayerwiseCasting,
    *,
    storage_dtype: torch.dtype = torch.float8_e4m3fn,
    compute_dtype: torch.dtype | None = None,
    skip_patterns: Sequence[str] | None = None,
) -> list[str]:
    """Store the weights of Linear/Conv/Embedding layers in ``storage_dtype``; returns the cast layers' names.

    Each cast layer is upcast to ``compute_dtype`` (default: the model's parameter dtype) just
    for its own forward. ``skip_patterns`` (regular expressions searched in module names; a
    match skips the whole subtree) default to the model's declared patterns plus
    ``GENERIC_SKIP_PATTERNS``. peft adapter layers are never cast.
    """
    model, service = require(model, "layerwise_casting")
    if any(HOOK_NAME in hook_names(module) for _, module in hooked_modules(model)):
        raise CastingError(f"layerwise casting is already enabled on this {type(model).__name__}; disable it first")
    storage = _check_dtype(storage_dtype, "storage_dtype")
    first = next(model.parameters(), None)
    compute = _check_dtype(compute_dtype if compute_dtype is not None else (first.dtype if first is not None else torch.float32), "compute_dtype")
    if storage == compute:
        raise CastingError(f"storage_dtype and compute_dtype are both {storage}: nothing would be saved")
    patterns = tuple(skip_patterns) if skip_patterns is not None else service.skip_patterns + GENERIC_SKIP_PATTERNS
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise CastingError(f"skip pattern {pattern!r} is not a regular expression: {exc}") from None
    layers = list(cast_layers(model, patterns))
    for _, layer in layers:  # checked before anything is cast
        for name, param in layer.named_parameters(recurse=False):
            if not param.dtype.is_floating_point:
                raise CastingError(f"cannot cast non-float parameter {name} ({param.dtype})")
    for _, layer in layers:
        add_hook(layer, HOOK_NAME, CastHook(storage, compute))
    return [name for name, _ in layers]


def disable_layerwise_casting(model: SupportsLayerwiseCasting) -> list[str]:
    """Remove the casting hooks and upcast the stored weights to the compute dtype.

    The weights keep the rounding of the storage dtype: reload the model for the exact
    original values. Returns the names of the layers that were cast.
    """
    model, _ = require(model, "layerwise_casting")
    restored = []
    for name, module in list(hooked_modules(model)):
        if get_hook(module, HOOK_NAME) is not None:
            remove_hook(module, HOOK_NAME)
            restored.append(name)
    return restored
