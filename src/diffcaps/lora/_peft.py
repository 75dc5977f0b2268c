"""The one place diffcaps talks to peft: building configs, injecting layers, reading their updates.

peft is imported here, on first use. Its layers are reached through :class:`PeftLayer`,
the few members diffcaps relies on, so the rest of the package stays typed.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any, Protocol, cast

import attrs
import torch
from torch import Tensor, nn

from diffcaps.errors import LoRAError
from diffcaps.lora._adapters import LoHaWeights, LoKrWeights, LoRAWeights, TargetWeights

__all__ = [
    "PeftLayer",
    "adapter_config",
    "adapters_of",
    "base_linear",
    "delta",
    "inject",
    "is_peft_layer",
    "kind_of",
    "layer_at",
    "pad_lora",
    "rank_error",
    "set_weight",
    "unit_scale",
    "unwrap",
    "weights_of",
]


class PeftLayer(Protocol):
    """The members of a peft tuner layer that diffcaps uses."""

    base_layer: nn.Module
    merged_adapters: list[str]
    scaling: dict[str, Any]
    r: dict[str, int]

    def set_adapter(self, adapter_names: str | list[str]) -> None: ...
    def delete_adapter(self, adapter_name: str) -> None: ...
    def enable_adapters(self, enabled: bool) -> None: ...


def layer_at(model: nn.Module, path: str) -> PeftLayer:
    """The peft layer at ``path``."""
    module = model.get_submodule(path)
    if not (hasattr(module, "base_layer") and hasattr(module, "merged_adapters")):
        raise LoRAError(f"{path} carries no peft layer")
    return cast(PeftLayer, module)


def is_peft_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft tuner layer."""
    return hasattr(module, "base_layer") and hasattr(module, "merged_adapters")


def base_linear(module: nn.Module) -> nn.Module:
    """The module itself, or the base layer a peft layer wraps."""
    while is_peft_layer(module):
        module = cast(PeftLayer, module).base_layer
    return module


def kind_of(layer: PeftLayer) -> str:
    """``lora``, ``lokr`` or ``loha``."""
    if hasattr(layer, "lora_A"):
        return "lora"
    if hasattr(layer, "lokr_w1"):
        return "lokr"
    return "loha"


def _patterns(values: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {"^" + re.escape(path): v for path, v in values.items() if v != common}


def pad_lora(w: LoRAWeights, rank: int) -> LoRAWeights:
    """The same update at a higher rank (zero rows in down, zero columns in up)."""
    if rank == w.rank:
        return w
    down = torch.zeros(rank, w.down.shape[1], dtype=w.down.dtype)
    up = torch.zeros(w.up.shape[0], rank, dtype=w.up.dtype)
    down[: w.rank] = w.down
    up[:, : w.rank] = w.up
    return LoRAWeights(down=down, up=up, scale=w.scale, bias=w.bias)


def rank_error(path: str, rank: int, limit: int) -> LoRAError:
    """The error for an adapter whose rank exceeds the rank hotswapping padded to."""
    return LoRAError(f"{path}: rank {rank} exceeds the hotswap rank {limit}; call "
                     "lora.enable_hotswap(model, max_rank=...) with a larger rank before the first load")


def adapter_config(kind: str, targets: Mapping[str, TargetWeights]) -> dict[str, Any]:
    """The peft config fields of an adapter on these modules (``kind``: lora, lokr or loha).

    The most common rank and alpha are the defaults, the others go to ``rank_pattern`` /
    ``alpha_pattern`` by exact path; ``target_modules`` is a regex of exact paths (a list
    would let peft match ``proj_out`` by suffix). diffusers writes the same fields, prefixed,
    in a file's ``lora_adapter_metadata`` header entry.
    """
    r, rank_pattern = _patterns({path: float(w.rank) for path, w in targets.items()})
    alpha, alpha_pattern = _patterns({path: w.scale * w.rank for path, w in targets.items()})
    fields: dict[str, Any] = {
        "r": int(r),
        "lora_alpha" if kind == "lora" else "alpha": alpha,
        "rank_pattern": {k: int(v) for k, v in rank_pattern.items()},
        "alpha_pattern": alpha_pattern,
        "target_modules": "^(?:" + "|".join(re.escape(path) for path in sorted(targets)) + ")$",
    }
    if kind == "lora":
        fields["lora_bias"] = any(isinstance(w, LoRAWeights) and w.bias is not None for w in targets.values())
    return fields


def _config(kind: str, targets: Mapping[str, TargetWeights]) -> Any:
    import peft

    fields = adapter_config(kind, targets)
    if kind == "lora":
        return peft.LoraConfig(init_lora_weights=False, **fields)
    if kind == "lokr":
        return peft.LoKrConfig(init_weights=False, **fields)
    return peft.LoHaConfig(init_weights=False, **fields)


@attrs.frozen
class _Place:
    device: torch.device
    dtype: torch.dtype


def _placed(tensor: Tensor, like: _Place, seen: set[int]) -> Tensor:
    out = tensor.to(device=like.device, dtype=like.dtype)
    if id(out) in seen or not out.is_contiguous():
        out = out.contiguous() if not out.is_contiguous() else out.clone()
    seen.add(id(out))
    return out


def inject(model: nn.Module, name: str, targets: Mapping[str, TargetWeights]) -> None:
    """Add adapter ``name`` to ``model`` as peft layers holding these weights.

    ``peft.inject_adapter_in_model`` creates the layers on the meta device (no random init);
    each then takes the file's tensors, cast to its base layer's dtype and device. peft computes
    each module's scale as ``alpha / r`` from the per-module ``rank_pattern``/``alpha_pattern``.
    """
    import peft

    kinds = {w.kind for w in targets.values()}
    if len(kinds) != 1:
        raise LoRAError(f"adapter {name!r} mixes {sorted(kinds)} updates; peft holds one kind per adapter")
    kind = kinds.pop()
    weights = {path: _weight_of(model, path) for path in targets}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(_config(kind, targets), model, adapter_name=name, low_cpu_mem_usage=True)
    seen: set[int] = set()
    for path, w in targets.items():
        layer: Any = model.get_submodule(path)
        if isinstance(w, LoRAWeights):
            _assign_lora(layer, name, w, weights[path], seen)
        else:
            _assign_lycoris(layer, name, w, weights[path], seen)


def _assign_lora(layer: Any, name: str, w: LoRAWeights, like: _Place, seen: set[int]) -> None:
    # peft made the layers on the meta device; they take the file's tensors as they are
    # (what set_peft_model_state_dict(..., low_cpu_mem_usage=True) does, without its model-wide walk)
    down, up = layer.lora_A[name], layer.lora_B[name]
    down.weight = nn.Parameter(_placed(w.down, like, seen), requires_grad=False)
    up.weight = nn.Parameter(_placed(w.up, like, seen), requires_grad=False)
    if up.bias is not None:
        bias = w.bias if w.bias is not None else torch.zeros(w.up.shape[0])
        up.bias = nn.Parameter(_placed(bias, like, seen), requires_grad=False)


def _weight_of(model: nn.Module, path: str) -> _Place:
    # adapters live where the base weight lives, in the dtype the layer computes in: a base layer
    # stored low declares it as ``compute_dtype`` (peft's convention, which layerwise casting follows)
    base = base_linear(model.get_submodule(path))
    weight = base.weight
    assert isinstance(weight, Tensor)
    compute: object = base.__dict__.get("compute_dtype", weight.dtype)
    dtype = compute if isinstance(compute, torch.dtype) and compute.is_floating_point else weight.dtype
    return _Place(device=weight.device, dtype=dtype)


def _assign_lycoris(layer: Any, name: str, w: TargetWeights, like: _Place, seen: set[int]) -> None:
    if isinstance(w, LoKrWeights):
        factors: dict[str, Tensor] = {}
        for label, factor in (("lokr_w1", w.w1), ("lokr_w2", w.w2)):
            if isinstance(factor, tuple):
                factors[f"{label}_a"], factors[f"{label}_b"] = factor
            else:
                factors[label] = factor
    else:
        assert isinstance(w, LoHaWeights)
        factors = {"hada_w1_a": w.w1_a, "hada_w1_b": w.w1_b, "hada_w2_a": w.w2_a, "hada_w2_b": w.w2_b}
    for container in layer.adapter_layer_names:
        table = getattr(layer, container)
        if name in table:
            del table[name]
    for label, tensor in factors.items():
        getattr(layer, label)[name] = nn.Parameter(_placed(tensor, like, seen), requires_grad=False)


def unwrap(model: nn.Module, path: str) -> None:
    """Put the base layer back in place of the peft layer at ``path``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, child, base_linear(parent.get_submodule(child)))


def _scaling(layer: Any, name: str) -> float:
    value = layer.scaling[name]
    return float(value.item()) if isinstance(value, Tensor) else float(value)


class Update(Protocol):
    """An adapter's update of one layer, added into row blocks of an fp32 weight copy."""

    def add_rows(self, out: Tensor, start: int, factor: float) -> None: ...


@attrs.frozen
class _LowRank:
    up: Tensor
    down: Tensor
    scale: float

    def add_rows(self, out: Tensor, start: int, factor: float) -> None:
        # one BLAS call per block: out += factor · scale · up[rows] @ down, never materialising the delta
        out.addmm_(self.up[start:start + out.shape[0]].float(), self.down, alpha=factor * self.scale)


@attrs.frozen
class _Dense:
    delta: Tensor

    def add_rows(self, out: Tensor, start: int, factor: float) -> None:
        out.add_(self.delta[start:start + out.shape[0]], alpha=factor)


def delta(layer: PeftLayer, name: str) -> tuple[Update, Tensor | None]:
    """Adapter ``name``'s update of the layer's weight (and bias, fp32) at its current scale."""
    any_layer: Any = layer
    s = _scaling(layer, name)
    kind = kind_of(layer)
    if kind == "lora":
        b_module = any_layer.lora_B[name]
        bias = b_module.bias.float() * s if getattr(b_module, "bias", None) is not None else None
        return _LowRank(up=b_module.weight, down=any_layer.lora_A[name].weight.float(), scale=s), bias
    if kind == "lokr":
        w1 = _factor(any_layer, "lokr_w1", name)
        w2 = _factor(any_layer, "lokr_w2", name)
        return _Dense(s * torch.kron(w1, w2)), None
    w1 = any_layer.hada_w1_a[name].float() @ any_layer.hada_w1_b[name].float()
    w2 = any_layer.hada_w2_a[name].float() @ any_layer.hada_w2_b[name].float()
    return _Dense(s * (w1 * w2)), None


def _factor(layer: Any, label: str, name: str) -> Tensor:
    if name in getattr(layer, label):
        factor: Tensor = getattr(layer, label)[name].float()
        return factor
    product: Tensor = getattr(layer, f"{label}_a")[name].float() @ getattr(layer, f"{label}_b")[name].float()
    return product


def unit_scale(layer: PeftLayer, name: str) -> float:
    """The layer's scale for ``name`` at adapter weight 1 (``alpha / r``)."""
    any_layer: Any = layer
    alpha = any_layer.lora_alpha[name] if hasattr(any_layer, "lora_alpha") else any_layer.alpha[name]
    return float(alpha) / float(layer.r[name])


def set_weight(layer: PeftLayer, name: str, weight: float) -> None:
    """Set adapter ``name``'s scale on this layer to ``weight · alpha / r`` (in place if it is a tensor)."""
    value = weight * unit_scale(layer, name)
    current = layer.scaling.get(name)
    if isinstance(current, Tensor):
        current.fill_(value)
    else:
        layer.scaling[name] = value


def adapters_of(layer: PeftLayer) -> set[str]:
    """The adapter names this layer holds."""
    any_layer: Any = layer
    names: set[str] = set()
    for container in any_layer.adapter_layer_names:
        names.update(getattr(any_layer, container).keys())
    return names


def weights_of(layer: PeftLayer, name: str, rank: int) -> TargetWeights:
    """Adapter ``name`` of a peft layer in canonical form, at weight 1 and its loaded rank."""
    any_layer: Any = layer
    scale = unit_scale(layer, name)
    kind = kind_of(layer)
    if kind == "lora":
        b = any_layer.lora_B[name]
        return LoRAWeights(down=any_layer.lora_A[name].weight.detach()[:rank],
                           up=b.weight.detach()[:, :rank], scale=scale,
                           bias=b.bias.detach() if b.bias is not None else None)
    if kind == "lokr":
        factors = [_lokr_factor(any_layer, label, name) for label in ("lokr_w1", "lokr_w2")]
        return LoKrWeights(w1=factors[0], w2=factors[1], scale=scale)
    return LoHaWeights(w1_a=any_layer.hada_w1_a[name].detach(), w1_b=any_layer.hada_w1_b[name].detach(),
                       w2_a=any_layer.hada_w2_a[name].detach(), w2_b=any_layer.hada_w2_b[name].detach(),
                       scale=scale)


def _lokr_factor(layer: Any, label: str, name: str) -> Tensor | tuple[Tensor, Tensor]:
    if name in getattr(layer, label):
        full: Tensor = getattr(layer, label)[name].detach()
        return full
    return getattr(layer, f"{label}_a")[name].detach(), getattr(layer, f"{label}_b")[name].detach()
