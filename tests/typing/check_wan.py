"""Type-checked, never run: Wan's typed API, and keep-in-fp32 accepted only where it is declared.

Lines that must fail carry ``# type: ignore[<mypy code>]``; both checkers flag an unused ignore.
"""

from __future__ import annotations

from pathlib import Path
from typing import assert_type

import torch

from diffcaps import ModuleNames
from diffcaps.casting.spec import LayerwiseCasting
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.models.wan import WanCapabilities, WanConfig, WanOutput, WanTransformer3DModel
from diffcaps.protocols import SupportsKeepInFP32, require, supports_keep_in_fp32

wan = WanTransformer3DModel.from_pretrained(Path("some/folder"), torch_dtype=torch.bfloat16)
assert_type(wan, WanTransformer3DModel)
assert_type(wan.config, WanConfig)
assert_type(wan.config.patch_size, tuple[int, int, int])
assert_type(wan.capabilities, WanCapabilities)
assert_type(wan.capabilities.keep_in_fp32, ModuleNames)
assert_type(wan.capabilities.layerwise_casting, LayerwiseCasting)
assert_type(wan.to_dtype(torch.bfloat16), WanTransformer3DModel)
assert_type(wan.kept_in_fp32(), frozenset[str])
assert_type(WanTransformer3DModel.from_config(WanConfig()), WanTransformer3DModel)

x = torch.zeros(1)
assert_type(wan.forward(x, x, x), WanOutput)
assert_type(wan.forward(x, x, x, x, return_dict=False), tuple[torch.Tensor])
assert_type(require(wan, "keep_in_fp32"), tuple[torch.nn.Module, ModuleNames])


def kept(model: SupportsKeepInFP32) -> ModuleNames:
    return model.capabilities.keep_in_fp32


kept(wan)
flux = FluxTransformer2DModel.from_pretrained("x")
kept(flux)  # type: ignore[arg-type]
kept(WanTransformer3DModel)  # type: ignore[arg-type]
require(flux, "keep_in_fp32")  # type: ignore[call-overload]
WanTransformer3DModel.from_config(flux.config)  # type: ignore[arg-type]
WanConfig(patch_size=(1, 2))  # type: ignore[arg-type]


def maybe(model: object) -> ModuleNames | None:
    if supports_keep_in_fp32(model):
        return model.capabilities.keep_in_fp32
    return None
