"""What a model author declares for quantization, and the packed layer quantized loaders build.

``quantization: QuantizationSupport = capability(QuantizationSupport(keep=ModuleNames((...))))``
declares the schemes a model accepts (all of them by default) and the modules never quantized.
A loader that keeps weights packed replaces each quantized ``nn.Linear`` with a
:class:`PackedLinear` carrying a :class:`WeightCodec`.
"""

from diffcaps.quantization._packed import (
    PackedLinear as PackedLinear,
    WeightCodec as WeightCodec,
    packed_linears as packed_linears,
)
from diffcaps.quantization._service import QuantizationSupport as QuantizationSupport

__all__ = ["PackedLinear", "QuantizationSupport", "WeightCodec", "packed_linears"]
