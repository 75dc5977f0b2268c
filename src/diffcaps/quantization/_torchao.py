"""torchao weight quantization applied to a model's linear layers, skipping what the model keeps.

torchao is an optional extra: it is imported on first use, and its absence is a
``QuantizationError`` that says what to install. ``quantize_`` replaces each chosen layer's
weight by a torchao tensor subclass (``Int8Tensor``, ``Float8Tensor``, …) in place; the
original weights are dropped, so the change is one-way (torchao offers no exact inverse).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, final

import attrs
from torch import Tensor, nn

from diffcaps.errors import QuantizationError
from diffcaps.quantization._packed import PackedLinear
from diffcaps.quantization._service import QuantizationSupport
from diffcaps.slots import InstanceSlot

if TYPE_CHECKING:
    from torchao.core.config import AOBaseConfig

__all__ = ["TORCHAO_STATE", "TorchaoState", "apply_torchao", "torchao_module", "torchao_targets"]

INSTALL = 'pip install "diffcaps[torchao]"'


@final
@attrs.frozen(kw_only=True)
class TorchaoState:
    """The torchao config a model was quantized with, and the layers it quantized."""

    config: AOBaseConfig
    layers: tuple[str, ...]


TORCHAO_STATE: InstanceSlot[TorchaoState] = InstanceSlot("torchao", TorchaoState)


def torchao_module(name: str = "torchao.quantization") -> ModuleType:
    """torchao's module ``name``, or a ``QuantizationError`` saying how to install torchao."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise QuantizationError(f"torchao quantization needs the torchao package ({exc}); {INSTALL}") from None


def _quantizable(name: str, layer: nn.Module, keep: QuantizationSupport) -> bool:
    return (isinstance(layer, nn.Linear) and not isinstance(layer, PackedLinear)
            and not keep.keep.matches(name) and type(layer.weight) in (Tensor, nn.Parameter))


def torchao_targets(module: nn.Module, service: QuantizationSupport) -> tuple[str, ...]:
    """The linear layers torchao may quantize: plain ``nn.Linear`` outside the kept modules."""
    return tuple(name for name, layer in module.named_modules() if _quantizable(name, layer, service))


def apply_torchao(module: nn.Module, config: AOBaseConfig, targets: tuple[str, ...],
                  quantize: Callable[..., None]) -> None:
    """Run torchao's ``quantize`` on exactly ``targets``; on failure put every weight back and raise.

    The original weights are held until ``quantize`` returns, so a config that cannot run here
    (a kernel the device lacks, say) leaves the model as it was.
    """
    chosen = frozenset(targets)
    originals = {name: module.get_submodule(name).weight for name in targets}
    try:
        quantize(module, config, filter_fn=lambda _, fqn: fqn in chosen)
    except Exception as exc:
        for name, weight in originals.items():
            module.get_submodule(name).weight = weight
        raise QuantizationError(f"torchao could not apply {type(config).__name__} here: {exc}") from exc
