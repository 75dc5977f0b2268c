"""The quantization service: the schemes a model accepts and the modules it keeps unquantized."""

from __future__ import annotations

from typing import Final, Literal, final, get_args

import attrs
from torch import nn

from diffcaps import checks
from diffcaps.services import ModuleNames

__all__ = ["SCHEMES", "QuantizationSupport", "Scheme"]

Scheme = Literal["gguf", "scaled_fp8", "torchao"]
"""``gguf``: GGUF files, packed per tensor type; ``scaled_fp8``: ComfyUI's fp8 weights with a
per-layer scale; ``torchao``: torchao's weight quantization applied on load or after."""

SCHEMES: Final[tuple[Scheme, ...]] = get_args(Scheme)


def _schemes(value: object) -> tuple[Scheme, ...]:
    return checks.choices(value, SCHEMES, "quantization schemes", ValueError)


@final
@attrs.frozen(kw_only=True)
class QuantizationSupport:
    """Declares the quantization schemes a model accepts and the modules diffcaps never quantizes.

    ``keep`` names modules by one component of their dotted path (as ``keep_in_fp32`` does):
    ``quantization.enable`` (torchao) leaves them in the compute dtype and quantizes only the
    ``nn.Linear`` layers outside them. A quantized file (GGUF, scaled fp8) is held as the file
    packs it, kept modules included: decoding a weight the file already quantized would change
    none of its values, only the memory it takes. A scheme missing from ``schemes`` is decoded
    on load.
    """

    keep: ModuleNames
    schemes: tuple[Scheme, ...] = attrs.field(default=SCHEMES, converter=_schemes)

    def packable(self, model: nn.Module, key: str, scheme: Scheme) -> str | None:
        """The layer whose weight ``key`` names, when a file in ``scheme`` may keep it packed there.

        That is the weight of a plain ``nn.Linear`` in a model that accepts ``scheme``; else ``None``.
        """
        owner, _, name = key.rpartition(".")
        if scheme not in self.schemes or name != "weight":
            return None
        return owner if type(model.get_submodule(owner)) is nn.Linear else None

    def entries(self) -> tuple[str, ...]:
        """The schemes, then the kept modules."""
        return (*self.schemes, *(f"keep:{name}" for name in self.keep.entries()))
