"""The codec of ComfyUI's scaled-fp8 layers: fp8 bytes times a per-layer scale, decoded per call.

A :class:`ScaledFP8` codec carries one layer's ``scale_weight`` (the weight is ``fp8 · scale``)
and its ``scale_input`` (the input scale an fp8 matmul uses on GPU; kept so a saved file has it
back, no part of a decode in the compute dtype). The file format itself (marker, scale keys,
loading and writing) is :mod:`diffcaps.weights`' business.
"""

from __future__ import annotations

from typing import Final, final

import attrs
import torch
from torch import Tensor

__all__ = ["SCALED_FP8", "ScaledFP8"]

SCALED_FP8: Final = "scaled_fp8"
"""The codec's name, and the name of the marker tensor a scaled-fp8 file holds."""


def _scalar(value: Tensor) -> Tensor:
    return value.detach().to("cpu", copy=True)


def _optional_scalar(value: Tensor | None) -> Tensor | None:
    return None if value is None else _scalar(value)


@final
@attrs.frozen(kw_only=True)
class ScaledFP8:
    """The codec of one scaled-fp8 layer: weight = fp8 bytes · ``scale_weight``.

    The scales are kept as the file stored them (dtype and shape, on the CPU), so a saved file has
    them back; the float32 scale a decode multiplies by is placed once on each device a weight is
    decoded on (:meth:`scale_on`), so a model moved to a GPU copies no scale per call.
    """

    scale_weight: Tensor = attrs.field(converter=_scalar, eq=False)
    scale_input: Tensor | None = attrs.field(default=None, converter=_optional_scalar, eq=False)
    fp8: torch.dtype = torch.float8_e4m3fn
    _placed: dict[torch.device, Tensor] = attrs.field(init=False, factory=dict, eq=False, repr=False)
    """``scale_weight`` in float32 on each device a weight was decoded on, copied there once."""

    @property
    def name(self) -> str:
        """``scaled_fp8``."""
        return SCALED_FP8

    def decode(self, packed: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """``fp8 · scale`` computed in float32, then cast to ``dtype``."""
        weight = packed.view(self.fp8).reshape(shape).to(torch.float32)
        return (weight * self.scale_on(weight.device)).to(dtype)

    def scale_on(self, device: torch.device) -> Tensor:
        """``scale_weight`` in float32 on ``device``: copied there on first use, then reused by every call."""
        scale = self._placed.get(device)
        if scale is None:
            scale = self._placed[device] = self.scale_weight.to(device=device, dtype=torch.float32)
        return scale
