"""Type-checked, never run: the LoRA functions accept models that declare LoRA and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import assert_type

import torch

from diffcaps import lora
from diffcaps.lora import LoadReport, LoRAService
from diffcaps.models.flux import FluxTransformer2DModel
from tests.custom_model import TinyDiT, TinyDiTConfig

flux = FluxTransformer2DModel.from_pretrained("some/folder")
assert_type(FluxTransformer2DModel.capabilities.lora, LoRAService)

report = lora.load_adapter(flux, "style.safetensors", adapter_name="style")
assert_type(report, LoadReport)
assert_type(report.format, str)
assert_type(report.targets, tuple[str, ...])
assert_type(lora.load_adapter(flux, {"transformer.proj_out.lora_A.weight": torch.zeros(4, 8)}), LoadReport)
assert_type(lora.load_adapter(flux, Path("x.safetensors"), strict=False, hotswap=True), LoadReport)
assert_type(lora.active_adapters(flux), tuple[str, ...])
assert_type(lora.list_adapters(flux), tuple[str, ...])
assert_type(lora.save_adapter(flux, "out.safetensors", "style", layout="kohya"), Path)
assert_type(lora.detect_format(["a.lora_A.weight"]), str | None)

lora.set_adapters(flux, ["style", "other"], [0.8, {"transformer_blocks.1": 0.5}])
lora.set_adapters(flux, "style", 0.5)
lora.set_adapters(flux, "style")
lora.enable(flux)
lora.disable(flux)
lora.fuse(flux, ["style"], scale=0.7)
lora.unfuse(flux)
lora.delete_adapters(flux, "style")
lora.unload(flux)
lora.enable_hotswap(flux, max_rank=64)

# a model without LoRA, or anything that is no model, is rejected
tiny = TinyDiT(TinyDiTConfig())
lora.load_adapter(tiny, "style.safetensors")  # type: ignore[arg-type]
lora.fuse(tiny)  # type: ignore[arg-type]
lora.unload(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
lora.set_adapters(flux, "style", "loud")  # type: ignore[arg-type]
lora.load_adapter(flux, 3)  # type: ignore[arg-type]
