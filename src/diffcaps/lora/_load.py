"""``load_adapter``: read a LoRA file of any declared format into the model as a peft adapter.

Everything that can be checked is checked before the model is touched: the file (complete,
safetensors), its format, every tensor's place and every shape. The model is then changed
inside a transaction — a snapshot of every module's attributes and ``requires_grad`` flags
(see :func:`~diffcaps.lora._state.snapshot`) — so a failure at any later point, half-way
through peft's injection included, leaves the model exactly as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import attrs
import torch
from torch import Tensor, nn

from diffcaps import checks
from diffcaps.errors import FormatError, LoRAError, ShapeError
from diffcaps.io import SafetensorsReader
from diffcaps.lora import _peft
from diffcaps.lora._adapters import LoRAWeights, TargetWeights
from diffcaps.lora._formats import ConvertedAdapter, LoRAFormat, LoRAService
from diffcaps.lora._hotswap import hotswap_adapter
from diffcaps.lora._state import SLOT, AdapterRecord, LoadReport, LoRAState, Patch, Widening, snapshot
from diffcaps.protocols import SupportsLoRA, require
from diffcaps.quantization.spec import PackedLinear
from diffcaps.slots import holding

__all__ = ["Source", "load_adapter"]

Source = str | os.PathLike[str] | Mapping[str, Tensor]
"""A LoRA file path, or a state dict already in memory."""

_SHOWN = 8


class _Tensors(Mapping[str, Tensor]):
    """A file's (or state dict's) tensors, each checked when first asked for.

    Skipped text-encoder tensors are never read. A tensor must be floating point (an integer
    scalar passes: an alpha) and finite; anything else is a :class:`FormatError` naming the key.
    """

    def __init__(self, source: SafetensorsReader | Mapping[str, Tensor]) -> None:
        self._source = source
        self._cache: dict[str, Tensor] = {}

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._cache:
            if key not in self._source:
                raise KeyError(key)
            source = self._source
            self._cache[key] = _checked(key, source.get(key) if isinstance(source, SafetensorsReader) else source[key])
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        source = self._source
        return len(source.keys()) if isinstance(source, SafetensorsReader) else len(source)


def _checked(key: str, tensor: object) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise FormatError(f"{key} is a {type(tensor).__name__}, expected a tensor")
    if tensor.dtype == torch.bool or tensor.is_complex() or \
            (not tensor.is_floating_point() and tensor.numel() != 1):
        raise FormatError(f"{key} holds {tensor.dtype}, expected floating-point weights")
    if tensor.is_floating_point():
        # fp8 is held as float16, which represents every fp8 value exactly: torch neither checks
        # fp8 for finiteness nor mixes it with other dtypes (LoKr and LoHa factors are multiplied)
        if tensor.element_size() == 1:
            tensor = tensor.to(torch.float16)
        # max |x| is NaN or infinite exactly when some value is; it is several times faster
        # than isfinite(x).all() on bf16, where the check was a fifth of a load
        if tensor.numel() and not bool(torch.isfinite(tensor.abs().amax())):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise FormatError(f"{key} holds {bad} values")
    return tensor


def _state_dict(source: Mapping[object, object], label: str) -> Mapping[str, Tensor]:
    for key in source:
        if not isinstance(key, str):
            raise FormatError(f"{label}: a LoRA state dict's keys are strings, got {key!r}")
    return cast(Mapping[str, Tensor], source)  # each value is checked when read (_Tensors)


def _listing(keys: Mapping[str, str] | list[str], limit: int = _SHOWN) -> str:
    items = sorted(keys)
    text = ", ".join(items[:limit])
    return text + (f", … and {len(items) - limit} more" if len(items) > limit else "")


def _reasons(reasons: Mapping[str, str], limit: int = _SHOWN) -> str:
    # one line per reason, each with up to three of its keys: a file skipped for one reason
    # (every key a text-encoder tensor, say) reads as one line, not hundreds
    by_reason: dict[str, list[str]] = {}
    for key, why in sorted(reasons.items()):
        by_reason.setdefault(why, []).append(key)
    lines = []
    for why, keys in list(by_reason.items())[:limit]:
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        lines.append(f"  {why}: {shown}")
    if len(by_reason) > limit:
        lines.append(f"  … and {len(by_reason) - limit} more reasons")
    return "\n".join(lines)


def _detect(service: LoRAService, keys: list[str], label: str) -> LoRAFormat:
    fmt = service.detect(keys)
    if fmt is None:
        raise FormatError(
            f"{label}: not a LoRA file in any format this model reads (tried {', '.join(service.entries())}); "
            f"first keys, which match none of them: {_listing(keys)}"
        )
    return fmt


def _convert(fmt: LoRAFormat, tensors: Mapping[str, Tensor], module: nn.Module,
             metadata: Mapping[str, str], label: str) -> ConvertedAdapter:
    try:
        return fmt.convert(tensors, model=module, metadata=metadata)
    except ShapeError as exc:
        raise ShapeError(f"{label}: {exc}") from None
    except FormatError as exc:
        raise FormatError(f"{label}: {exc}") from None


@attrs.frozen
class _Plan:
    conversion: ConvertedAdapter
    format: str
    label: str
    widen: dict[str, int]


def _check_linear(module: nn.Module, path: str, w: TargetWeights, service: LoRAService,
                  label: str, source: str) -> int | None:
    current = module.get_submodule(path)
    base = _peft.base_linear(current)
    if not isinstance(base, nn.Linear):
        raise FormatError(f"{label}: {source!r} maps to {path}, a {type(base).__name__}, not a linear module")
    if _peft.is_peft_layer(current) and _peft.kind_of(_peft.layer_at(module, path)) != w.kind:
        raise LoRAError(
            f"{label}: {path} already carries a {_peft.kind_of(_peft.layer_at(module, path))} adapter; "
            f"peft keeps one adapter kind per layer, this file is {w.kind}"
        )
    rows, cols = w.shape
    what = f"Linear(in={base.in_features}, out={base.out_features})"
    if rows != base.out_features or cols < base.in_features or \
            (cols > base.in_features and service.widening(path) is None):
        raise ShapeError(
            f"{source!r} → {path}: the module is {what}, the adapter's update is [{rows}, {cols}] "
            f"(out × in, rank {w.rank})",
            path=label,
        )
    # a rank above the smaller side is still a valid update (trainers give Flux's 64-input img_in the
    # rank of every other module); above both sides it is no low-rank update of this module at all
    if w.rank > max(rows, cols):
        raise ShapeError(f"{source!r} → {path}: rank {w.rank} exceeds both sides of the module ({what})",
                         path=label)
    if isinstance(w, LoRAWeights) and w.bias is not None and getattr(base, "bias", None) is None:
        raise ShapeError(f"{source!r} → {path}: the adapter shifts a bias the module does not have", path=label)
    if cols > base.in_features:
        if _peft.is_peft_layer(current):
            raise LoRAError(f"{label}: widening {path} to {cols} inputs would break the adapters it carries")
        return cols
    return None


def _plan(module: nn.Module, service: LoRAService, fmt: LoRAFormat, conversion: ConvertedAdapter,
          label: str, strict: bool) -> _Plan:
    if strict and conversion.unmatched:
        raise FormatError(
            f"{label}: {len(conversion.unmatched)} tensor(s) fit no module of {type(module).__name__} "
            f"(load with strict=False to skip them): "
            + "; ".join(f"{k} ({why})" for k, why in sorted(conversion.unmatched.items())[:_SHOWN])
        )
    if not conversion.targets and not conversion.patches:
        reasons = {**conversion.skipped, **conversion.unmatched}
        raise FormatError(f"{label}: read as {fmt.name}, but no tensor adapts {type(module).__name__}; "
                          f"the {len(reasons)} tensor(s) were skipped because\n{_reasons(reasons)}")
    widen: dict[str, int] = {}
    for path, w in conversion.targets.items():
        wider = _check_linear(module, path, w, service, label, conversion.sources.get(path, path))
        if wider is not None:
            _refuse_packed(module.get_submodule(path), path, label, "widens")
            widen[path] = wider
    for name, patch in conversion.patches.items():
        owner_path, _, param = name.rpartition(".")
        owner = _peft.base_linear(module.get_submodule(owner_path))
        if param == "weight":
            _refuse_packed(owner, owner_path, label, "patches the weight of")
        current = getattr(owner, param, None)
        if not isinstance(current, nn.Parameter):
            raise FormatError(f"{label}: {patch.source!r} patches {name}, which is not a parameter")
        if tuple(current.shape) != tuple(patch.value.shape):
            raise ShapeError(f"{patch.source!r} → {name}: the parameter is {list(current.shape)}, "
                             f"the file holds {list(patch.value.shape)}", path=label)
    return _Plan(conversion=conversion, format=fmt.name, label=label, widen=widen)


def _refuse_packed(layer: nn.Module, path: str, label: str, what: str) -> None:
    if isinstance(layer, PackedLinear):
        raise LoRAError(
            f"{label} {what} {path}, whose weight stays packed ({layer.codec.name}, quantized): a file that "
            "changes a base weight needs a dense model (weights.convert the quantized file to a diffusers "
            "folder with a --dtype, then from_pretrained)")


def load_adapter(
    model: SupportsLoRA,
    source: Source,
    *,
    adapter_name: str = "default",
    strict: bool = True,
    hotswap: bool = False,
) -> LoadReport:
    """Load a LoRA file (any format the model declares) as the peft adapter ``adapter_name``.

    The format is detected from the tensor names. With ``strict`` (the default) a tensor that
    fits no module is an error; ``strict=False`` loads the rest and reports the others as
    skipped. ``hotswap=True`` replaces the weights of the loaded adapter ``adapter_name`` in
    place (same modules, rank at most the padded rank), so a compiled model is not recompiled.
    The new adapter becomes active at weight 1 beside those already active. On any error the
    model is left exactly as it was.

    ``adapter_name`` is a non-empty string without ``.`` (peft keys its layers by it). Every
    tensor must be floating point (an integer scalar alpha passes) and finite, an alpha one
    number, a rank at least 1 and at most the larger side of its module; the
    ``lora_adapter_metadata`` header entry must be a peft config. Anything else is a
    ``FormatError``, ``ShapeError`` or ``LoRAError`` naming the file and the key.
    """
    module, service = require(model, "lora")
    checks.name(adapter_name, "adapter_name", LoRAError, forbidden=".")
    checks.flag(strict, "strict", LoRAError)
    checks.flag(hotswap, "hotswap", LoRAError)
    state = SLOT.get(module)
    loaded = state.adapters if state is not None else {}
    if hotswap and adapter_name not in loaded:
        raise LoRAError(f"cannot hotswap {adapter_name!r}: no such adapter is loaded "
                        f"(loaded: {', '.join(loaded) or 'none'})")
    if not hotswap and adapter_name in loaded:
        raise LoRAError(f"an adapter named {adapter_name!r} is already loaded; pick another name, "
                        "delete it first, or load with hotswap=True")
    if state is not None and state.fused:
        raise LoRAError("the model has fused adapters; unfuse it before loading another adapter")
    if holding(module, "qkv_fusion") is not None:
        raise LoRAError("the model's QKV projections are fused (diffcaps.attention.fuse_qkv); call "
                        "diffcaps.attention.unfuse_qkv(model) before loading a LoRA")
    if isinstance(source, Mapping):
        label = "<state dict>"
        tensors = _state_dict(cast(Mapping[object, object], source), label)
        fmt = _detect(service, list(tensors), label)
        plan = _plan(module, service, fmt, _convert(fmt, _Tensors(tensors), module, {}, label), label, strict)
    elif not isinstance(cast(object, source), str | os.PathLike):
        raise LoRAError(f"source must be a file path or a state dict, got {type(source).__name__}")
    else:
        label = str(Path(source))
        with SafetensorsReader(source) as reader:  # the header is parsed once, here
            fmt = _detect(service, list(reader.header.tensors), label)
            conversion = _convert(fmt, _Tensors(reader), module, reader.header.metadata, label)
            plan = _plan(module, service, fmt, conversion, label, strict)
    if hotswap:
        assert state is not None
        return hotswap_adapter(module, state, adapter_name, plan.conversion, plan.format, label)
    return _apply(module, service, state, adapter_name, plan)


def _kind(conversion: ConvertedAdapter) -> str:
    kinds = {w.kind for w in conversion.targets.values()}
    if len(kinds) > 1:
        raise LoRAError(f"the file mixes {sorted(kinds)} updates; peft holds one kind per adapter")
    return kinds.pop() if kinds else "patch"


def _apply(module: nn.Module, service: LoRAService, state: LoRAState | None, name: str, plan: _Plan) -> LoadReport:
    conversion = plan.conversion
    kind = _kind(conversion)
    targets: Mapping[str, TargetWeights] = conversion.targets
    pad = state.hotswap_rank if state is not None else None
    if pad is not None:
        targets = {path: _pad(w, pad, path) for path, w in targets.items()}
    first = state is None or not state.adapters
    flags = [(p, p.requires_grad) for p in module.parameters()] if first else []
    restore = snapshot(module)
    try:
        widenings = [_widen(module, service, path, cols) for path, cols in plan.widen.items()]
        if targets:
            _peft.inject(module, name, targets)
        patches = [_patch(module, path, patch.value, patch.mode) for path, patch in conversion.patches.items()]
        report = LoadReport(
            adapter_name=name, source=plan.label, format=plan.format, kind=kind,
            targets=tuple(conversion.targets), used=conversion.used,
            skipped={**conversion.skipped, **conversion.unmatched},
            patched=tuple(conversion.patches),
            widened=tuple(f"{w.path}: {w.original_in_features} → {cols} inputs"
                          for w, cols in zip(widenings, plan.widen.values())),
            notes=conversion.notes,
        )
        record = AdapterRecord(
            name=name, format=plan.format, kind=kind, targets=tuple(conversion.targets),
            ranks={path: w.rank for path, w in conversion.targets.items()},
            patches=patches, widenings=widenings, report=report,
        )
        new_state = state if state is not None else LoRAState()
        if first:
            new_state.requires_grad = flags
        _activate(module, new_state, record, tensor_scales=pad is not None)
    except BaseException:
        restore()
        raise
    new_state.adapters[name] = record
    new_state.active.append(name)
    new_state.weights[name] = 1.0
    SLOT.set(module, new_state)
    return report


def _pad(w: TargetWeights, rank: int, path: str) -> TargetWeights:
    if not isinstance(w, LoRAWeights):
        raise LoRAError(f"hotswap padding applies to LoRA adapters; {path} is {w.kind}")
    if w.rank > rank:
        raise _peft.rank_error(path, w.rank, rank)
    return _peft.pad_lora(w, rank)


def _activate(module: nn.Module, state: LoRAState, record: AdapterRecord, *, tensor_scales: bool) -> None:
    # peft's injection makes the new adapter the only active one on every layer of the model;
    # put back the active set (the old one plus the new adapter) everywhere
    active = [*state.active, record.name]
    for path in {*state.layers(), *record.targets}:
        layer = _peft.layer_at(module, path)
        layer.set_adapter(active)
        if not state.enabled:
            layer.enable_adapters(False)
    if tensor_scales:
        for path in record.targets:
            layer = _peft.layer_at(module, path)
            layer.scaling[record.name] = torch.tensor(float(layer.scaling[record.name]))


def _widen(module: nn.Module, service: LoRAService, path: str, cols: int) -> Widening:
    rule = service.widening(path)
    assert rule is not None
    linear = module.get_submodule(path)
    assert isinstance(linear, nn.Linear)
    old = linear.weight
    assert isinstance(old, nn.Parameter)
    wide = torch.zeros(old.shape[0], cols, dtype=old.dtype, device=old.device)
    wide[:, : old.shape[1]] = old.detach()
    config: Any = getattr(module, "config", None)
    record = Widening(module=linear, path=path, original_weight=old,
                      original_in_features=linear.in_features, original_config=config)
    linear.weight = nn.Parameter(wide, requires_grad=old.requires_grad)
    linear.in_features = cols
    if config is not None:
        module.config = rule.update_config(config, cols)
    return record


def _patch(module: nn.Module, path: str, value: Tensor, mode: str) -> Patch:
    owner_path, _, name = path.rpartition(".")
    owner = _peft.base_linear(module.get_submodule(owner_path))
    old = getattr(owner, name)
    assert isinstance(old, nn.Parameter)
    if mode == "add":
        new_value = (old.detach().float() + value.float()).to(old.dtype)
    else:
        new_value = value.to(device=old.device, dtype=old.dtype)
    installed = nn.Parameter(new_value.contiguous(), requires_grad=old.requires_grad)
    setattr(owner, name, installed)
    return Patch(owner=owner, name=name, path=path, original=old, installed=installed)
