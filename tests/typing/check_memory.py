"""Type-checked, never run: memory and compile functions accept only models that declare them."""

from __future__ import annotations

from typing import assert_type

import torch

from diffcaps import checkpointing
from diffcaps.casting import enable_layerwise_casting
from diffcaps.compile import compile_repeated_blocks
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.offload import OffloadState, enable_group_offloading
from tests.custom_model import TinyDiT, TinyDiTConfig

flux = FluxTransformer2DModel.from_pretrained("folder")
tiny = TinyDiT(TinyDiTConfig())

checkpointing.enable(flux)
assert_type(enable_group_offloading(flux, onload_device="cuda", offload_type="leaf_level"), OffloadState)
assert_type(enable_layerwise_casting(flux, storage_dtype=torch.float8_e4m3fn), list[str])
assert_type(compile_repeated_blocks(flux, mode="max-autotune"), list[str])

compile_repeated_blocks(tiny)  # TinyDiT declares repeated blocks and layerwise casting
enable_layerwise_casting(tiny)
checkpointing.enable(tiny)  # type: ignore[arg-type]
enable_group_offloading(tiny, onload_device="cpu")  # type: ignore[arg-type]
enable_group_offloading(flux, onload_device="cpu", offload_type="by_block")  # type: ignore[arg-type]
compile_repeated_blocks(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
