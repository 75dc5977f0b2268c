"""What quantization a model instance holds."""

from __future__ import annotations

from collections import Counter

from diffcaps.protocols import SupportsQuantization, require
from diffcaps.quantization._packed import packed_linears

__all__ = ["active"]


def active(model: SupportsQuantization) -> dict[str, int]:
    """Packed type name → number of layers holding it (``{}`` when nothing is quantized)."""
    module, _ = require(model, "quantization")
    return dict(Counter(layer.codec.name for _, layer in packed_linears(module)))
