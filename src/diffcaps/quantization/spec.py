"""What a model author declares for quantization, and the packed layer quantized loaders build.

``quantization: QuantizationSupport = capability(QuantizationSupport(keep=ModuleNames((...))))``
declares the schemes a model accepts (all of them by default) and the modules diffcaps never
quantizes itself. A loader that keeps weights packed replaces each quantized ``nn.Linear``
with a :class:`PackedLinear` carrying a :class:`WeightCodec`; :func:`packed_linears` lists
them, and :func:`quantized_weight` tells whether a layer's weight is quantized (packed or
torchao), for features that must refuse it. The quantized file formats themselves (GGUF,
ComfyUI scaled fp8) are read and written by :mod:`diffcaps.quantization.files`.
"""

from diffcaps.quantization._packed import (
    PackedLinear as PackedLinear,
    WeightCodec as WeightCodec,
    packed_linears as packed_linears,
    quantized_weight as quantized_weight,
)
from diffcaps.quantization._service import QuantizationSupport as QuantizationSupport

__all__ = ["PackedLinear", "QuantizationSupport", "WeightCodec", "packed_linears", "quantized_weight"]
