"""Type-checked, never run: single-file loading returns the caller's class and needs weight mapping.

Lines that must fail carry ``# type: ignore[<code>]``; mypy --strict reports an unused
ignore, so a line that starts to pass fails the check. A model *class* without weight
mapping is rejected by the TypeVar's bound (mypy's code for that is ``type-var``); a model
*instance* without it, or a class where an instance is expected, is an ``arg-type`` error.
"""

from __future__ import annotations

from pathlib import Path
from typing import assert_type

import torch

from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.protocols import SupportsWeightMapping
from diffcaps.weights import ConversionReport, convert, load_single_file, save_single_file
from diffcaps.weights.spec import WeightMapper
from tests.custom_model import TinyDiT, seeded_tiny_dit

# --- what passes ---------------------------------------------------------------------------
flux = load_single_file(FluxTransformer2DModel, "flux1-dev.safetensors")
assert_type(flux, FluxTransformer2DModel)
assert_type(
    load_single_file(FluxTransformer2DModel, Path("f.safetensors"), variant="flux-fill",
                     torch_dtype=torch.bfloat16, device=torch.device("cpu"), strict=False),
    FluxTransformer2DModel,
)
assert_type(save_single_file(flux, "out.safetensors"), Path)
assert_type(save_single_file(flux, "out.safetensors", "diffusers", prefix="model.diffusion_model."), Path)
assert_type(convert(FluxTransformer2DModel, "in.safetensors", "folder"), ConversionReport)
assert_type(FluxTransformer2DModel.declared_capabilities().weight_mapping, WeightMapper)
assert_type(FluxTransformer2DModel.declared_capabilities().weight_mapping.entries(), tuple[str, ...])


def generic(cls: type[SupportsWeightMapping]) -> SupportsWeightMapping:
    return load_single_file(cls, "x.safetensors")


# --- what mypy must reject -----------------------------------------------------------------
load_single_file(TinyDiT, "tiny.safetensors")  # type: ignore[type-var]
load_single_file(torch.nn.Linear, "linear.safetensors")  # type: ignore[type-var]
load_single_file(flux, "instance.safetensors")  # type: ignore[arg-type]
save_single_file(seeded_tiny_dit(), "tiny.safetensors")  # type: ignore[arg-type]
save_single_file(torch.nn.Linear(2, 2), "linear.safetensors")  # type: ignore[arg-type]
save_single_file(flux, "out.safetensors", layout="bfl")  # type: ignore[arg-type]
convert(TinyDiT, "in.safetensors", "folder")  # type: ignore[arg-type]
load_single_file(FluxTransformer2DModel, "f.safetensors", variant=3)  # type: ignore[arg-type]
save_single_file(FluxTransformer2DModel, "class.safetensors")  # type: ignore[arg-type]
