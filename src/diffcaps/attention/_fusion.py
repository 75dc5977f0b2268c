"""``fuse_qkv`` / ``unfuse_qkv`` / ``qkv_fused``: one matmul for a declared attention module's
query, key and value projections.

Fusing concatenates each group's three weights (and biases) into one ``nn.Linear`` that takes
the group's ``fused`` name, and removes the three: no copy is kept, so memory does not grow.
Unfusing splits it back into three ``nn.Linear`` of the original values, dtype, device and
``requires_grad``. While fused, ``state_dict()`` still has the unfused (diffusers) layout: a
state-dict hook splits each fused tensor into views under the original names, in the original
order, and a load hook concatenates them again, so ``save_pretrained`` and ``load_state_dict``
work as on the unfused model.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, Final, final

import attrs
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from diffcaps.attention._qkv import FUSED, FusedGroups, QKVFusion, QKVGroup
from diffcaps.errors import AttentionError, CapabilityError
from diffcaps.hooks import hook_names
from diffcaps.protocols import SupportsAttention, require, unwrap_compiled
from diffcaps.quantization.spec import quantized_weight
from diffcaps.slots import InstanceSlot, holding

__all__ = ["fuse_qkv", "qkv_fused", "unfuse_qkv"]

_SUFFIXES: Final = ("weight", "bias")


@final
@attrs.frozen
class _Fused:
    """The model's record: which attention modules are fused, and their hooks' handles."""

    modules: tuple[nn.Module, ...]
    handles: tuple[RemovableHandle, ...]


_MODEL: Final = InstanceSlot("qkv_fusion", _Fused)


def _fusion(model: SupportsAttention) -> tuple[nn.Module, QKVFusion]:
    module, service = require(model, "attention")
    if service.qkv_fusion is None:
        raise CapabilityError(type(module).__name__, "qkv_fusion (its attention row declares no fused projections)")
    return module, service.qkv_fusion


def _busy(module: nn.Module, doing: str) -> None:
    """Refuse while a feature holds the projections' parameters or hooks them."""
    adapters = holding(module, "lora")
    if adapters:
        raise AttentionError(f"cannot {doing} QKV projections: {adapters} are loaded on them; unload them "
                             "first (diffcaps.lora.unload), or load LoRAs into the unfused model")
    if holding(module, "group_offloading") is not None:
        raise AttentionError(f"cannot {doing} QKV projections while group offloading is enabled (its groups hold "
                             "the parameters); call diffcaps.offload.disable(model) first")
    if holding(module, "layerwise_casting") is not None:
        raise AttentionError(f"cannot {doing} QKV projections while layerwise casting is enabled (its hooks are on "
                             "the projections); call diffcaps.casting.disable(model) first")


def _bias(layer: nn.Linear) -> Tensor | None:
    bias: Tensor | None = getattr(layer, "bias")  # None for bias=False (torch types it as always there)
    return bias


def _rows(t: Tensor, sizes: tuple[int, int, int]) -> list[Tensor]:
    return list(t.split_with_sizes(list(sizes)))


def _linear(path: str, found: object) -> nn.Linear:
    if type(found) is not nn.Linear:
        kind = f"a {type(found).__module__}.{type(found).__qualname__}"
        raise AttentionError(f"cannot fuse {path}: it is {kind}, not a plain torch.nn.Linear (QKV fusion "
                             "concatenates the weights of plain linear layers)")
    assert isinstance(found, nn.Linear)
    if quantized_weight(found):
        raise AttentionError(f"cannot fuse {path}: its weight is quantized ({type(found.weight).__qualname__}, "
                             "torchao's, say), not a plain tensor; fuse before quantizing, or run unfused")
    hooked = hook_names(found)
    if hooked:
        raise AttentionError(f"cannot fuse {path}: hooks {', '.join(hooked)} are on it; remove them first")
    return found


def _parts(path: str, module: nn.Module, group: QKVGroup) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    """The group's three projections on ``module`` (checked to fuse), or ``None`` if it has none of them."""
    present = [name for name in group.projections if isinstance(getattr(module, name, None), nn.Module)]
    if not present:
        return None
    if len(present) != 3:
        absent = [name for name in group.projections if name not in present]
        raise AttentionError(f"cannot fuse {path}: it has {', '.join(present)} but not {', '.join(absent)}")
    if getattr(module, group.fused, None) is not None:
        raise AttentionError(f"cannot fuse {path}: it already has an attribute {group.fused!r}")
    q, k, v = (_linear(f"{path}.{name}", getattr(module, name)) for name in group.projections)
    first = q.weight
    for name, layer in zip(group.projections, (q, k, v)):
        w, b = layer.weight, _bias(layer)
        same = (w.shape[1] == first.shape[1] and w.dtype == first.dtype and w.device == first.device
                and w.requires_grad == first.requires_grad and (b is None) == (_bias(q) is None)
                and (b is None or (b.dtype == w.dtype and b.requires_grad == w.requires_grad)))
        if not same:
            raise AttentionError(f"cannot fuse {path}.{group.entry()}: {name} differs from {group.projections[0]} in "
                                 "input size, dtype, device, bias or requires_grad")
    return q, k, v


def _joined(layers: tuple[nn.Linear, ...]) -> nn.Linear:
    weight = torch.cat([layer.weight.detach() for layer in layers])
    biases = [b.detach() for layer in layers if (b := _bias(layer)) is not None]
    with torch.device("meta"):
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bool(biases))
    grad = layers[0].weight.requires_grad
    fused.weight = nn.Parameter(weight, requires_grad=grad)
    if biases:
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=grad)
    return fused


def _split(fused: nn.Linear, sizes: tuple[int, int, int]) -> list[nn.Linear]:
    """Three linears of the fused one's rows, each with storage of its own."""
    weights = _rows(fused.weight.detach(), sizes)
    bias = _bias(fused)
    biases: list[Tensor | None] = [None, None, None] if bias is None else [*_rows(bias.detach(), sizes)]
    grad = fused.weight.requires_grad
    layers: list[nn.Linear] = []
    for w, b in zip(weights, biases):
        with torch.device("meta"):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        layer.weight = nn.Parameter(w.clone(), requires_grad=grad)
        if b is not None:
            layer.bias = nn.Parameter(b.clone(), requires_grad=grad)
        layers.append(layer)
    return layers


def _state_dict_hook(module: nn.Module, state_dict: MutableMapping[str, Any], prefix: str, _: object) -> None:
    """Write the fused module's tensors under the unfused names, in the unfused order.

    The module's own entries are the last ones written when this runs; they are taken off the
    end and put back with each fused tensor split into (views of) its three parts.
    """
    state = FUSED.get(module)
    if state is None:
        return
    tail: list[str] = []
    for key in reversed(list(state_dict)):
        if not key.startswith(prefix):
            break
        tail.append(key)
    local = {key[len(prefix):]: state_dict.pop(key) for key in reversed(tail)}
    for group, sizes in zip(state.groups, state.sizes):
        for suffix in _SUFFIXES:
            fused = local.pop(f"{group.fused}.{suffix}", None)
            if fused is not None:
                for name, part in zip(group.projections, _rows(fused, sizes)):
                    local[f"{name}.{suffix}"] = part
    known = set(state.order)
    for key in [*(k for k in state.order if k in local), *(k for k in local if k not in known)]:
        state_dict[prefix + key] = local[key]


def _load_hook(module: nn.Module, state_dict: MutableMapping[str, Any], prefix: str, *_: object) -> None:
    """Concatenate a group's three unfused tensors into the fused one's key, when all three fit."""
    state = FUSED.get(module)
    if state is None:
        return
    for group, sizes in zip(state.groups, state.sizes):
        fused = getattr(module, group.fused)
        for suffix in _SUFFIXES:
            target: Tensor | None = getattr(fused, suffix)
            keys = [f"{prefix}{name}.{suffix}" for name in group.projections]
            parts = [state_dict.get(key) for key in keys]
            if target is None or not all(isinstance(part, Tensor) for part in parts):
                continue
            tensors = [part for part in parts if isinstance(part, Tensor)]
            shapes_fit = all(t.shape == (size, *target.shape[1:]) for t, size in zip(tensors, sizes))
            if shapes_fit:  # otherwise the keys stay, and load_state_dict names them
                for key in keys:
                    del state_dict[key]
                state_dict[f"{prefix}{group.fused}.{suffix}"] = torch.cat(tensors)


def _reorder(module: nn.Module, children: tuple[str, ...]) -> None:
    """Register ``module``'s children in the order ``children`` (later additions after them)."""
    current = dict(module.named_children())
    for name in [*(c for c in children if c in current), *(c for c in current if c not in children)]:
        delattr(module, name)
        setattr(module, name, current[name])


def fuse_qkv(model: SupportsAttention) -> None:
    """Run each declared group of query/key/value projections as one ``nn.Linear``.

    Outputs stay the same (within float rounding); ``state_dict()`` keeps the unfused layout.
    Refused with :class:`~diffcaps.errors.AttentionError`, before anything changes, while LoRA
    adapters are loaded, group offloading or layerwise casting is enabled, or a projection is
    not a plain ``nn.Linear`` with a plain weight (a packed or torchao one). A model whose attention row declares no
    fusion raises :class:`~diffcaps.errors.CapabilityError`. Fusing a fused model does nothing.
    """
    module, fusion = _fusion(model)
    if _MODEL.get(module) is not None:
        return
    _busy(module, "fuse")
    plan: list[tuple[nn.Module, list[tuple[QKVGroup, tuple[nn.Linear, nn.Linear, nn.Linear]]]]] = []
    for path, found in module.named_modules():
        if fusion.modules.matches(found):
            groups = [(group, parts) for group in fusion.groups
                      if (parts := _parts(path, found, group)) is not None]
            if groups:
                plan.append((found, groups))
    if not plan:
        raise CapabilityError(type(module).__name__, f"qkv_fusion (it declares {', '.join(fusion.entries())}, "
                                                     "but this instance has none of those projections)")
    handles: list[RemovableHandle] = []
    for found, groups in plan:
        order = tuple(found.state_dict(keep_vars=True))
        children = tuple(name for name, _ in found.named_children())
        sizes: list[tuple[int, int, int]] = []
        for group, parts in groups:
            joined = _joined(parts)
            q, k, v = (layer.out_features for layer in parts)
            sizes.append((q, k, v))
            for name in group.projections:
                delattr(found, name)
            setattr(found, group.fused, joined)
        FUSED.set(found, FusedGroups(tuple(group for group, _ in groups), tuple(sizes), order, children))
        # Both registration methods are untyped in torch.
        on_save: Callable[[Callable[..., None]], RemovableHandle] = found.register_state_dict_post_hook
        on_load: Callable[[Callable[..., None]], RemovableHandle] = found.register_load_state_dict_pre_hook
        handles += [on_save(_state_dict_hook), on_load(_load_hook)]
    _MODEL.set(module, _Fused(tuple(found for found, _ in plan), tuple(handles)))


def unfuse_qkv(model: SupportsAttention) -> None:
    """Split every fused projection back into its three ``nn.Linear``, bit for bit as they were.

    Refused (before anything changes) while group offloading or layerwise casting is enabled.
    Unfusing a model that is not fused does nothing.
    """
    module, _ = _fusion(model)
    record = _MODEL.get(module)
    if record is None:
        return
    _busy(module, "unfuse")
    for found in record.modules:
        state = FUSED.get(found)
        for group in () if state is None else state.groups:
            hooked = hook_names(getattr(found, group.fused))
            if hooked:
                raise AttentionError(f"cannot unfuse {type(found).__name__}.{group.fused}: hooks "
                                     f"{', '.join(hooked)} are on it; remove them first")
    for handle in record.handles:
        handle.remove()
    for found in record.modules:
        state = FUSED.clear(found)
        assert state is not None
        for group, sizes in zip(state.groups, state.sizes):
            fused = getattr(found, group.fused)
            assert isinstance(fused, nn.Linear)
            layers = _split(fused, sizes)
            delattr(found, group.fused)
            for name, layer in zip(group.projections, layers):
                setattr(found, name, layer)
        _reorder(found, state.children)
    _MODEL.clear(module)


def qkv_fused(model: SupportsAttention) -> bool:
    """Whether :func:`fuse_qkv` is in force on ``model``; never raises."""
    module = unwrap_compiled(model)
    return isinstance(module, nn.Module) and _MODEL.get(module) is not None

