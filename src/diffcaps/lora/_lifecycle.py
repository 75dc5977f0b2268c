"""The adapter lifecycle: choose and weight adapters, fuse and unfuse, delete and unload.

Exactness: ``fuse`` computes each fused weight in fp32 (``W + Σ scale·ΔW``, rounded once
to the weight's dtype) into a *new* parameter and keeps the original parameter object;
``unfuse`` puts the originals back, so the weights are bit-identical to before in any dtype.
``unload`` does the same for every parameter an adapter replaced or widened and for the
model config, then puts each base layer back where its peft layer was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, cast, overload

import torch
from torch import nn
from typing_extensions import deprecated

from diffcaps import checks
from diffcaps.errors import LoRAError
from diffcaps.io import save_safetensors
from diffcaps.lora import _peft
from diffcaps.lora._state import SLOT, LoRAState, Widening, check_prefixes, weight_for
from diffcaps.protocols import SupportsLoRA, require
from diffcaps.quantization.spec import PackedLinear, quantized_weight

__all__ = [
    "AdapterWeight",
    "SaveLayout",
    "active_adapters",
    "delete_adapters",
    "disable",
    "enable",
    "fuse",
    "list_adapters",
    "save_adapter",
    "set_adapters",
    "unfuse",
    "unload",
]

SaveLayout = Literal["diffusers", "kohya"]
"""The layouts ``save_adapter`` writes (a model declares which of them it has names for)."""

AdapterWeight = float | Mapping[str, float]
"""A weight for a whole adapter, or weights by exact module-path prefix (longest prefix wins, else 1)."""


def _module(model: SupportsLoRA) -> nn.Module:
    module, _ = require(model, "lora")
    return module


def _state(model: SupportsLoRA) -> tuple[nn.Module, LoRAState]:
    module = _module(model)
    state = SLOT.get(module)
    if state is None or not state.adapters:
        raise LoRAError(f"{type(module).__name__} has no LoRA adapter loaded")
    return module, state


def _names(state: LoRAState, names: object) -> list[str]:
    if isinstance(names, str):
        chosen = [names]
    elif isinstance(names, Sequence):
        chosen = [checks.instance(n, str, "an adapter name", LoRAError) for n in cast(Sequence[object], names)]
    else:
        raise LoRAError(f"adapter names must be a name or a list of names, got {names!r}")
    twice = sorted({n for n in chosen if chosen.count(n) > 1})
    if twice:
        raise LoRAError(f"adapter(s) {', '.join(map(repr, twice))} named more than once")
    unknown = [n for n in chosen if n not in state.adapters]
    if unknown:
        raise LoRAError(f"no adapter named {', '.join(map(repr, unknown))} is loaded "
                        f"(loaded: {', '.join(state.adapters)})")
    return chosen


def _not_fused(state: LoRAState, doing: str) -> None:
    if state.fused:
        raise LoRAError(f"cannot {doing} while adapters {state.fused_adapters} are fused; call lora.unfuse first")


def list_adapters(model: SupportsLoRA) -> tuple[str, ...]:
    """The names of the loaded adapters, in load order."""
    state = SLOT.get(_module(model))
    return tuple(state.adapters) if state is not None else ()


def active_adapters(model: SupportsLoRA) -> tuple[str, ...]:
    """The adapters that currently act on the output (none while adapters are disabled)."""
    state = SLOT.get(_module(model))
    if state is None or not state.enabled:
        return ()
    return tuple(state.active)


@overload
@deprecated("adapter weights are numbers: True/False is not a weight (use 1.0/0.0, or lora.enable/disable)")
def set_adapters(model: SupportsLoRA, names: str | Sequence[str], weights: bool | Sequence[bool]) -> NoReturn: ...


@overload
def set_adapters(
    model: SupportsLoRA,
    names: str | Sequence[str],
    weights: AdapterWeight | Sequence[AdapterWeight | None] | None = None,
) -> None: ...


def set_adapters(
    model: SupportsLoRA,
    names: str | Sequence[str],
    weights: AdapterWeight | Sequence[AdapterWeight | None] | None = None,
) -> None:
    """Make exactly ``names`` active, each with its weight (default 1).

    A weight is a number or a mapping from exact module-path prefixes to numbers:
    ``{"transformer_blocks.1": 0.5}`` scales ``transformer_blocks.1.*`` only (not
    ``transformer_blocks.10`` nor ``single_transformer_blocks.1``); the longest matching prefix
    wins and unmatched modules keep weight 1. A prefix that names no module is an error, and
    so are a bool (``True`` is not a weight; type checkers reject it too), a NaN or infinite
    weight, and a name given twice.
    """
    module, state = _state(model)
    chosen = _names(state, names)
    _not_fused(state, "change adapter weights")
    given: object = weights
    if given is None or isinstance(given, (int, float, Mapping)):
        per_adapter: list[object] = [given] * len(chosen)
    elif isinstance(given, (list, tuple)):
        per_adapter = list(cast(Sequence[object], given))
    else:
        raise LoRAError(f"adapter weights must be a number, a mapping or a list of them, got {given!r}")
    if len(per_adapter) != len(chosen):
        raise LoRAError(f"{len(chosen)} adapter(s) but {len(per_adapter)} weight(s)")
    paths = [name for name, _ in module.named_modules()]
    resolved: dict[str, float | dict[str, float]] = {}
    for name, weight in zip(chosen, per_adapter):
        value = _weight(1.0 if weight is None else weight, name)
        check_prefixes(value, paths, name)
        resolved[name] = value
    for name, value in resolved.items():
        for path in state.adapters[name].targets:
            _peft.set_weight(_peft.layer_at(module, path), name, weight_for(value, path))
    for path in state.layers():
        _peft.layer_at(module, path).set_adapter(list(chosen))
        if not state.enabled:
            _peft.layer_at(module, path).enable_adapters(False)
    state.active = list(chosen)
    state.weights.update(resolved)


def _weight(value: object, adapter: str) -> float | dict[str, float]:
    what = f"the weight of adapter {adapter!r}"
    if isinstance(value, bool) or (isinstance(value, Mapping) and any(
            isinstance(v, bool) for v in cast(Mapping[object, object], value).values())):
        raise LoRAError(f"{what} must be a number, got {value!r}: True/False is not a weight "
                        "(use 1.0/0.0, or lora.enable/lora.disable)")
    if not isinstance(value, Mapping):
        return checks.number(value, what, LoRAError)
    resolved: dict[str, float] = {}
    for prefix, number in cast(Mapping[object, object], value).items():
        key = checks.instance(prefix, str, f"{what}: a module-path prefix", LoRAError)
        resolved[key] = checks.number(number, f"{what} at {key!r}", LoRAError)
    return resolved


def _enable(model: SupportsLoRA, enabled: bool) -> None:
    module, state = _state(model)
    _not_fused(state, "enable or disable adapters")
    for path in state.layers():
        layer = _peft.layer_at(module, path)
        layer.enable_adapters(enabled)
        if enabled:
            layer.set_adapter(list(state.active))
    state.enabled = enabled


def enable(model: SupportsLoRA) -> None:
    """Let the active adapters act again after :func:`disable`."""
    _enable(model, True)


def disable(model: SupportsLoRA) -> None:
    """Stop every adapter layer from acting (the adapters stay loaded; parameter patches stay in place)."""
    _enable(model, False)


def fuse(model: SupportsLoRA, adapter_names: Sequence[str] | None = None, scale: float = 1.0) -> None:
    """Fold adapters (default: the active ones) into the base weights, each at ``scale`` × its weight.

    Each fused weight is computed in fp32 and rounded once; the original parameters are kept,
    so :func:`unfuse` restores them bit for bit. Fusing again adds further adapters.
    """
    module, state = _state(model)
    scale = checks.number(scale, "fuse scale", LoRAError)
    if not state.enabled:
        raise LoRAError("adapters are disabled; enable them before fusing")
    names = _names(state, adapter_names if adapter_names is not None else list(state.active))
    twice = [n for n in names if n in state.fused_adapters]
    if twice:
        raise LoRAError(f"adapters {twice} are already fused")
    paths = sorted({path for name in names for path in state.adapters[name].targets})
    _refuse_packed(module, paths)
    scratch: dict[torch.device, torch.Tensor] = {}
    with torch.no_grad():
        for path in paths:
            _fuse_layer(module, state, path, names, scale, scratch)
    state.fused_adapters.extend(names)


def _refuse_packed(module: nn.Module, paths: Sequence[str]) -> None:
    """Fusing needs a dense base weight: refuse (before any change) layers whose weight is packed."""
    packed = [path for path in paths if isinstance(getattr(_peft.layer_at(module, path), "base_layer", None),
                                                   PackedLinear)]
    torchao = [path for path in paths
               if path not in packed and quantized_weight(_peft.layer_at(module, path).base_layer)]
    if torchao:
        raise LoRAError(
            f"cannot fuse into {len(torchao)} layer(s) whose weights torchao quantized ({', '.join(torchao[:5])}"
            f"{', …' if len(torchao) > 5 else ''}): keep the adapter unfused (it runs beside the quantized "
            "weight at every call)")
    if packed:
        raise LoRAError(
            f"cannot fuse into {len(packed)} quantized layer(s) whose weights stay packed ({', '.join(packed[:5])}"
            f"{', …' if len(packed) > 5 else ''}): keep the adapter unfused (it runs over the decoded weight "
            "at every call, in the layer's compute dtype), or load a dense model (weights.convert the file to "
            "a diffusers folder with a --dtype, then from_pretrained) and fuse there")


_BLOCK_ELEMENTS = 1 << 24
"""Fuse works on row blocks of about this many elements (64 MB in fp32): few BLAS calls, a bounded copy."""


def _fuse_layer(module: nn.Module, state: LoRAState, path: str, names: list[str], scale: float,
                scratch: dict[torch.device, torch.Tensor]) -> None:
    layer = _peft.layer_at(module, path)
    present = [n for n in names if n in _peft.adapters_of(layer)]
    base: Any = layer.base_layer
    weight: nn.Parameter = base.weight
    bias: nn.Parameter | None = base.bias
    updates = [_peft.delta(layer, name) for name in present]
    fused = torch.empty_like(weight, requires_grad=False)
    rows = max(1, _BLOCK_ELEMENTS // max(1, weight.shape[1]))
    buffer = scratch.get(weight.device)
    if buffer is None:  # one fp32 block buffer per fuse call and device, reused by every module
        buffer = scratch[weight.device] = torch.empty(_BLOCK_ELEMENTS + weight.shape[1], device=weight.device)
    for start in range(0, weight.shape[0], rows):
        source = weight.detach()[start:start + rows]
        block = buffer[: source.numel()].view(source.shape)
        block.copy_(source)
        for update, _ in updates:
            update.add_rows(block, start, scale)
        fused[start:start + rows].copy_(block)
    state.fused.setdefault(path, (weight, bias))
    base.weight = nn.Parameter(fused, requires_grad=weight.requires_grad)
    bias_updates = [b for _, b in updates if b is not None]
    if bias is not None and bias_updates:
        total = bias.detach().float() + scale * torch.stack(bias_updates).sum(0).to(bias.device)
        base.bias = nn.Parameter(total.to(bias.dtype), requires_grad=bias.requires_grad)
    layer.merged_adapters.extend(present)


def unfuse(model: SupportsLoRA) -> None:
    """Put back the exact base weights a fuse replaced (no-op if nothing is fused)."""
    module = _module(model)
    state = SLOT.get(module)
    if state is None:
        return
    for path, (weight, bias) in state.fused.items():
        layer = _peft.layer_at(module, path)
        base = layer.base_layer
        base.weight = weight
        if bias is not None:
            base.bias = bias
        layer.merged_adapters.clear()
    state.fused.clear()
    state.fused_adapters.clear()


def delete_adapters(model: SupportsLoRA, names: str | Sequence[str]) -> None:
    """Remove these adapters and undo what they changed; the last one out restores the model exactly."""
    module, state = _state(model)
    chosen = _names(state, names)
    fused = [n for n in chosen if n in state.fused_adapters]
    if fused:
        raise LoRAError(f"adapters {fused} are fused; call lora.unfuse before deleting them")
    if set(chosen) >= set(state.adapters):
        unload(model)
        return
    for name in chosen:
        _delete_one(module, state, name)
    remaining = [n for n in state.active if n in state.adapters]
    for path in state.layers():
        _peft.layer_at(module, path).set_adapter(remaining)
        if not state.enabled:
            _peft.layer_at(module, path).enable_adapters(False)
    state.active = remaining


def _delete_one(module: nn.Module, state: LoRAState, name: str) -> None:
    record = state.adapters.pop(name)
    later = [p for other in state.adapters.values() for p in other.patches]
    for patch in reversed(record.patches):
        if getattr(patch.owner, patch.name, None) is patch.installed:
            setattr(patch.owner, patch.name, patch.original)
        else:  # a later adapter replaced the same parameter: it now restores this one's original
            for other in later:
                if other.original is patch.installed:
                    other.original = patch.original
    for widening in reversed(record.widenings):
        heir = next((o for o in state.adapters.values() if widening.path in o.targets), None)
        if heir is not None:
            heir.widenings.append(widening)
        else:
            _restore_widening(module, widening)
    for path in record.targets:
        layer = _peft.layer_at(module, path)
        layer.delete_adapter(name)
        if not _peft.adapters_of(layer):
            _peft.unwrap(module, path)
    configs: Any = getattr(module, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(name, None)
    state.weights.pop(name, None)


def _restore_widening(module: nn.Module, widening: Widening) -> None:
    widening.module.weight = widening.original_weight
    widening.module.in_features = widening.original_in_features
    if widening.original_config is not None:
        module.config = widening.original_config


def unload(model: SupportsLoRA) -> None:
    """Remove every adapter and restore the model exactly: weights, module tree, config, flags."""
    module = _module(model)
    state = SLOT.get(module)
    if state is None:
        return
    unfuse(model)
    records = list(state.adapters.values())
    for record in reversed(records):
        for patch in reversed(record.patches):
            setattr(patch.owner, patch.name, patch.original)
        for widening in reversed(record.widenings):
            _restore_widening(module, widening)
    for path in state.layers():
        _peft.unwrap(module, path)
    module.__dict__.pop("peft_config", None)
    for param, flag in state.requires_grad:
        param.requires_grad_(flag)
    SLOT.clear(module)


def save_adapter(
    model: SupportsLoRA,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    layout: SaveLayout = "diffusers",
) -> Path:
    """Write adapter ``adapter_name`` to a safetensors file in ``layout`` (``"diffusers"`` or ``"kohya"``).

    The file holds the adapter as loaded (its own rank and alpha, without any weight set by
    ``set_adapters`` and without hotswap padding), and the parameters it replaced.
    """
    module, service = require(model, "lora")
    state = SLOT.get(module)
    if state is None or adapter_name not in state.adapters:
        raise LoRAError(f"no adapter named {adapter_name!r} is loaded")
    writer = service.layout(layout)
    if writer is None:
        known = ", ".join(w.name for w in service.layouts) or "none"
        raise LoRAError(f"{type(module).__name__} cannot write the {layout!r} layout; it writes {known}")
    record = state.adapters[adapter_name]
    targets = {p: _peft.weights_of(_peft.layer_at(module, p), adapter_name, record.ranks[p]) for p in record.targets}
    patches = {patch.path: patch.installed.detach() for patch in record.patches}
    tensors, metadata = writer.export(targets, patches, model=module)
    out = Path(path)
    save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, out, metadata=metadata)
    return out
