"""What a model author declares for quantization, and the pieces quantized loaders build from.

``quantization: QuantizationSupport = capability(QuantizationSupport(keep=ModuleNames((...))))``
declares the schemes a model accepts (all of them by default) and the modules never quantized.
A loader that keeps weights packed replaces each quantized ``nn.Linear`` with a
:class:`PackedLinear` carrying a :class:`WeightCodec`. GGUF files are read with
:func:`read_gguf` (a :class:`GGUFFile`: tensor table, memory-mapped bytes) and a model built
on the meta device is filled from one with :func:`fill_from_gguf` (``weights.load_single_file``,
``inspect`` and ``convert`` do this for every model with a weight mapping). ComfyUI's
scaled-fp8 safetensors files are read with :func:`scaled_fp8_keys` and
:func:`fill_scaled_fp8` (fp8 bytes kept in a :class:`PackedLinear` whose :class:`ScaledFP8`
codec holds the scale) and written back with :func:`scaled_fp8_export`. :func:`quantized_weight`
tells whether a layer's weight is quantized (packed or torchao), for features that must refuse it.
"""

from diffcaps.quantization._gguf_file import (
    GGUFFile as GGUFFile,
    GGUFTensorInfo as GGUFTensorInfo,
    is_gguf as is_gguf,
    read_gguf as read_gguf,
)
from diffcaps.quantization._gguf_load import (
    check_gguf_types as check_gguf_types,
    fill_from_gguf as fill_from_gguf,
    row_wise as row_wise,
)
from diffcaps.quantization._packed import (
    PackedLinear as PackedLinear,
    WeightCodec as WeightCodec,
    packed_linears as packed_linears,
    quantized_weight as quantized_weight,
)
from diffcaps.quantization._scaled_fp8 import (
    ScaledFP8 as ScaledFP8,
    ScaledFP8Keys as ScaledFP8Keys,
    fill_scaled_fp8 as fill_scaled_fp8,
    scaled_fp8_export as scaled_fp8_export,
    scaled_fp8_keys as scaled_fp8_keys,
)
from diffcaps.quantization._service import QuantizationSupport as QuantizationSupport

__all__ = [
    "GGUFFile",
    "GGUFTensorInfo",
    "PackedLinear",
    "QuantizationSupport",
    "ScaledFP8",
    "ScaledFP8Keys",
    "WeightCodec",
    "check_gguf_types",
    "fill_from_gguf",
    "fill_scaled_fp8",
    "is_gguf",
    "packed_linears",
    "quantized_weight",
    "read_gguf",
    "row_wise",
    "scaled_fp8_export",
    "scaled_fp8_keys",
]
