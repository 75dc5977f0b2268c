"""Hotswap: replace a loaded adapter's weights in place, so a compiled model is not recompiled.

``enable_hotswap(model, max_rank=R)`` (before the first load) makes every LoRA adapter
load at rank ``R`` (zero-padded) with tensor scales; ``load_adapter(..., hotswap=True)``
then copies a new file's weights into the existing tensors and fills the scale tensors, so
neither a tensor's shape nor a Python constant changes.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor, nn

from diffcaps import checks
from diffcaps.errors import LoRAError
from diffcaps.lora import _peft
from diffcaps.lora._adapters import LoRAWeights
from diffcaps.lora._formats import ConvertedAdapter
from diffcaps.lora._state import SLOT, LoadReport, LoRAState, weight_for
from diffcaps.protocols import SupportsLoRA, require

__all__ = ["enable_hotswap", "hotswap_adapter"]


def enable_hotswap(model: SupportsLoRA, *, max_rank: int) -> None:
    """Pad every LoRA adapter loaded from now on to rank ``max_rank``, with tensor scales.

    Call it before the first ``load_adapter`` (and before compiling); later files of rank up
    to ``max_rank`` can then replace an adapter with ``load_adapter(..., hotswap=True)``.
    """
    module, _ = require(model, "lora")
    checks.integer(max_rank, "max_rank", LoRAError, minimum=1)
    state = SLOT.get(module)
    if state is not None and state.adapters:
        raise LoRAError("enable_hotswap must be called before the first adapter is loaded "
                        f"(loaded: {', '.join(state.adapters)})")
    SLOT.set(module, attrs.evolve(state, hotswap_rank=max_rank) if state is not None else LoRAState(hotswap_rank=max_rank))


def _check(module: nn.Module, state: LoRAState, name: str, conversion: ConvertedAdapter, label: str) -> None:
    record = state.adapters[name]
    if conversion.patches or record.patches or record.widenings:
        raise LoRAError(f"{label}: hotswapping replaces adapter layers only; this adapter or file also "
                        "replaces parameters or widens a module")
    if set(conversion.targets) != set(record.targets):
        extra = sorted(set(conversion.targets) - set(record.targets))
        missing = sorted(set(record.targets) - set(conversion.targets))
        raise LoRAError(f"{label}: hotswapping needs the same modules as adapter {name!r}; "
                        f"new: {extra[:4]}, absent: {missing[:4]}")
    for path, w in conversion.targets.items():
        if not isinstance(w, LoRAWeights):
            raise LoRAError(f"{label}: hotswapping replaces LoRA weights; {path} is {w.kind}")
        layer = _peft.layer_at(module, path)
        if _peft.kind_of(layer) != "lora":
            raise LoRAError(f"{label}: adapter {name!r} is not a LoRA adapter")
        held = layer.r[name]
        if w.rank > held:
            raise _peft.rank_error(path, w.rank, held)
        any_layer: Any = layer
        has_bias = any_layer.lora_B[name].bias is not None
        if w.bias is not None and not has_bias:
            raise LoRAError(f"{label}: {path} gains a bias adapter {name!r} was loaded without")


def hotswap_adapter(module: nn.Module, state: LoRAState, name: str, conversion: ConvertedAdapter,
                    fmt: str, label: str) -> LoadReport:
    """Copy ``conversion``'s weights into adapter ``name``'s existing tensors (all checks first)."""
    _check(module, state, name, conversion, label)
    saved: list[tuple[Tensor, Tensor]] = []
    alphas: dict[str, float] = {}
    try:
        with torch.no_grad():
            for path, w in conversion.targets.items():
                assert isinstance(w, LoRAWeights)
                layer: Any = module.get_submodule(path)
                down: Tensor = layer.lora_A[name].weight
                up: Tensor = layer.lora_B[name].weight
                bias: Tensor | None = layer.lora_B[name].bias
                saved += [(t, t.detach().clone()) for t in (down, up, bias) if t is not None]
                down.zero_()
                down[: w.rank].copy_(w.down)
                up.zero_()
                up[:, : w.rank].copy_(w.up)
                if bias is not None:
                    bias.copy_(w.bias if w.bias is not None else torch.zeros_like(bias))
                alphas[path] = layer.lora_alpha[name]
                layer.lora_alpha[name] = w.scale * down.shape[0]
                _peft.set_weight(layer, name, weight_for(state.weights[name], path))
    except BaseException:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
        for path, alpha in alphas.items():
            restored: Any = module.get_submodule(path)
            restored.lora_alpha[name] = alpha
            _peft.set_weight(restored, name, weight_for(state.weights[name], path))
        raise
    record = state.adapters[name]
    report = LoadReport(adapter_name=name, source=label, format=fmt, kind="lora", targets=record.targets,
                        used=conversion.used, skipped={**conversion.skipped, **conversion.unmatched},
                        notes=conversion.notes, hotswapped=True)
    record.format, record.report = fmt, report
    record.ranks = {path: w.rank for path, w in conversion.targets.items()}
    return report
