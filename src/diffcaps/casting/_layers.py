"""Which layers layerwise casting acts on: castable layer types outside every skipped subtree."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Final

from torch import nn

__all__ = ["CASTABLE_LAYERS", "GENERIC_SKIP_PATTERNS", "cast_layers"]

CASTABLE_LAYERS: Final = (
    nn.Linear,
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding,
)
"""The only layer types whose weights are stored low (norms and the like stay as they are)."""

GENERIC_SKIP_PATTERNS: Final = ("patch_embed", "^proj_in$", "^proj_out$")
"""Skipped for every model in addition to the model's own patterns (input and output projections)."""

_ADAPTER_LAYER_PATTERN: Final = r"(^|\.)(lora_[A-Za-z_]+|hada_[a-z0-9_]+|lokr_[a-z0-9_]+|oft_[a-z_]+)(\.|$)"


def _skipped(name: str, patterns: Sequence[str]) -> bool:
    return re.search(_ADAPTER_LAYER_PATTERN, name) is not None or any(re.search(p, name) for p in patterns)


def cast_layers(model: nn.Module, skip_patterns: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """The layers layerwise casting acts on: castable types, outside every skipped subtree."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if prefix and _skipped(prefix, skip_patterns):
            return
        if isinstance(module, CASTABLE_LAYERS):
            yield prefix, module
            return
        for child_name, child in module.named_children():
            yield from walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    yield from walk(model, "")
