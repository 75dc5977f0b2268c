"""What a model author declares for quantization, and the packed layers and codecs loaders build.

``quantization: QuantizationSupport = capability(QuantizationSupport(keep=ModuleNames((...))))``
declares the schemes a model accepts (all of them by default) and the modules diffcaps never
quantizes itself. A loader that keeps weights packed replaces each quantized ``nn.Linear``
with a :class:`PackedLinear` carrying a :class:`WeightCodec` — a GGUF tensor type
(:func:`gguf_codec`, :data:`GGUF_TYPES`) or :class:`ScaledFP8`; :func:`packed_linears` lists
them, and :func:`quantized_weight` tells whether a layer's weight is quantized (packed or
torchao), for features that must refuse it. The quantized file formats themselves (GGUF,
ComfyUI scaled fp8) are read and written by :mod:`diffcaps.weights`, like every checkpoint.
"""

from diffcaps.quantization._gguf_types import GGUF_TYPES as GGUF_TYPES, GGUFType as GGUFType, gguf_codec as gguf_codec
from diffcaps.quantization._packed import (
    PackedLinear as PackedLinear,
    WeightCodec as WeightCodec,
    packed_linears as packed_linears,
    quantized_weight as quantized_weight,
)
from diffcaps.quantization._scaled_fp8 import SCALED_FP8 as SCALED_FP8, ScaledFP8 as ScaledFP8
from diffcaps.quantization._service import QuantizationSupport as QuantizationSupport

__all__ = [
    "GGUFType",
    "GGUF_TYPES",
    "PackedLinear",
    "QuantizationSupport",
    "SCALED_FP8",
    "ScaledFP8",
    "WeightCodec",
    "gguf_codec",
    "packed_linears",
    "quantized_weight",
]
