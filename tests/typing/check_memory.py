"""Type-checked, never run: the memory and compile features accept only model instances that declare them.

Lines that must fail carry ``# type: ignore[<code>]``; both checkers report an unused ignore,
so a line that starts to pass fails the check.
"""

from __future__ import annotations

from pathlib import Path
from typing import assert_type

import torch

from diffcaps import casting, checkpointing, compile as regional_compile, offload
from diffcaps.casting import LayerwiseCastingConfig
from diffcaps.checkpointing import CheckpointingConfig
from diffcaps.compile import RegionalCompileConfig
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.offload import GroupOffloadingConfig, OffloadGroup
from tests.custom_model import TinyDiT, TinyDiTConfig

flux = FluxTransformer2DModel.from_pretrained("folder")
tiny = TinyDiT(TinyDiTConfig())

# --- one calling pattern: enable(model, config), disable(model), active(model) ---------------
assert_type(checkpointing.enable(flux), None)
assert_type(checkpointing.enable(flux, CheckpointingConfig()), None)
assert_type(checkpointing.active(flux), CheckpointingConfig | None)
assert_type(checkpointing.disable(flux), None)

offloading = GroupOffloadingConfig(onload_device="cuda", offload_type="leaf_level", offload_to_disk_path=Path("x"))
assert_type(offload.enable(flux, offloading), None)
assert_type(offload.active(flux), GroupOffloadingConfig | None)
assert_type(offload.groups(flux), tuple[OffloadGroup, ...])
assert_type(offload.disable(flux), None)
assert_type(GroupOffloadingConfig(onload_device=torch.device("cuda"), num_blocks_per_group=2).onload_device,
            torch.device)

assert_type(casting.enable(flux, LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn)), list[str])
assert_type(casting.enable(flux), list[str])
assert_type(casting.active(flux), LayerwiseCastingConfig | None)
assert_type(casting.disable(flux), None)

assert_type(regional_compile.enable(flux, RegionalCompileConfig(mode="max-autotune")), list[str])
assert_type(regional_compile.active(flux), RegionalCompileConfig | None)
assert_type(regional_compile.disable(flux), None)

regional_compile.enable(tiny)  # TinyDiT declares repeated blocks and layerwise casting
casting.enable(tiny)

# --- a model lacking the feature is rejected ------------------------------------------------
checkpointing.enable(tiny)  # type: ignore[arg-type]
offload.enable(tiny, GroupOffloadingConfig(onload_device="cpu"))  # type: ignore[arg-type]
offload.active(tiny)  # type: ignore[arg-type]
regional_compile.enable(torch.nn.Linear(2, 2))  # type: ignore[arg-type]

# --- the model CLASS is not a model ----------------------------------------------------------
checkpointing.enable(FluxTransformer2DModel)  # type: ignore[arg-type]
regional_compile.enable(FluxTransformer2DModel)  # type: ignore[arg-type]
casting.enable(FluxTransformer2DModel)  # type: ignore[arg-type]
offload.enable(FluxTransformer2DModel, GroupOffloadingConfig(onload_device="cpu"))  # type: ignore[arg-type]
casting.disable(TinyDiT)  # type: ignore[arg-type]

# --- configs are built by keyword, with their field types, and frozen --------------------------
GroupOffloadingConfig("cuda")  # type: ignore[call-arg]
GroupOffloadingConfig(onload_device="cpu", offload_type="by_block")  # type: ignore[arg-type]
GroupOffloadingConfig(onload_device="cpu", num_blocks_per_group=1.5)  # type: ignore[arg-type]
LayerwiseCastingConfig(skip_patterns=[5])  # type: ignore[list-item]
LayerwiseCastingConfig().storage_dtype = torch.bfloat16  # type: ignore[misc]
offload.enable(flux, LayerwiseCastingConfig())  # type: ignore[arg-type]
