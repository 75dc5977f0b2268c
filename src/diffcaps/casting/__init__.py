"""Layerwise casting: store weights low (fp8, bf16), compute in full precision, layer by layer."""

from diffcaps.casting._functions import (
    CASTABLE_LAYERS as CASTABLE_LAYERS,
    GENERIC_SKIP_PATTERNS as GENERIC_SKIP_PATTERNS,
    cast_layers as cast_layers,
    disable_layerwise_casting as disable_layerwise_casting,
    enable_layerwise_casting as enable_layerwise_casting,
)
from diffcaps.casting._service import LayerwiseCasting as LayerwiseCasting

__all__ = [
    "CASTABLE_LAYERS",
    "GENERIC_SKIP_PATTERNS",
    "LayerwiseCasting",
    "cast_layers",
    "disable_layerwise_casting",
    "enable_layerwise_casting",
]
