"""``enable``, ``active`` and ``disable``: torchao on a loaded model, and what quantization a model holds."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, final

import attrs
from torch import Tensor, nn

from diffcaps.errors import QuantizationError
from diffcaps.protocols import SupportsQuantization, require
from diffcaps.quantization._packed import PackedLinear, packed_linears
from diffcaps.quantization._torchao import TORCHAO_STATE, TorchaoState, apply_torchao, torchao_module, torchao_targets
from diffcaps.slots import holding

if TYPE_CHECKING:
    from torchao.core.config import AOBaseConfig

__all__ = ["QuantizationReport", "active", "disable", "enable"]


def _counts(value: Mapping[str, int]) -> dict[str, int]:
    return dict(value)


@final
@attrs.frozen(kw_only=True)
class QuantizationReport:
    """What quantization a model holds: packed layers by type, and the torchao config in force."""

    packed: Mapping[str, int] = attrs.field(factory=dict, converter=_counts)
    """Packed type name (``Q4_K``, ``scaled_fp8``, …) → number of layers holding it."""
    torchao: AOBaseConfig | None = None
    """The config ``enable`` applied, or ``None``."""
    torchao_layers: tuple[str, ...] = ()
    """The layers torchao quantized."""


def active(model: SupportsQuantization) -> QuantizationReport | None:
    """What quantization ``model`` holds, or ``None`` when none of its weights is quantized."""
    module, _ = require(model, "quantization")
    packed = Counter(layer.codec.name for _, layer in packed_linears(module))
    state = TORCHAO_STATE.get(module)
    if not packed and state is None:
        return None
    return QuantizationReport(packed=packed, torchao=None if state is None else state.config,
                              torchao_layers=() if state is None else state.layers)


def enable(model: SupportsQuantization, config: AOBaseConfig) -> None:
    """Quantize the model's linear layers in place with a torchao config (``Int8WeightOnlyConfig()``, …).

    Only plain ``nn.Linear`` layers outside the modules the model keeps (its ``quantization``
    row) are quantized; packed layers from a GGUF or scaled-fp8 file are left as they are.
    The change is one-way (see :func:`disable`). A config torchao cannot run on this device
    is a ``QuantizationError`` and leaves the model as it was; so is a missing torchao. Refused
    (before anything changes) while LoRA adapters are loaded (load them after ``enable``: they
    run over the torchao weights), while QKV projections are fused or layerwise casting is on;
    group offloading may be on.
    """
    module, service = require(model, "quantization")
    if "torchao" not in service.schemes:
        raise QuantizationError(f"{type(model).__name__} does not accept torchao quantization "
                                f"(its quantization row declares {', '.join(service.schemes)})")
    quantization = torchao_module()
    base = torchao_module("torchao.core.config").AOBaseConfig
    if not isinstance(config, base):
        raise QuantizationError(f"config must be a torchao config (an AOBaseConfig), got {config!r} "
                                f"({type(config).__name__})")
    if TORCHAO_STATE.get(module) is not None:
        raise QuantizationError(f"{type(model).__name__} is already quantized by torchao "
                                f"({type(config).__name__} cannot be applied on top); load the model again")
    _refuse_busy(module, "quantize with torchao", casting=True, fused=True)
    targets = torchao_targets(module, service)
    if not targets:
        raise QuantizationError(f"{type(model).__name__} has no linear layer torchao may quantize "
                                "(all are kept or already packed)")
    apply_torchao(module, config, targets, quantization.quantize_)
    TORCHAO_STATE.set(module, TorchaoState(config=config, layers=targets))


def disable(model: SupportsQuantization) -> None:
    """Turn packed layers (GGUF, scaled fp8) back into plain ``nn.Linear`` layers in their compute dtype.

    The outputs do not change (a packed layer computes with exactly that decoded weight); memory
    grows to the dense size, and ``requires_grad`` stays as the packed layer had it (off). Every
    layer is decoded before any is swapped. Refused with a ``QuantizationError``, before anything
    changes, while LoRA adapters are loaded, group offloading or layerwise casting is on (each holds
    the packed layers); torchao quantization is one-way: torchao keeps no original weights, so a
    model it quantized is refused too (load the model again instead).
    """
    module, _ = require(model, "quantization")
    state = TORCHAO_STATE.get(module)
    if state is not None:
        raise QuantizationError(f"torchao quantization ({type(state.config).__name__}) is one-way: the original "
                                "weights are gone; load the model again for unquantized weights")
    _refuse_busy(module, "decode packed layers", offloading=True, casting=True)
    dense = [(name, _dense(layer)) for name, layer in packed_linears(module)]
    for name, layer in dense:
        module.set_submodule(name, layer)


def _refuse_busy(module: nn.Module, doing: str, *, offloading: bool = False, casting: bool = False,
                 fused: bool = False) -> None:
    """Refuse while LoRA adapters, and the features named, hold or hook the layers about to change."""
    adapters = holding(module, "lora")
    if adapters:
        raise QuantizationError(f"cannot {doing} while {adapters} are loaded (their layers wrap the linear "
                                "layers); unload them first (diffcaps.lora.unload)")
    if offloading and holding(module, "group_offloading") is not None:
        raise QuantizationError(f"cannot {doing} while group offloading is enabled (its groups hold the "
                                "layers' tensors); call diffcaps.offload.disable(model) first")
    if casting and holding(module, "layerwise_casting") is not None:
        raise QuantizationError(f"cannot {doing} while layerwise casting is enabled (its hooks hold the "
                                "layers' weights); call diffcaps.casting.disable(model) first")
    if fused and holding(module, "qkv_fusion") is not None:
        raise QuantizationError(f"cannot {doing} while QKV projections are fused; call "
                                "diffcaps.attention.unfuse_qkv(model) first (a torchao model runs unfused: "
                                "fuse_qkv refuses quantized projections)")


def _dense(layer: PackedLinear) -> nn.Linear:
    weight = layer.dense_weight()
    grad = layer.weight.requires_grad
    bias: Tensor | None = dict(layer.named_parameters(recurse=False)).get("bias")
    dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=grad)
    if bias is not None:
        dense.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=bias.requires_grad)
    return dense
