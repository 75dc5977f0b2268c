"""Quantized file formats, for the loaders in :mod:`diffcaps.weights` (``load_single_file``,
``save_single_file``, ``inspect``, ``convert``), which use them for every model with a weight
mapping.

GGUF files are read with :func:`read_gguf` (a :class:`GGUFFile`: tensor table, memory-mapped
bytes; :func:`is_gguf` tells one by name or magic), checked with :func:`check_gguf_types`, and
a model built on the meta device is filled from one with :func:`fill_from_gguf` (transforms
that only move rows, :func:`row_wise`, run on packed rows). ComfyUI's scaled-fp8 safetensors
files are read with :func:`scaled_fp8_keys` and :func:`fill_scaled_fp8` (fp8 bytes kept in a
``PackedLinear`` whose :class:`ScaledFP8` codec holds the scale) and written back with
:func:`scaled_fp8_export`.
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
from diffcaps.quantization._scaled_fp8 import (
    ScaledFP8 as ScaledFP8,
    ScaledFP8Keys as ScaledFP8Keys,
    fill_scaled_fp8 as fill_scaled_fp8,
    scaled_fp8_export as scaled_fp8_export,
    scaled_fp8_keys as scaled_fp8_keys,
)

__all__ = [
    "GGUFFile",
    "GGUFTensorInfo",
    "ScaledFP8",
    "ScaledFP8Keys",
    "check_gguf_types",
    "fill_from_gguf",
    "fill_scaled_fp8",
    "is_gguf",
    "read_gguf",
    "row_wise",
    "scaled_fp8_export",
    "scaled_fp8_keys",
]
