"""Linear layers whose weight stays packed in memory and is decoded per forward call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional

__all__ = ["PackedLinear", "WeightCodec", "packed_linears", "quantized_weight"]


class WeightCodec(Protocol):
    """How one packed weight is decoded: a GGUF tensor type, scaled fp8, …"""

    @property
    def name(self) -> str:
        """The packed type's name as its file format spells it (``Q4_K``, ``scaled_fp8``, …)."""
        ...

    def decode(self, packed: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """The weight of ``shape`` in ``dtype`` decoded from the raw bytes ``packed`` (uint8)."""
        ...


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose ``weight`` holds packed bytes (uint8) decoded at every forward.

    The weight never leaves its packed form in memory: ``codec.decode`` builds the dense weight
    in ``compute_dtype`` for one call and drops it after. Because the packed bytes are uint8,
    ``model.to(dtype)`` leaves them alone and peft builds adapters in ``compute_dtype`` (peft
    reads a base layer's ``compute_dtype``), so LoRA adapters run over the decoded weight.
    """

    def __init__(self, packed: Tensor, shape: torch.Size, codec: WeightCodec, *,
                 bias: Tensor | None, compute_dtype: torch.dtype) -> None:
        if packed.dtype != torch.uint8:
            raise TypeError(f"packed weights are uint8 bytes, got {packed.dtype}")
        if len(shape) != 2:
            raise ValueError(f"a linear weight is 2-D, got shape {tuple(shape)}")
        nn.Module.__init__(self)
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.weight_shape = torch.Size(shape)
        self.codec = codec
        self.compute_dtype = compute_dtype

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The decoded weight in ``dtype`` (default: ``compute_dtype``)."""
        return self.codec.decode(self.weight, self.weight_shape, dtype or self.compute_dtype)

    def forward(self, input: Tensor) -> Tensor:
        """``input @ W.T + b`` in ``compute_dtype`` with ``W`` decoded for this call; returns ``input``'s dtype."""
        stored: Tensor | None = self._parameters["bias"]
        bias = None if stored is None else stored.to(self.compute_dtype)
        output = functional.linear(input.to(self.compute_dtype), self.dense_weight(), bias)
        return output.to(input.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self._parameters['bias'] is not None}, packed={self.codec.name}, compute_dtype={self.compute_dtype}")


def packed_linears(model: nn.Module) -> Iterator[tuple[str, PackedLinear]]:
    """(qualified name, layer) for every packed linear layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            yield name, module


def quantized_weight(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight is quantized: packed bytes (a :class:`PackedLinear`) or a tensor subclass (torchao's).

    Features that rewrite a weight's values or storage (QKV fusion, LoRA fuse, layerwise casting)
    refuse such a layer; a peft layer answers for its base layer.
    """
    if isinstance(layer, PackedLinear):
        return True
    weight: object = getattr(layer, "weight", None)
    return isinstance(weight, Tensor) and type(weight) not in (Tensor, nn.Parameter)
